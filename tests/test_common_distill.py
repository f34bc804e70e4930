"""Distillation's shared part (bit_common.distill): the plan, the boxes, the schedule, the flags'
errors, and the run through the shared loop, driven by a numpy distiller (no framework needed).

The numpy distiller matches a fixed linear teacher on raw digit pixels with a linear student
head, by the same KL loss and AdamW rule as the real backends, so resume, signals and the run
folder are tested on real distillation.
"""

from __future__ import annotations

import itertools
import json
import os
import signal

import numpy as np
import pytest

from bit_common import checkpoint, distill, loop
from bit_common.datasets import load_digits
from bit_common.registry import parse_arch
from bit_common.runlog import read_metrics

HEAD_K, HEAD_B = checkpoint.HEAD_KERNEL, checkpoint.HEAD_BIAS
R50 = parse_arch("R50x1")


# ---- the plan and the boxes ----------------------------------------------------------------
def test_the_plan_is_a_pure_function_of_seed_and_step():
    plan = distill.DistillPlan(100, 16, seed=3, mixup_alpha=1.0)
    a, b = plan.batch_plan(7), distill.DistillPlan(100, 16, seed=3).batch_plan(7)
    for field in ("indices", "crop_draws", "flips", "mixup_perm"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert a.mixup_lambda == b.mixup_lambda and 0 < a.mixup_lambda < 1
    other = distill.DistillPlan(100, 16, seed=4).batch_plan(7)
    assert not np.array_equal(a.crop_draws, other.crop_draws)
    # Data order is InputPlan's: every example once per epoch.
    seen = np.concatenate([plan.batch_plan(s).indices for s in range(25)])
    assert sorted(seen[:400].tolist()) == sorted(list(range(100)) * 4)
    assert sorted(a.mixup_perm.tolist()) == list(range(16))


def test_mixup_partners_stay_in_their_shard_and_no_augment_is_the_central_box():
    bp = distill.DistillPlan(100, 16, seed=0, shards=4).batch_plan(2)
    assert all(set(bp.mixup_perm[i:i + 4]) == set(range(i, i + 4)) for i in range(0, 16, 4))
    plain = distill.DistillPlan(100, 4, augment=False).batch_plan(5)
    assert plain.mixup_lambda == 1.0 and not plain.flips.any()
    sizes = np.array([[256, 256], [100, 60], [8, 8], [3, 300]])
    assert np.array_equal(plain.boxes(sizes), distill.central_boxes(sizes))
    assert distill.central_boxes(np.array([[256, 256]])).tolist() == [[16, 16, 224, 224]]
    assert distill.central_boxes(np.array([[1, 1]])).tolist() == [[0, 0, 1, 1]]


def test_inception_boxes_lie_inside_the_image_with_the_area_and_ratio_of_the_recipe():
    rng = np.random.default_rng(0)
    sizes = np.tile([[300, 400]], (2000, 1))
    boxes = distill.inception_boxes(sizes, rng.random((2000, 4)))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= 300).all() and (left + w <= 400).all()
    area = h * w / (300 * 400)
    assert area.min() > 0.07 and area.max() <= 1.0 and 0.45 < np.median(area) < 0.6
    ratio = w / h
    unclipped = (h < 300) & (w < 400)
    assert ratio[unclipped].min() > 0.74 and ratio[unclipped].max() < 1.35
    # All-zero draws: 8 % of the area at a 3/4 ratio, in the top left corner (9600 px: 113 x 85).
    assert distill.inception_boxes(sizes[:1], np.zeros((1, 4))).tolist() == [[0, 0, 113, 85]]
    tiny = distill.inception_boxes(np.array([[1, 1], [2, 9]]), np.full((2, 4), 0.999))
    assert tiny[0].tolist() == [0, 0, 1, 1] and (tiny[1, :2] + tiny[1, 2:] <= [2, 9]).all()


def test_the_schedule_is_optax_and_keras_warmup_cosine():
    optax = pytest.importorskip("optax")
    keras = pytest.importorskip("keras")
    base, warmup, total = 0.03, 50, 400
    ref = optax.warmup_cosine_decay_schedule(0.0, base, warmup, total, end_value=0.0)
    kschedule = keras.optimizers.schedules.CosineDecay(
        0.0, total - warmup, alpha=0.0, warmup_target=base, warmup_steps=warmup)
    for step in (0, 1, 25, 49, 50, 51, 200, 399, 400):
        ours = distill.learning_rate(step, base, warmup, total)
        assert ours == pytest.approx(float(ref(step)), rel=1e-5, abs=1e-9)
        assert ours == pytest.approx(float(kschedule(step)), rel=1e-5, abs=1e-9)
    assert distill.learning_rate(0, base, warmup, total) == 0.0
    assert distill.learning_rate(warmup, base, warmup, total) == base


def test_weight_decay_applies_to_kernels_only():
    keys = checkpoint.expected_shapes(R50, 10)
    decayed = {k for k in keys if distill.decayed(k)}
    assert HEAD_K in decayed and checkpoint.ROOT_KERNEL in decayed
    assert HEAD_B not in decayed and not any("group_norm" in k for k in decayed)
    assert len(decayed) == sum(k.endswith("/kernel") for k in keys) == 54


def test_state_round_trip_and_eval_metrics():
    params = checkpoint.random_params(R50, 10)
    mu = {k: np.full_like(v, 0.5) for k, v in params.items()}
    nu = {k: np.full_like(v, 2.0) for k, v in params.items()}
    state = distill.join_state(params, mu, nu, 7)
    p, m, n, count = distill.split_state(state, R50, 10)
    assert count == 7 and all(np.array_equal(p[k], params[k]) for k in params)
    assert m[HEAD_K].mean() == 0.5 and n[HEAD_B].mean() == 2.0
    del state[distill.ADAM_NU + HEAD_B]
    with pytest.raises(checkpoint.CheckpointError, match="second moments"):
        distill.split_state(state, R50, 10)
    metrics = distill.eval_metrics(np.array([5, 8, 20.0, 6, 9, 3.0, 7, 10]))
    assert metrics == {"top1": 0.5, "top5": 0.8, "loss": 2.0, "agree_top1": 0.6,
                       "agree_top5": 0.9, "kl": 0.3, "teacher_top1": 0.7}


def test_a_student_from_scratch_has_identity_norms_and_a_zero_head():
    params = distill.initial_params(R50, 10, seed=1)
    assert not params[HEAD_K].any() and not params[HEAD_B].any()
    assert all((params[k] == 1).all() for k in params if k.endswith("/gamma"))
    root = params[checkpoint.ROOT_KERNEL]
    assert root.std() == pytest.approx(np.sqrt(2 / (7 * 7 * 3)), rel=0.05)
    assert not np.array_equal(root, distill.initial_params(R50, 10, seed=2)[checkpoint.ROOT_KERNEL])


def test_the_three_distill_commands_have_one_parser_and_big_vision_defaults():
    import importlib

    flags = {fw: [(a.option_strings, a.default, a.help, a.type, a.nargs)
                  for a in distill.build_parser(fw)._actions] for fw in ("pytorch", "jax", "tf2")}
    assert flags["pytorch"] == flags["jax"] == flags["tf2"]
    for fw in ("pytorch", "jax", "tf2"):
        assert importlib.import_module(f"bit_{fw}.distill").FRAMEWORK.name == fw
    args = distill.build_parser("jax").parse_args(
        ["--teacher", "t.npz", "--student", "R50x1", "--name", "n", "--logdir", "l",
         "--dataset", "digits"])
    assert (args.base_lr, args.weight_decay, args.warmup_steps, args.clip_norm,
            args.mixup_alpha, args.temperature, args.batch, args.resolution) == (
        0.03, 3e-4, 5000, 1.0, 1.0, 1.0, 4096, 224)


# ---- the run, through the shared loop ----------------------------------------------------------
def _features(images: np.ndarray, width: int) -> np.ndarray:
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    return np.pad(x, ((0, 0), (0, width - x.shape[1])))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


class NumpyDistiller(loop.Backend):
    """A linear student head matching a linear teacher head on pixels, with AdamW."""

    faults: dict[int, str] = {}

    def __init__(self, setup: distill.DistillSetup):
        self.setup = setup
        self.params = dict(setup.params)
        self.mu = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.nu = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.count = 0
        t = setup.teacher_params
        self.teacher = (t[HEAD_K][0, 0].astype(np.float64), t[HEAD_B].astype(np.float64))

    def _logits(self, x, head):
        return x @ head[0] + head[1]

    def train_batches(self, start_step):
        for s in itertools.count(start_step):
            bp = self.setup.plan.batch_plan(s)
            x = _features(self.setup.train.images[bp.indices], self.setup.arch.feature_dim)
            yield s, (s, bp.mixup_lambda * x + (1 - bp.mixup_lambda) * x[bp.mixup_perm])

    def _kl(self, x):
        temp = self.setup.temperature
        p_t = _softmax(self._logits(x, self.teacher) / temp)
        s = self._logits(x, (self.params[HEAD_K][0, 0], self.params[HEAD_B]))
        p_s = _softmax(s / temp)
        kl = temp ** 2 * (p_t * (np.log(p_t) - np.log(p_s))).sum(1)
        return kl, s, temp * (p_s - p_t) / len(x)

    def train_step(self, batch, lr):
        step, x = batch
        kl, _, g = self._kl(x)
        grads = {HEAD_K: (x.T @ g)[None, None], HEAD_B: g.sum(0)}
        self.count += 1
        b1, b2, eps = distill.ADAM_B1, distill.ADAM_B2, distill.ADAM_EPS
        for key, grad in grads.items():
            self.mu[key] = (b1 * self.mu[key] + (1 - b1) * grad).astype(np.float32)
            self.nu[key] = (b2 * self.nu[key] + (1 - b2) * grad ** 2).astype(np.float32)
            m_hat = self.mu[key] / (1 - b1 ** self.count)
            v_hat = self.nu[key] / (1 - b2 ** self.count)
            update = m_hat / (np.sqrt(v_hat) + eps)
            if distill.decayed(key):
                update = update + self.setup.weight_decay / self.setup.base_lr * self.params[key]
            self.params[key] = (self.params[key] - lr * update).astype(np.float32)
        if self.faults.get(step) == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        return float(kl.mean())

    def eval_sums(self):
        split = self.setup.eval
        x, y = _features(split.images, self.setup.arch.feature_dim), split.labels
        kl, s, _ = self._kl(x)
        t = self._logits(x, self.teacher)
        top5 = np.argsort(-s, 1)[:, :5]
        ce = -np.log(_softmax(s)[np.arange(len(y)), y])
        return np.array([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(1).sum(), ce.sum(),
                         (top5[:, 0] == t.argmax(1)).sum(),
                         (top5 == t.argmax(1)[:, None]).any(1).sum(), kl.sum(),
                         (t.argmax(1) == y).sum(), len(y)], np.float64)

    def get_state(self):
        return distill.join_state(self.params, self.mu, self.nu, self.count)

    def set_state(self, state):
        self.params, self.mu, self.nu, self.count = distill.split_state(
            state, self.setup.arch, self.setup.num_classes)


class NumpyFramework(loop.Framework):
    name = "numpy"

    def load_splits(self, config, info):
        return load_digits("train"), load_digits("test")

    def make_backend(self, setup):
        raise AssertionError("distillation asked for the fine-tuning backend")

    def make_distiller(self, setup):
        return NumpyDistiller(setup)


Numpy = NumpyFramework()


@pytest.fixture(scope="module")
def teacher_npz(tmp_path_factory):
    """A random R50x1 teacher for digits, its head scaled up so that its predictions vary."""
    params = checkpoint.random_params(R50, 10, seed=5)
    params[HEAD_K] = params[HEAD_K] * 30
    path = tmp_path_factory.mktemp("teacher") / "teacher.npz"
    checkpoint.save_params(params, path)
    return path


@pytest.fixture
def run(tmp_path, teacher_npz, capsys):
    def go(*flags, name="run", faults=None, teacher=None):
        NumpyDistiller.faults = faults or {}
        argv = ["--teacher", str(teacher or teacher_npz), "--student", "R50x1", "--name", name,
                "--logdir", str(tmp_path / "logs"), "--dataset", "digits", "--batch", "32",
                "--base_lr", "0.01", "--warmup_steps", "2", "--schedule_steps", "30", *flags]
        try:
            code = distill.main(Numpy, argv)
        finally:
            NumpyDistiller.faults = {}
        return code, capsys.readouterr().err, tmp_path / "logs" / name
    return go


def state_of(run_dir):
    with np.load(run_dir / loop.CHECKPOINT) as f:
        return {k: f[k] for k in f.files if k != "meta/config"}


def test_a_distillation_run_matches_the_teacher_and_writes_the_student(run):
    code, err, run_dir = run("--eval_every", "10")
    assert code == 0, err
    records = read_metrics(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])
    assert [e["step"] for e in evals] == [10, 20, 30]
    assert set(evals[0]) >= {"top1", "top5", "loss", "agree_top1", "agree_top5", "kl",
                             "teacher_top1"}
    assert evals[-1]["agree_top1"] > 0.6 and evals[-1]["kl"] < evals[0]["kl"]
    assert len({e["teacher_top1"] for e in evals}) == 1  # the teacher is frozen
    lrs = [r["lr"] for r in records if r["type"] == "train"]
    assert lrs[:3] == [0.0, 0.005, 0.01] and lrs[-1] < 1e-4
    arch, params = checkpoint.load_params(run_dir / loop.FINAL_MODEL)
    assert arch == R50 and params[HEAD_K].any()
    config = json.loads((run_dir / loop.CONFIG).read_text())
    assert (config["command"], config["teacher_arch"], config["total_steps"]) == (
        "distill", "R50x1", 30)
    assert "distilling" in (run_dir / "train.log").read_text()


def test_sigterm_then_the_same_command_equals_a_straight_run(run):
    code, _, run_dir = run(name="sig", faults={4: "sigterm"})
    assert code == 0 and int(state_of(run_dir)["meta/step"]) == 5
    assert run(name="sig")[0] == 0
    assert run(name="ref")[0] == 0
    a, b = state_of(run_dir), state_of(run_dir.parent / "ref")
    assert a.keys() == b.keys() and int(a[distill.ADAM_COUNT]) == 30
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resuming_with_another_recipe_is_refused(run):
    assert run("--steps", "3", name="r")[0] == 0
    code, err, _ = run("--temperature", "2", name="r")
    assert code == 2 and "--temperature was 1.0, now 2.0" in err


def test_a_teacher_for_other_classes_is_refused_before_anything_is_written(run, tmp_path):
    other = checkpoint.write_random_checkpoint(tmp_path / "t1000.npz", R50, 1000)
    code, err, run_dir = run(teacher=other)
    assert code == 2 and "predicts 1000 classes, but --dataset digits has 10" in err
    assert err.count("\n") == 1 and not run_dir.exists()


def test_a_teacher_file_of_another_architecture_than_its_name_is_refused(run, tmp_path):
    (tmp_path / "w" / "distill").mkdir(parents=True)
    checkpoint.write_random_checkpoint(tmp_path / "w" / "distill" / "R152x2_T_224.npz", R50, 10)
    code, err, run_dir = run("--bit_pretrained_dir", str(tmp_path / "w"),
                             teacher="distill/R152x2_T_224")
    assert code == 2 and "holds a R50x1, but a R152x2 was asked for" in err
    assert not run_dir.exists()


@pytest.mark.parametrize("flags, message", [
    (("--student", "R18x1"), "Unknown architecture 'R18x1'"),
    (("--warmup_steps", "30"), "--warmup_steps 30 leaves no room"),
    (("--temperature", "0"), "--temperature must be positive"),
    (("--batch", "30", "--batch_split", "4"), "multiple of --batch_split"),
])
def test_bad_flags_are_one_paragraph_errors(run, flags, message):
    code, err, run_dir = run(*flags)
    assert code == 2 and message in err and err.count("\n") == 1 and not run_dir.exists()


def test_a_missing_teacher_file_is_named(run, tmp_path):
    code, err, _ = run(teacher=tmp_path / "nope.npz")
    assert code == 2 and "nope.npz: no such file" in err


def test_a_released_student_starts_from_its_body_with_a_zero_head(teacher_npz, tmp_path):
    checkpoint.write_random_checkpoint(tmp_path / "BiT-M-R50x1.npz", R50, 21843, seed=9)
    args = distill.build_parser("numpy").parse_args(
        ["--teacher", str(teacher_npz), "--student", "BiT-M-R50x1", "--name", "n", "--logdir",
         str(tmp_path), "--dataset", "digits", "--bit_pretrained_dir", str(tmp_path),
         "--schedule_steps", "10", "--warmup_steps", "1"])
    setup = distill.make_setup(args, Numpy)
    body = checkpoint.read_npz(tmp_path / "BiT-M-R50x1.npz")
    assert np.array_equal(setup.params[checkpoint.ROOT_KERNEL], body[checkpoint.ROOT_KERNEL])
    assert setup.params[HEAD_K].shape[-1] == 10 and not setup.params[HEAD_K].any()
    assert (setup.end_step, setup.teacher_resolution) == (10, 224)


def test_readme_distill_reference_matches_the_parser():
    from pathlib import Path
    text = (Path(__file__).parent.parent / "README.md").read_text()
    start = text.index("```\nusage: python -m bit_<framework>.distill") + 4
    block = text[start:text.index("```", start)].rstrip()
    assert block == distill.build_parser("<framework>").format_help().rstrip()
