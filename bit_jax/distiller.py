"""The JAX distillation backend (`python -m bit_jax.distill`, bit_common.distill):

- one jit-compiled train step: mixup of both images (`backend.mixup_parts`, the batch's lambda
  and pairing), the frozen teacher's logits on its image (inference, `stop_gradient`, no
  gradient taken through it), the student's on its own, the loss `T² · KL(teacher ‖ student)`
  averaged over the batch, `--batch_split` micro-batches whose gradients a `lax.scan`
  accumulates, then `optax.chain(clip_by_global_norm, adamw)` with the weight decay masked to the
  kernels (`distill.decayed`) and decoupled from the learning rate (`wd / base_lr`, so each
  step subtracts `lr / base_lr · wd · kernel`);
- the learning rate, clipping norm, weight decay and temperature enter the step as traced
  scalars (only whether clipping is on is baked in), so one run, or several Distillers in one
  process, compile the step once per shape; one jitted evaluation step gives `EVAL_SUMS`;
- data parallelism, multi-host runs, precision and peer failures as `bit_jax.backend`'s;
- state as canonical numpy arrays (`distill.join_state`: the student plus `adam/mu/...`,
  `adam/nu/...`, `adam/count`), interchangeable with the other frameworks' checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bit_common import checkpoint, distill, loop, runtime
from bit_common.distill import DistillSetup
from bit_common.registry import Arch
from bit_jax import backend, models

_STEP_CACHE: dict[tuple, Callable] = {}
_EVAL_CACHE: dict[tuple, Callable] = {}


def decay_mask(arch: Arch, num_classes: int) -> dict:
    """The flax parameter tree of booleans: True where weight decay applies (the kernels)."""
    keys = checkpoint.expected_shapes(arch, num_classes)
    return traverse_util.unflatten_dict(
        {tuple(models.param_path(k).split("/")): distill.decayed(k) for k in keys})


def optimizer(lr: Any, clip_norm: Any, weight_decay: Any, mask: Any,
              clip: bool = True) -> optax.GradientTransformation:
    """Clipping to the global norm `clip_norm` (when `clip`), then Adam with decoupled weight
    decay `weight_decay` (already divided by the base learning rate) on the `mask`ed
    parameters, at learning rate `lr`. The arguments may be traced: the state's structure does
    not depend on their values, so it is built with any and updated with the step's."""
    return optax.chain(
        optax.clip_by_global_norm(clip_norm) if clip else optax.identity(),
        optax.adamw(lr, b1=distill.ADAM_B1, b2=distill.ADAM_B2, eps=distill.ADAM_EPS,
                    weight_decay=weight_decay, mask=mask))


def kl_terms(teacher_logits: jax.Array, student_logits: jax.Array, temperature: Any
             ) -> jax.Array:
    """`T² · KL(softmax(teacher / T) ‖ softmax(student / T))` of each example, in float32."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return temperature ** 2 * jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def _key(student: models.ResNetV2, teacher: models.ResNetV2, mesh: Mesh, *extra: Any) -> tuple:
    return (backend._module_key(student), backend._module_key(teacher),
            mesh.devices.tobytes(), tuple(mesh.devices.shape), *extra)


def make_distill_step(student: models.ResNetV2, teacher: models.ResNetV2, batch_split: int,
                      mesh: Mesh, clip: bool) -> Callable:
    """`step((params, opt_state), teacher_params, batch, hyper) -> ((params, opt_state), loss)`.

    `batch` holds student [B, r, r, 3], teacher [B, rt, rt, 3], mixup_lambda [], mixup_perm [B];
    `hyper` the float32 scalars lr, clip_norm, weight_decay (divided by the base learning rate)
    and temperature. Both images are mixed (in their own executable, as the fine-tuning step
    does), then the batch is cut into `batch_split` contiguous micro-batches, each one's
    teacher and student forward and the student's backward inside a `lax.scan` summing the
    gradients of (micro-loss / k). The state buffers are donated; the teacher's are not.
    """
    key = _key(student, teacher, mesh, batch_split, clip)
    if key in _STEP_CACHE:
        return _STEP_CACHE[key]
    k = batch_split
    mask = decay_mask(Arch(student.depth, student.width), student.num_classes)

    def micro_loss(params, teacher_params, xs, xt, temperature):
        # Differentiated in `params` alone; the teacher's logits are constants to autodiff.
        t = lax.stop_gradient(teacher.apply({"params": teacher_params}, xt))
        s = student.apply({"params": params}, xs)
        return jnp.mean(kl_terms(t, s, temperature))

    grad_fn = jax.value_and_grad(micro_loss)

    def core(state, teacher_params, batch, hyper):
        params, opt_state = state
        xs = batch["student"] + batch["student_partner"]
        xt = batch["teacher"] + batch["teacher_partner"]
        temperature = hyper["temperature"]
        loss, grads = backend.mean_grads(
            lambda *rows: grad_fn(params, teacher_params, *rows, temperature), params, (xs, xt),
            k, mesh)
        tx = optimizer(hyper["lr"], hyper["clip_norm"], hyper["weight_decay"], mask, clip)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    core_fn = jax.jit(core, out_shardings=NamedSharding(mesh, P()), donate_argnums=(0,))

    def step(state, teacher_params, batch, hyper):
        mixed = dict(batch)
        for name in ("student", "teacher"):
            mixed[name], mixed[f"{name}_partner"] = backend.mixup_parts(
                batch[name], batch["mixup_lambda"], batch["mixup_perm"])
        return core_fn(state, teacher_params, mixed, hyper)

    _STEP_CACHE[key] = step
    return step


def make_eval_step(student: models.ResNetV2, teacher: models.ResNetV2, mesh: Mesh) -> Callable:
    """`eval(params, teacher_params, student_image, teacher_image, label, mask, temperature)`
    -> the `distill.EVAL_SUMS` of the batch (masked rows excluded)."""
    key = _key(student, teacher, mesh)
    if key in _EVAL_CACHE:
        return _EVAL_CACHE[key]
    top = min(5, student.num_classes)

    def evaluate(params, teacher_params, xs, xt, y, mask, temperature):
        s = student.apply({"params": params}, xs).astype(jnp.float32)
        t = teacher.apply({"params": teacher_params}, xt).astype(jnp.float32)
        y = y.astype(jnp.int32)
        s1, t1 = jnp.argmax(s, axis=-1), jnp.argmax(t, axis=-1)
        _, best = lax.top_k(s, top)
        hits = (s1 == y, jnp.any(best == y[:, None], axis=-1), backend._cross_entropy(s, y),
                s1 == t1, jnp.any(best == t1[:, None], axis=-1), kl_terms(t, s, temperature),
                t1 == y, jnp.ones_like(mask))
        return jnp.stack([jnp.sum(h.astype(jnp.float32) * mask) for h in hits])

    fn = jax.jit(evaluate, out_shardings=NamedSharding(mesh, P()))
    _EVAL_CACHE[key] = fn
    return fn


def _replicated(tree: Any, mesh: Mesh) -> Any:
    """A tree of host arrays (cast to float32 where floating) put on every device of `mesh`."""
    sharding = NamedSharding(mesh, P())

    def put(a: Any) -> jax.Array:
        a = np.asarray(a)
        return backend._put(a.astype(np.float32) if a.dtype.kind == "f" else a, sharding)

    return jax.tree.map(put, tree)


# ---- the backend the shared loop drives -----------------------------------------------------
class Distiller(loop.Backend):
    """Distils `setup.teacher_params` into the student `setup.params` (bit_common.distill)."""

    def __init__(self, setup: DistillSetup, devices: Sequence[jax.Device] | None = None):
        config = setup.config
        dtype = backend._compute_dtype(config.precision)
        self.setup, self.config = setup, config
        self.mesh = backend.data_mesh(config.batch, devices)
        ndev = self.mesh.devices.size
        self.is_chief = jax.process_index() == 0
        self.student = models.make_module(setup.arch, setup.num_classes, dtype)
        self.teacher = models.make_module(setup.teacher_arch, setup.num_classes, dtype)
        self.teacher_params = _replicated(models.params_from_canonical(setup.teacher_params),
                                          self.mesh)
        self._clip = setup.clip_norm > 0
        self._mask = decay_mask(setup.arch, setup.num_classes)
        self.state = self._init_state(setup.params)
        self._hyper = {"clip_norm": setup.clip_norm or 1.0,
                       "weight_decay": setup.weight_decay / setup.base_lr,
                       "temperature": setup.temperature}
        self._step = make_distill_step(self.student, self.teacher, config.batch_split,
                                       self.mesh, self._clip)
        self._eval = make_eval_step(self.student, self.teacher, self.mesh)
        self._eval_batch = config.batch_eval + (-config.batch_eval) % ndev
        self._eval_ds = None
        self._heap = runtime.HeapTrimmer()  # see bit_common.runtime and backend.JaxBackend

    def _init_state(self, params: Mapping[str, np.ndarray],
                    mu: Mapping[str, np.ndarray] | None = None,
                    nu: Mapping[str, np.ndarray] | None = None, count: int = 0) -> tuple:
        """(flax params, optax state) from canonical arrays, replicated over the mesh: optax's
        own initial state, with the given moments and step count where there are some."""
        tree = jax.tree.map(lambda a: np.asarray(a, np.float32),
                            models.params_from_canonical(params))
        opt_state = optimizer(0.0, 1.0, 0.0, self._mask, self._clip).init(tree)
        if mu is not None:
            opt_state = optax.tree_utils.tree_set(
                opt_state, mu=models.params_from_canonical(mu),
                nu=models.params_from_canonical(nu), count=np.asarray(count, np.int32))
        return _replicated((tree, opt_state), self.mesh)

    # batches ----------------------------------------------------------------------------
    def train_batches(self, start_step: int) -> Iterator[tuple[int, dict[str, jax.Array]]]:
        from bit_jax import data
        from bit_tfdata import distill_pipeline

        shards = self.mesh.devices.size  # mixup partners stay inside each device's slice
        ds = distill_pipeline.train_dataset(self.setup, start_step, shards)
        for step, batch in data.stepped_batches(ds):
            yield step, backend.shard_batch(batch, self.mesh)

    @backend._peer_losses
    def train_step(self, batch: Mapping[str, jax.Array], lr: float) -> float:
        hyper = {k: np.float32(v) for k, v in {**self._hyper, "lr": lr}.items()}
        self.state, loss = self._step(self.state, self.teacher_params, batch, hyper)
        loss = float(loss)
        self._heap.after_step()
        return loss

    @backend._peer_losses
    def eval_sums(self) -> np.ndarray:
        from bit_jax import data
        from bit_tfdata import distill_pipeline

        if self._eval_ds is None:  # built once, iterated at every evaluation
            self._eval_ds = distill_pipeline.eval_dataset(self.setup, self.config.batch_eval)
        totals = np.zeros(len(distill.EVAL_SUMS), np.float64)
        temperature = np.float32(self.setup.temperature)
        for batch in data.batches(self._eval_ds):
            batch = backend.pad_batch(batch, self._eval_batch)
            b = backend.shard_batch(batch, self.mesh)
            totals += np.asarray(self._eval(self.state[0], self.teacher_params, b["student"],
                                            b["teacher"], b["label"], b["mask"], temperature),
                                 np.float64)
        return totals

    # state ------------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        arch, n = self.setup.arch, self.setup.num_classes
        params, opt_state = self.state
        mu, nu = (models.params_to_canonical(optax.tree_utils.tree_get(opt_state, m), arch, n)
                  for m in ("mu", "nu"))
        count = optax.tree_utils.tree_get(opt_state, "count")
        if not count.is_fully_addressable:
            count = count.addressable_data(0)
        return distill.join_state(models.params_to_canonical(params, arch, n), mu, nu,
                                  int(jax.device_get(count)))

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        params, mu, nu, count = distill.split_state(state, self.setup.arch,
                                                    self.setup.num_classes)
        self.state = self._init_state(params, mu, nu, count)

    @backend._peer_losses
    def agree(self, flag: bool) -> bool:
        return backend.any_process(flag)
