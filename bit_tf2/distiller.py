"""The TensorFlow 2 backend of distillation (`python -m bit_tf2.distill`, bit_common.distill).

- the frozen teacher and the trained student are two `bit_tf2.models.ResNetV2`s under the
  fine-tuning backend's strategy (`bit_tf2.backend.make_strategy`); replica r gets the r-th
  contiguous slice of the plan's global batch (the plan keeps mixup partners inside it);
- one `tf.function` step: mixup of both images, then `--batch_split` micro-batches in a
  `tf.while_loop` as in `bit_tf2.backend`: the teacher's logits (inference mode, outside the
  tape: no gradient) and the student's, loss T² · KL(teacher ‖ student), gradients of
  (micro-loss / (k · replicas)) accumulated; the per-replica computation is XLA-compiled where
  `backend.use_jit()` says so. Then one all-reduce, clipping to the global norm and
  `keras.optimizers.AdamW`;
- the optimizer is Keras' AdamW: learning rate a variable assigned at every step,
  `weight_decay = wd / base_lr` (Keras subtracts lr · weight_decay · kernel before the Adam
  step, as torch.optim.AdamW does), the non-kernels excluded by `exclude_from_weight_decay`.
  Keras puts epsilon outside the bias corrections (its "epsilon hat": m · α / (√v + ε) with α =
  lr · √(1 - β₂ᵗ) / (1 - β₁ᵗ)); torch and optax divide m̂ by √v̂ + ε. The two are equal when
  Keras' epsilon is ε · √(1 - β₂ᵗ), so epsilon is a variable set to that before every step (at
  step 1 with Keras' fixed ε the update of a gradient of 1e-6 would be 24 % smaller, and the
  whole first update of the tests' R50x1, whose median |g| is 7e-6 after clipping, moves by
  17 % relative L2; with the variable epsilon it is torch's to 7e-6: tests/test_tf2_distill.py);
- clipping is `tf.clip_by_global_norm` of the all-reduced gradient, not Keras' global_clipnorm:
  Keras clips in the replica context before its own all-reduce, i.e. each replica's part.
  Keras' apply must run in a replica context, where it sums the replicas' gradients again, so
  each replica hands it (clipped sum / replicas);
- state as canonical numpy arrays (`distill.join_state`: mu = Keras' momentums, nu = its
  velocities, count = its iterations).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from bit_common import distill, precision
from bit_common.distill import DistillSetup
from bit_tf2 import backend, data, models
from bit_tfdata import distill_pipeline

keras = models.keras
_TRAIN_KEYS = ("student", "teacher", "mixup_lambda", "mixup_perm")


def kl_term(teacher_logits: tf.Tensor, student_logits: tf.Tensor, temperature: float
            ) -> tf.Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)) per example, in float32."""
    t = tf.nn.log_softmax(tf.cast(teacher_logits, tf.float32) / temperature)
    s = tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / temperature)
    return temperature ** 2 * tf.reduce_sum(tf.exp(t) * (t - s), axis=-1)


def torch_epsilon(iterations: tf.Tensor) -> tf.Tensor:
    """Keras' epsilon that makes its next Adam step (step `iterations` + 1) torch's / optax's."""
    t = tf.cast(iterations + 1, tf.float32)
    return distill.ADAM_EPS * tf.sqrt(1.0 - tf.constant(distill.ADAM_B2, tf.float32) ** t)


class Distiller(backend.ReplicatedBackend):
    """Teacher, student and Keras' AdamW, driven by the shared loop."""

    def __init__(self, setup: DistillSetup, strategy: tf.distribute.Strategy | None = None,
                 jit: bool | None = None):
        super().__init__(setup, strategy, jit)
        config = setup.config
        with self.building():
            self.teacher = models.from_params(setup.teacher_arch, setup.teacher_params)
            self.teacher.trainable = False
            self.student = models.from_params(setup.arch, setup.params)
            self.keys = list(self.student.variables_by_key)
            self.params = [self.student.variables_by_key[k] for k in self.keys]
            self.epsilon = keras.Variable(distill.ADAM_EPS, trainable=False,
                                          dtype="float32", name="adam_epsilon")
            self.optimizer = keras.optimizers.AdamW(
                learning_rate=0.0, weight_decay=setup.weight_decay / setup.base_lr,
                beta_1=distill.ADAM_B1, beta_2=distill.ADAM_B2, epsilon=self.epsilon)
            self.optimizer.exclude_from_weight_decay(
                var_list=[v for k, v in zip(self.keys, self.params)
                          if not distill.decayed(k)])
            self.optimizer.build(self.params)
        opt = self.optimizer
        # Keras' Adam keeps one momentum and one velocity per variable, found by its index.
        index = [opt._get_variable_index(p) for p in self.params]
        self.mu = [opt._momentums[i] for i in index]
        self.nu = [opt._velocities[i] for i in index]
        self._step = self._make_step()
        self._eval_step = self._make_eval_step()
        self._eval_ds = distill_pipeline.eval_dataset(setup, config.batch_eval)

    # the compiled functions ------------------------------------------------------------------
    def _replica_grads(self):
        """The per-replica function: (gradients of this replica's mean loss / replicas, that
        loss / replicas)."""
        student, teacher, params = self.student, self.teacher, self.params
        k, replicas, temperature = self.batch_split, self.replicas, float(self.setup.temperature)

        def micro_grads(xs, xt, scale):
            # The frozen teacher: inference mode, outside the tape.
            target = tf.stop_gradient(tf.cast(teacher(xt, training=False), tf.float32))
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(kl_term(target, student(xs, training=True), temperature))
                scaled = loss * scale / (k * replicas)
            grads = tape.gradient(scaled, params)
            return loss, [tf.cast(g, tf.float32) / scale for g in grads]

        def replica_step(student_image, teacher_image, lam, perm, scale):
            # The same partners and ratio for both images.
            (xs, xt), _ = backend.mix(lam, perm, student_image, teacher_image)
            return backend.summed_micro_grads(lambda *rows: micro_grads(*rows, scale), (xs, xt),
                                              k, replicas, params)

        return tf.function(replica_step, jit_compile=self.jit)

    def _make_step(self):
        strategy, opt, params, replicas = self.strategy, self.optimizer, self.params, self.replicas
        clip, scaling = float(self.setup.clip_norm), self.loss_scaling
        replica_fn = self._replica_grads()

        def replica_apply(*grads):
            grads = list(grads)
            if clip > 0:
                grads = tf.clip_by_global_norm(grads, clip)[0]
            # Keras' apply sums the replicas' gradients (all identical here) once more.
            opt.apply([g / replicas for g in grads], params)

        def apply(grads):
            strategy.run(replica_apply, args=tuple(grads))
            return tf.constant(True)

        @tf.function
        def step(batch, lr):
            grads, loss = strategy.run(replica_fn, args=(
                batch["student"], batch["teacher"], batch["mixup_lambda"], batch["mixup_perm"],
                self.loss_scale))
            grads, loss = backend.all_reduce(strategy, grads, loss)
            opt.learning_rate.assign(lr)
            self.epsilon.assign(torch_epsilon(opt.iterations))
            if scaling:  # fp16: on overflow skip the step (Adam's moments and count kept)
                finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
                # A cond in the cross-replica context around the replica-context apply, as
                # keras.optimizers.LossScaleOptimizer does (merge_call cannot sit in a cond).
                tf.cond(finite, lambda: apply(grads), lambda: tf.constant(False))
                backend.update_loss_scale(self.loss_scale, self.good_steps, finite)
            else:
                apply(grads)
            return loss

        return step

    def _make_eval_step(self):
        student, teacher = self.student, self.teacher
        top, temperature = min(5, self.setup.num_classes), float(self.setup.temperature)

        def evaluate(student_image, teacher_image, label, mask):
            s = tf.cast(student(student_image, training=False), tf.float32)
            t = tf.cast(teacher(teacher_image, training=False), tf.float32)
            label = tf.cast(label, tf.int32)
            _, best = tf.math.top_k(s, top)
            s1, t1 = best[:, 0], tf.argmax(t, -1, output_type=tf.int32)

            def hits(a):
                return tf.reduce_sum(tf.cast(a, tf.float32) * mask)

            return tf.stack([
                hits(tf.equal(s1, label)),
                hits(tf.reduce_any(tf.equal(best, label[:, None]), -1)),
                tf.reduce_sum(backend._cross_entropy(s, label) * mask),
                hits(tf.equal(s1, t1)),
                hits(tf.reduce_any(tf.equal(best, t1[:, None]), -1)),
                tf.reduce_sum(kl_term(t, s, temperature) * mask),
                hits(tf.equal(t1, label)),
                tf.reduce_sum(mask)])

        return tf.function(evaluate, jit_compile=self.jit)

    # batches ----------------------------------------------------------------------------
    def train_batches(self, start_step: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        ds = distill_pipeline.train_dataset(self.setup, start_step, shards=self.replicas)
        yield from data.stepped_batches(ds)

    def distribute(self, batch: Mapping[str, np.ndarray]) -> Any:
        return backend.distribute(self.strategy, self.replicas, batch)

    @backend._peer_losses
    def train_step(self, batch: Mapping[str, np.ndarray], lr: float) -> float:
        batch = {"student": np.asarray(batch["student"], np.float32),
                 "teacher": np.asarray(batch["teacher"], np.float32),
                 "mixup_lambda": np.asarray(batch["mixup_lambda"], np.float32).reshape(()),
                 "mixup_perm": np.asarray(batch["mixup_perm"], np.int32)}
        return float(self._step(self.distribute(batch), tf.constant(lr, tf.float32)))

    @backend._peer_losses
    def eval_sums(self) -> np.ndarray:
        totals = np.zeros(len(distill.EVAL_SUMS), np.float64)
        for batch in data.batches(self._eval_ds, numpy=False):
            totals += self._eval_step(batch["student"], batch["teacher"], batch["label"],
                                      batch["mask"]).numpy()
        return totals

    # state ------------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        def canonical(variables: list) -> dict[str, np.ndarray]:
            return {k: np.asarray(v.numpy(), np.float32) for k, v in zip(self.keys, variables)}

        state = distill.join_state(models.to_params(self.student), canonical(self.mu),
                                   canonical(self.nu), int(self.optimizer.iterations.numpy()))
        if self.loss_scaling:
            state.update(precision.loss_scale_state(float(self.loss_scale.numpy()),
                                                    int(self.good_steps.numpy())))
        return state

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        params, mu, nu, count = distill.split_state(state, self.setup.arch,
                                                    self.setup.num_classes)
        models.assign_params(self.student, params)
        for key, m, v in zip(self.keys, self.mu, self.nu):
            m.assign(np.asarray(mu[key], np.float32))
            v.assign(np.asarray(nu[key], np.float32))
        self.optimizer.iterations.assign(count)
        if self.loss_scaling:
            scale, good_steps = precision.read_loss_scale(state)
            self.loss_scale.assign(scale)
            self.good_steps.assign(good_steps)

    # The fine-tuning backend's (it reads only `multi_worker` and `strategy`).
    agree = backend.TF2Backend.agree
