"""The JAX backend the shared loop drives (`python -m bit_jax.train`):

- one jit-compiled train step (compiled once: the learning rate is an argument), optax SGD with
  momentum and no weight decay (`optax.trace`: t = g + 0.9 t; p -= lr t, as torch.optim.SGD),
  mixup on the full batch, then `--batch_split` micro-batches whose gradients are accumulated by a
  `lax.scan` inside the step;
- `--train`: the step differentiates the loss with respect to the trained parameters only, the
  frozen ones entering as constants (so no backward pass runs through the frozen layers), and
  optax's trace and the update see the trained ones only: frozen parameters and their momentum
  pass through the step bit for bit;
- data parallelism over every device with `jax.jit` on a device `Mesh`: the batch is sharded on
  the 'data' axis, parameters and momentum are replicated (`NamedSharding`); several hosts join
  through `jax.distributed` when JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are
  set;
- state as canonical numpy arrays (`resnet/...` plus `momentum/resnet/...`), so checkpoints are
  interchangeable with the other frameworks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bit_common import checkpoint, hyperrule, loop, precision, runtime, trainable
from bit_common.errors import BiTError, collective_peer_failure, peer_losses
from bit_common.registry import Arch
from bit_jax import models

DATA_AXIS = "data"


# ---- the jitted functions (cached, so several backends in one process compile once) ----------
def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process) named 'data'."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_mesh(batch: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`make_mesh`, for a global batch of `batch` examples split over its devices."""
    mesh = make_mesh(devices)
    if batch % mesh.devices.size:
        raise BiTError(f"--batch {batch} must be divisible by the number of devices "
                       f"({mesh.devices.size}) for data parallelism.")
    return mesh


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


@jax.jit
def mixup_parts(image: jax.Array, lam: jax.Array, perm: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two products of mixup, `lam * x` and `(1 - lam) * x[perm]`, in their own executable:
    if the sum were compiled together with them, XLA could fuse it into a multiply-add and round
    differently from numpy's / torch's `lam * x + (1 - lam) * x[perm]` (and from other
    compilations of the step). The max pool's arg-max, and so the gradient, is sensitive to that
    last bit. The step adds the two."""
    x = image.astype(jnp.float32)
    lam = lam.astype(jnp.float32)
    return lam * x, (1 - lam) * x[perm]


def micro_batches(a: jax.Array, k: int, mesh: Mesh) -> jax.Array:
    """[B, ...] -> [k, B / k, ...] contiguous micro-batches for a `lax.scan` (inside a jitted
    step), each spread over all devices when it divides evenly."""
    a = a.reshape(k, a.shape[0] // k, *a.shape[1:])
    if a.shape[1] % mesh.devices.size == 0:
        spec = P(None, DATA_AXIS, *([None] * (a.ndim - 2)))
        a = lax.with_sharding_constraint(a, NamedSharding(mesh, spec))
    return a


def mean_grads(loss_and_grads: Callable, params: Any, arrays: tuple[jax.Array, ...], k: int,
               mesh: Mesh) -> tuple[jax.Array, Any]:
    """(loss, gradients) of loss_and_grads(*arrays), as the mean over k contiguous
    micro-batches of the arrays summed by a `lax.scan` (k = 1: one call on the whole batch).
    `params` gives the gradients' tree."""
    if k == 1:
        return loss_and_grads(*arrays)

    def body(carry, micro):
        g_acc, l_acc = carry
        loss_i, g = loss_and_grads(*micro)
        g_acc = jax.tree.map(lambda a, b: a + b / k, g_acc, g)
        return (g_acc, l_acc + loss_i / k), None

    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
    (grads, loss), _ = lax.scan(body, init, tuple(micro_batches(a, k, mesh) for a in arrays))
    return loss, grads


_STEP_CACHE: dict[tuple, Callable] = {}
_EVAL_CACHE: dict[tuple, Callable] = {}


def _module_key(module: models.ResNetV2) -> tuple:
    return (module.depth, module.width, module.num_classes, jnp.dtype(module.dtype).name)


def trained_paths(module: models.ResNetV2, train: str) -> frozenset[str]:
    """The flax paths ('/'-joined) of the parameters `--train train` fine-tunes."""
    keys = checkpoint.expected_shapes(Arch(module.depth, module.width), module.num_classes)
    return frozenset(models.param_path(k) for k in trainable.trained_keys(keys, train))


def make_train_step(module: models.ResNetV2, batch_split: int, mesh: Mesh,
                    train: str = "all") -> Callable:
    """`step((params, opt_state), batch, lr) -> ((params, opt_state), loss)`, jitted.

    `batch` holds image [B, H, W, 3], label [B], mixup_lambda [], mixup_perm [B]. Mixup is applied
    to the whole batch, then the batch is cut into `batch_split` contiguous micro-batches whose
    gradients of (micro-loss / k) are summed by a `lax.scan`. Only the parameters `--train train`
    fine-tunes get gradients, momentum and updates; the others are returned as they came. Two
    compiled functions (the mixup products, then the step proper); the state buffers are donated.
    """
    key = (_module_key(module), batch_split, mesh.devices.tobytes(), tuple(mesh.devices.shape),
           train)
    if key in _STEP_CACHE:
        return _STEP_CACHE[key]
    tx = optax.trace(decay=hyperrule.MOMENTUM, nesterov=False)
    k = batch_split
    replicated = NamedSharding(mesh, P())
    trained = trained_paths(module, train)

    def partition(tree):
        """(trained, frozen) flat {path: leaf} dicts of a parameter-shaped tree."""
        flat = traverse_util.flatten_dict(tree, sep="/")
        return ({p: v for p, v in flat.items() if p in trained},
                {p: v for p, v in flat.items() if p not in trained})

    def merge(trained_flat, frozen_flat):
        return traverse_util.unflatten_dict({**trained_flat, **frozen_flat}, sep="/")

    def micro_loss(params, frozen, x, y, y_mix, lam):
        # Differentiated in `params` (the trained ones) alone: the frozen layers are constants
        # to autodiff, which then computes no gradient through them.
        logits = module.apply({"params": merge(params, frozen)}, x)
        return jnp.mean(lam * _cross_entropy(logits, y) + (1 - lam) * _cross_entropy(logits, y_mix))

    grad_fn = jax.value_and_grad(micro_loss)

    def core(state, batch, lr):
        params, frozen = partition(state[0])
        trace, frozen_trace = partition(state[1].trace)
        lam = batch["mixup_lambda"].astype(jnp.float32)
        perm = batch["mixup_perm"]
        x = batch["image"] + batch["partner"]
        y = batch["label"]
        y_mix = y[perm]
        loss, grads = mean_grads(lambda *rows: grad_fn(params, frozen, *rows, lam), params,
                                 (x, y, y_mix), k, mesh)
        updates, opt_state = tx.update(grads, optax.TraceState(trace=trace), params)
        params = jax.tree.map(lambda p, u: p - lr.astype(p.dtype) * u, params, updates)
        return (merge(params, frozen),
                optax.TraceState(trace=merge(opt_state.trace, frozen_trace))), loss

    core_fn = jax.jit(core, out_shardings=replicated, donate_argnums=(0,))

    def step(state, batch, lr):
        image, partner = mixup_parts(batch["image"], batch["mixup_lambda"], batch["mixup_perm"])
        return core_fn(state, {**batch, "image": image, "partner": partner}, lr)

    _STEP_CACHE[key] = step
    return step


def init_state(params: Mapping[str, np.ndarray], mesh: Mesh,
               momentum: Mapping[str, np.ndarray] | None = None) -> tuple:
    """(flax params, optax trace state) from canonical arrays, replicated over `mesh`."""
    replicated = NamedSharding(mesh, P())
    tree = models.params_from_canonical(params)
    mom = (jax.tree.map(np.zeros_like, tree) if momentum is None
           else models.params_from_canonical(momentum))
    state = (tree, optax.TraceState(trace=mom))
    return jax.tree.map(lambda a: _put(np.asarray(a, np.float32), replicated), state)


def make_eval_step(module: models.ResNetV2, mesh: Mesh) -> Callable:
    """`eval(params, image, label, mask) -> [top1, top5, loss, count]` sums over the batch."""
    key = (_module_key(module), mesh.devices.tobytes(), tuple(mesh.devices.shape))
    if key in _EVAL_CACHE:
        return _EVAL_CACHE[key]
    top = min(5, module.num_classes)

    def evaluate(params, x, y, mask):
        logits = module.apply({"params": params}, x).astype(jnp.float32)
        y = y.astype(jnp.int32)
        ce = _cross_entropy(logits, y)
        top1 = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        _, best = lax.top_k(logits, top)
        top5 = jnp.any(best == y[:, None], axis=-1).astype(jnp.float32)
        return jnp.stack([jnp.sum(top1 * mask), jnp.sum(top5 * mask), jnp.sum(ce * mask),
                          jnp.sum(mask)])

    fn = jax.jit(evaluate, out_shardings=NamedSharding(mesh, P()))
    _EVAL_CACHE[key] = fn
    return fn


def _put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full (works on several hosts)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Put a global batch on the mesh: per-example arrays split on 'data', scalars replicated."""
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        spec = P(DATA_AXIS) if value.ndim else P()
        out[name] = _put(value, NamedSharding(mesh, spec))
    return out


def state_to_canonical(state: tuple, arch, num_classes: int) -> dict[str, np.ndarray]:
    """Canonical params plus `momentum/<canonical key>` from the (params, trace state) pair."""
    params, opt_state = state
    return loop.join_state(models.params_to_canonical(params, arch, num_classes),
                           models.params_to_canonical(opt_state.trace, arch, num_classes))


# ---- the backend the shared loop drives -----------------------------------------------------
def _lost_peer(backend: JaxBackend, e: Exception) -> str | None:
    """JAX's Gloo collectives raise (ValueError or XlaRuntimeError) when a peer is gone."""
    if jax.process_count() > 1 and isinstance(e, (ValueError, jax.errors.JaxRuntimeError)):
        return collective_peer_failure(e)
    return None


_peer_losses = peer_losses(_lost_peer)


class JaxBackend(loop.Backend):
    def __init__(self, setup: loop.RunSetup, devices: Sequence[jax.Device] | None = None):
        config = setup.config
        dtype = _compute_dtype(config.precision)
        self.setup, self.config = setup, config
        self.mesh = data_mesh(config.batch, devices)
        ndev = self.mesh.devices.size
        self.is_chief = jax.process_index() == 0
        self.module = models.make_module(setup.arch, setup.num_classes, dtype)
        self.state = init_state(setup.params, self.mesh)
        self._step = make_train_step(self.module, config.batch_split, self.mesh, config.train)
        self._eval = make_eval_step(self.module, self.mesh)
        self._eval_batch = config.batch_eval + (-config.batch_eval) % ndev
        self._eval_ds = None
        # Bounds the heap that runtime.configure keeps: see bit_common.runtime.
        self._heap = runtime.HeapTrimmer()

    # batches ----------------------------------------------------------------------------
    def train_batches(self, start_step: int) -> Iterator[tuple[int, dict[str, jax.Array]]]:
        from bit_jax import data  # tf.data: not needed to build the backend (a bench without TF)

        shards = self.mesh.devices.size  # mixup partners stay inside each device's slice
        for step, batch in data.stepped_batches(data.train_dataset(self.setup, start_step, shards)):
            yield step, shard_batch(batch, self.mesh)

    @_peer_losses
    def train_step(self, batch: Mapping[str, jax.Array], lr: float) -> float:
        self.state, loss = self._step(self.state, batch, np.float32(lr))
        loss = float(loss)
        self._heap.after_step()
        return loss

    @_peer_losses
    def eval_sums(self) -> np.ndarray:
        from bit_jax import data

        if self._eval_ds is None:  # built once, iterated at every evaluation
            self._eval_ds = data.eval_dataset(self.setup, self.config.batch_eval)
        totals = np.zeros(4, np.float64)
        params = self.state[0]
        for batch in data.batches(self._eval_ds):
            batch = pad_batch(batch, self._eval_batch)
            b = shard_batch({k: batch[k] for k in ("image", "label", "mask")}, self.mesh)
            totals += np.asarray(self._eval(params, b["image"], b["label"], b["mask"]),
                                 np.float64)
        return totals

    # state ------------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        return state_to_canonical(self.state, self.setup.arch, self.setup.num_classes)

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        params, momentum = loop.split_state(state, self.setup.arch, self.setup.num_classes)
        self.state = init_state(params, self.mesh, momentum)

    @_peer_losses
    def agree(self, flag: bool) -> bool:
        return any_process(flag)


def any_process(flag: bool) -> bool:
    """Whether `flag` is set in any process of the run (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pad a (last, short) evaluation batch to `size` rows with mask 0."""
    n = len(batch["label"])
    if n == size:
        return batch
    out = {}
    for k, v in batch.items():
        if np.ndim(v) == 0:
            out[k] = v
            continue
        pad = np.zeros((size - n, *v.shape[1:]), v.dtype)
        out[k] = np.concatenate([v, pad])
    return out


def mixed_precision_available() -> bool:
    """Whether --precision bf16 may run here (GPUs and TPUs; see bit_common.precision). The tests
    patch this to run the bfloat16 step on a CPU."""
    return jax.default_backend() != "cpu"


def _compute_dtype(name: str) -> Any:
    if name == "fp16":
        raise BiTError("--precision fp16 is not supported by the JAX backend: use fp32, or bf16 "
                       "on a GPU/TPU (bfloat16 needs no loss scaling; float16 would).")
    precision.require_accelerator(name, "JAX", mixed_precision_available(), "GPU or TPU")
    return jnp.bfloat16 if name == "bf16" else jnp.float32


def init_distributed() -> int:
    """Join a multi-host run when the JAX_* environment variables describe one; the number of
    processes."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return 1
    try:
        processes = int(os.environ["JAX_NUM_PROCESSES"])
        process = int(os.environ["JAX_PROCESS_ID"])
    except (KeyError, ValueError) as e:
        raise BiTError(f"JAX_COORDINATOR_ADDRESS is set, so this is a multi-host run, but "
                       f"JAX_NUM_PROCESSES / JAX_PROCESS_ID are missing or invalid ({e}). Set "
                       f"all three, or none for a single-host run.") from None
    jax.distributed.initialize(coordinator_address=address, num_processes=processes,
                               process_id=process)
    return processes


def finish_distributed() -> None:
    """Leave the multi-host run `init_distributed` joined."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
