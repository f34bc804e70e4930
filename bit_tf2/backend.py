"""The TensorFlow 2 backend the shared loop drives (`python -m bit_tf2.train`):

- one `tf.function` train step, traced once (the learning rate is a tensor argument): mixup on the
  full batch, then `--batch_split` contiguous micro-batches whose gradients of (micro-loss / k)
  are accumulated in a `tf.while_loop`; SGD with momentum and no weight decay written out as
  torch.optim.SGD does it (buf = 0.9 buf + g; p -= lr buf). Keras' SGD keeps v = 0.9 v - lr g,
  which differs from it whenever the learning rate changes, so it is not used.
- `--train`: the tape's gradient is taken with respect to the trained variables only, and only
  those are all-reduced and updated; frozen variables and their momentum are never written. The
  gradient ops below the first trained layer feed no output, so the function runtime prunes
  them (a `--train head` step costs what a forward pass does);
- data parallelism with `tf.distribute.MirroredStrategy` over the local GPUs (or logical CPUs),
  `MultiWorkerMirroredStrategy` when TF_CONFIG describes several hosts: replica r trains on the
  r-th contiguous slice of the global batch, the per-replica gradients of (loss / replicas) are
  summed, and the update is applied once, identically, to every copy of the variables;
- the per-replica gradient computation is XLA-compiled (`jit_compile`) on GPUs, where it is
  faster; on CPU the plain graph (oneDNN convolutions) is faster (BIT_TF2_JIT=1/0 overrides);
- state as canonical numpy arrays (`resnet/...` and `momentum/resnet/...`), so checkpoints are
  interchangeable with the other frameworks.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from bit_common import checkpoint, hyperrule, loop, precision, runtime, trainable
from bit_common.errors import BiTError, peer_losses
from bit_tf2 import data, models

keras = models.keras
JIT_ENV = "BIT_TF2_JIT"


# ---- devices and strategies ------------------------------------------------------------------
_STRATEGY: tf.distribute.Strategy | None = None


def make_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy under TF_CONFIG, else MirroredStrategy over the local GPUs
    (or the logical CPUs, when the CPU was split into several), else the default strategy."""
    global _STRATEGY
    if _STRATEGY is None:
        if os.environ.get("TF_CONFIG"):
            _STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()
        else:
            devices = (tf.config.list_logical_devices("GPU")
                       or tf.config.list_logical_devices("CPU"))
            _STRATEGY = (tf.distribute.MirroredStrategy([d.name for d in devices])
                         if len(devices) > 1 else tf.distribute.get_strategy())
    return _STRATEGY


def init_distributed() -> int:
    """Under TF_CONFIG, create the MultiWorkerMirroredStrategy, which must exist before any other
    TensorFlow op runs; a TF_CONFIG that cannot be used is a BiTError. The number of workers."""
    if not os.environ.get("TF_CONFIG"):
        return 1
    try:
        cluster = json.loads(os.environ["TF_CONFIG"])["cluster"]
        make_strategy()
        return sum(len(cluster.get(kind, ())) for kind in ("chief", "worker"))
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise BiTError(f"TF_CONFIG is set, so this is a multi-worker run, but it cannot be used "
                       f"({type(e).__name__}: {e}). Fix it, or unset it for a single-host "
                       f"run.") from None


def _lost_peer(backend: TF2Backend, e: Exception) -> str | None:
    """TensorFlow aborts a multi-worker run's collectives with UnavailableError."""
    if backend.multi_worker and isinstance(e, tf.errors.OpError) and (
            isinstance(e, tf.errors.UnavailableError)
            or "Collective ops is aborted" in (e.message or "")):
        return _peer_detail(e.message or "")
    return None


def _peer_detail(message: str) -> str:
    """The line of a collective's error that says what happened: TensorFlow often puts a bare
    "Graph execution error:" first and the peer's status (UNAVAILABLE, a connection or socket
    message) further down."""
    lines = [x.strip() for x in message.strip().splitlines() if x.strip()]
    telling = [x for x in lines if any(w in x for w in _PEER_WORDS)]
    return (telling or lines or ["(no message)"])[0][:300]


_PEER_WORDS = ("UNAVAILABLE", "navailable", "onnect", "socket", "peer", "aborted")


_peer_losses = peer_losses(_lost_peer)


def finish_distributed() -> None:
    """Nothing to leave: the strategy's collectives end with the process."""


def _is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def use_jit() -> bool:
    forced = runtime.env_override(JIT_ENV)
    return bool(tf.config.list_physical_devices("GPU")) if forced is None else forced


def mixed_precision_available() -> bool:
    """Whether --precision bf16/fp16 may run here (GPUs only; see bit_common.precision). The
    tests patch this to run the mixed-precision step's logic on a CPU."""
    return bool(tf.config.list_physical_devices("GPU"))


def _policy(name: str) -> str:
    precision.require_accelerator(name, "TensorFlow", mixed_precision_available())
    return {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[name]


def _cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32))


def _apply_momentum(var: tf.Variable, buf: tf.Variable, grad: tf.Tensor, lr: tf.Tensor,
                    momentum: tf.Tensor) -> None:
    """buf = momentum * buf + grad; var -= lr * buf, in place, as one kernel per variable (no
    parameter-sized temporaries; Keras' SGD applies the learning rate differently)."""
    tf.raw_ops.ResourceApplyMomentum(var=var.handle, accum=buf.handle, lr=lr, grad=grad,
                                     momentum=momentum, use_locking=False, use_nesterov=False)


def update_loss_scale(scale: tf.Variable, good_steps: tf.Variable, finite: tf.Tensor) -> None:
    """fp16's dynamic loss scale (bit_common.precision): halved on a non-finite gradient,
    doubled after LOSS_SCALE_GROWTH_INTERVAL finite steps in a row."""
    period = precision.LOSS_SCALE_GROWTH_INTERVAL
    grow = tf.logical_and(finite, good_steps + 1 >= period)
    scale.assign(tf.where(finite, tf.where(grow, scale * 2, scale), scale / 2))
    good_steps.assign(tf.where(tf.logical_and(finite, tf.logical_not(grow)), good_steps + 1,
                               tf.zeros([], tf.int64)))


def mix(lam: tf.Tensor, perm: tf.Tensor, *images: tf.Tensor
        ) -> tuple[list[tf.Tensor], tf.Tensor]:
    """(each image batch mixed with the plan's partners, lam*x + (1-lam)*x[perm]; those
    partners as rows of this replica's slice, for the labels). `perm` holds the partners of
    this replica's slice as global rows, so it is taken modulo the slice."""
    perm = perm % tf.shape(images[0])[0]
    lam = tf.cast(lam, tf.float32)
    return [lam * x + (1 - lam) * tf.gather(x, perm) for x in images], perm


def summed_micro_grads(micro_grads: Any, batch: tuple[tf.Tensor, ...], k: int, replicas: int,
                       params: list[tf.Variable]) -> tuple[list[tf.Tensor], tf.Tensor]:
    """(the sum of micro_grads' gradients over k micro-batches of `batch`, the mean loss /
    replicas): micro_grads(*rows) returns (loss, gradients of loss / (k * replicas))."""
    if k == 1:
        loss, grads = micro_grads(*batch)
        return grads, loss / replicas
    m = tf.shape(batch[0])[0] // k
    acc = [tf.zeros(p.shape, tf.float32) for p in params]
    total = tf.zeros([], tf.float32)
    for i in tf.range(k):
        # One micro-batch at a time: by default the while loop may run several
        # iterations' forward passes at once, which is what splitting must prevent.
        tf.autograph.experimental.set_loop_options(parallel_iterations=1)
        sl = slice(i * m, (i + 1) * m)
        loss, grads = micro_grads(*(t[sl] for t in batch))
        acc = [a + g for a, g in zip(acc, grads)]
        total += loss
    return acc, total / (k * replicas)


def all_reduce(strategy: tf.distribute.Strategy, grads: list[Any], loss: Any
               ) -> tuple[list[tf.Tensor], tf.Tensor]:
    """The replicas' gradients and losses summed, in one batched all-reduce whose sums stay on
    the replicas' devices (a list handed to `strategy.reduce` is packed into one tensor, which
    multi-worker collectives reject; other destinations make one all-reduce per variable)."""
    grads = strategy.extended.batch_reduce_to(tf.distribute.ReduceOp.SUM,
                                              [(g, g) for g in grads])
    return grads, strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)


# ---- the backend the shared loop drives -----------------------------------------------------
def distribute(strategy: tf.distribute.Strategy, replicas: int,
               batch: Mapping[str, np.ndarray]) -> Any:
    """Replica r gets rows [r*B/R, (r+1)*B/R) of every per-example array; scalars whole."""
    n = len(next(v for v in batch.values() if np.ndim(v))) // replicas

    def value_fn(ctx: tf.distribute.experimental.ValueContext) -> dict[str, tf.Tensor]:
        r = ctx.replica_id_in_sync_group
        return {k: tf.constant(v if np.ndim(v) == 0 else v[r * n:(r + 1) * n])
                for k, v in batch.items()}

    return strategy.experimental_distribute_values_from_function(value_fn)


class ReplicatedBackend(loop.Backend):
    """What fine-tuning and distillation share: the strategy and its replicas, equal
    micro-batches on every replica, the chief, XLA or not, and the precision policy and loss
    scale under which the models are built (`building`)."""

    def __init__(self, setup: Any, strategy: tf.distribute.Strategy | None, jit: bool | None):
        config = setup.config
        self.setup, self.config = setup, config
        self.strategy = strategy or make_strategy()
        self.replicas = int(self.strategy.num_replicas_in_sync)
        self.multi_worker = isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)
        self.batch_split = int(config.batch_split)
        if config.batch % (self.replicas * self.batch_split):
            raise BiTError(
                f"--batch {config.batch} must be divisible by the number of replicas "
                f"({self.replicas}) times --batch_split ({self.batch_split}), so that every "
                f"device gets the same number of equal micro-batches.")
        self.is_chief = _is_chief(self.strategy)
        self.jit = use_jit() if jit is None else jit
        self.loss_scaling = precision.needs_loss_scaling(config.precision)

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """The strategy's scope under the run's precision policy (Keras reads the global one
        when a layer is built; the caller's is restored after), with the loss scale state."""
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(_policy(self.config.precision))
        try:
            with self.strategy.scope():
                self.loss_scale = tf.Variable(precision.LOSS_SCALE_INIT if self.loss_scaling
                                              else 1.0, trainable=False, dtype=tf.float32)
                self.good_steps = tf.Variable(0, trainable=False, dtype=tf.int64)
                yield
        finally:
            keras.mixed_precision.set_global_policy(previous)


class TF2Backend(ReplicatedBackend):
    def __init__(self, setup: loop.RunSetup, strategy: tf.distribute.Strategy | None = None,
                 jit: bool | None = None):
        super().__init__(setup, strategy, jit)
        config = setup.config
        with self.building():
            self.model = models.from_params(setup.arch, setup.params)
            self.keys = list(self.model.variables_by_key)
            self.params = [self.model.variables_by_key[k] for k in self.keys]
            self.momentum = [tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False,
                                         name="momentum") for v in self.params]
        trained = set(trainable.trained_keys(self.keys, config.train))
        self.trained = [i for i, key in enumerate(self.keys) if key in trained]  # into params
        self._step = self._make_step()
        self._eval_step = self._make_eval_step()
        self._eval_ds = data.eval_dataset(setup, config.batch_eval)  # iterated at each eval

    # the compiled functions ------------------------------------------------------------------
    def _make_step(self):
        model, k, replicas = self.model, self.batch_split, self.replicas
        params = [self.params[i] for i in self.trained]  # what --train fine-tunes
        momenta = [self.momentum[i] for i in self.trained]
        scaling = self.loss_scaling

        def micro_grads(x, y, y_mix, lam, scale):
            with tf.GradientTape() as tape:
                logits = model(x)
                loss = tf.reduce_mean(lam * _cross_entropy(logits, y)
                                      + (1 - lam) * _cross_entropy(logits, y_mix))
                scaled = loss * scale / (k * replicas)
            grads = tape.gradient(scaled, params)
            return loss, [tf.cast(g, tf.float32) / scale for g in grads]

        def replica_step(image, label, lam, perm, scale):
            """Gradients of (this replica's mean loss / replicas), and that loss / replicas."""
            (x,), perm = mix(lam, perm, image)
            y, y_mix = label, tf.gather(label, perm)
            lam = tf.cast(lam, tf.float32)
            return summed_micro_grads(lambda *rows: micro_grads(*rows, lam, scale),
                                      (x, y, y_mix), k, replicas, params)

        replica_fn = tf.function(replica_step, jit_compile=self.jit)
        strategy = self.strategy

        @tf.function
        def step(batch, lr):
            grads, loss = strategy.run(replica_fn, args=(
                batch["image"], batch["label"], batch["mixup_lambda"], batch["mixup_perm"],
                self.loss_scale))
            grads, loss = all_reduce(strategy, grads, loss)
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            if scaling:  # skip the update and halve the scale on overflow (fp16 only)
                self._update_loss_scale(finite)
                grads = [tf.where(finite, g, tf.zeros_like(g)) for g in grads]
                keep = tf.cast(finite, tf.float32)
            else:
                keep = tf.constant(1.0)
            # A skipped step is momentum 1, gradient 0 and learning rate 0: nothing moves.
            momentum = 1.0 - keep * (1.0 - hyperrule.MOMENTUM)
            for p, buf, g in zip(params, momenta, grads):
                # The tf.Variable under the Keras variable: per-device copies when mirrored.
                strategy.extended.update(p.value, _apply_momentum,
                                         args=(buf, g, keep * lr, momentum), group=False)
            return loss

        return step

    def _update_loss_scale(self, finite: tf.Tensor) -> None:
        update_loss_scale(self.loss_scale, self.good_steps, finite)

    def _make_eval_step(self):
        model, top = self.model, min(5, self.setup.num_classes)

        def evaluate(image, label, mask):
            logits = tf.cast(model(image), tf.float32)
            label = tf.cast(label, tf.int32)
            ce = _cross_entropy(logits, label)
            top1 = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), label),
                           tf.float32)
            _, best = tf.math.top_k(logits, top)
            top5 = tf.cast(tf.reduce_any(tf.equal(best, label[:, None]), -1), tf.float32)
            return tf.stack([tf.reduce_sum(top1 * mask), tf.reduce_sum(top5 * mask),
                             tf.reduce_sum(ce * mask), tf.reduce_sum(mask)])

        return tf.function(evaluate, jit_compile=self.jit)

    # batches ----------------------------------------------------------------------------
    def train_batches(self, start_step: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        ds = data.train_dataset(self.setup, start_step, shards=self.replicas)
        yield from data.stepped_batches(ds)

    def distribute(self, batch: dict[str, np.ndarray]) -> Any:
        keys = ("image", "label", "mixup_lambda", "mixup_perm")
        return distribute(self.strategy, self.replicas, {k: batch[k] for k in keys})

    @_peer_losses
    def train_step(self, batch: dict[str, np.ndarray], lr: float) -> float:
        batch = {"image": np.asarray(batch["image"], np.float32),
                 "label": np.asarray(batch["label"], np.int32),
                 "mixup_lambda": np.asarray(batch["mixup_lambda"], np.float32).reshape(()),
                 "mixup_perm": np.asarray(batch["mixup_perm"], np.int32)}
        loss = self._step(self.distribute(batch), tf.constant(lr, tf.float32))
        return float(loss)

    @_peer_losses
    def eval_sums(self) -> np.ndarray:
        totals = np.zeros(4, np.float64)
        for batch in data.batches(self._eval_ds, numpy=False):
            totals += self._eval_step(batch["image"], batch["label"], batch["mask"]).numpy()
        return totals

    # state ------------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        arch, classes = self.setup.arch, self.setup.num_classes
        state = models.to_params(self.model)
        mom = {k: np.asarray(b.numpy(), np.float32) for k, b in zip(self.keys, self.momentum)}
        checkpoint.validate(mom, arch, classes, source="The TF2 momentum buffers")
        state = loop.join_state(state, mom)
        if self.loss_scaling:
            state.update(precision.loss_scale_state(float(self.loss_scale.numpy()),
                                                    int(self.good_steps.numpy())))
        return state

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        arch, classes = self.setup.arch, self.setup.num_classes
        params, momentum = loop.split_state(state, arch, classes)
        models.assign_params(self.model, params)
        for key, buf in zip(self.keys, self.momentum):
            buf.assign(np.asarray(momentum[key], np.float32))
        if self.loss_scaling:
            scale, good_steps = precision.read_loss_scale(state)
            self.loss_scale.assign(scale)
            self.good_steps.assign(good_steps)

    @_peer_losses
    def agree(self, flag: bool) -> bool:
        if not self.multi_worker:
            return flag
        value = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(float(flag)))
        return bool(self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) > 0)
