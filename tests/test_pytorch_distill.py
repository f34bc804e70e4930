"""bit_pytorch.distill: the input against tf.data's, one step against a hand-computed AdamW step,
--batch_split, the state round trip, the CLI end to end with resume, and (slow) distillation
against label training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bit_common import checkpoint, distill, precision, runlog
from bit_common.registry import parse_arch
from bit_pytorch import backend as torch_backend
from bit_pytorch import distill_data, models
from bit_pytorch.distill import main
from bit_pytorch.distiller import Distiller
from bit_pytorch.train import FRAMEWORK
from conftest import UPDATE_TOLERANCE, update_difference

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
R50 = parse_arch("R50x1")
SMALL = ["--student", "R50x1", "--dataset", "digits", "--batch", "8", "--resolution", "16",
         "--teacher_resolution", "24", "--workers", "0", "--batch_eval", "200",
         "--warmup_steps", "1", "--schedule_steps", "6"]
LR = 0.01


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher_npz(tmp_path_factory):
    """A random R50x1 teacher with a 10-way head (its predictions are far from uniform)."""
    return checkpoint.write_random_checkpoint(
        tmp_path_factory.mktemp("distill_teacher") / "teacher.npz", R50, 10, seed=1)


def make_setup(teacher_npz, *flags: str, student: dict | None = None) -> distill.DistillSetup:
    """The set-up `python -m bit_pytorch.distill` makes from SMALL and `flags` (later flags win);
    `student` (canonical params) replaces the student's random start."""
    args = distill.build_parser("pytorch").parse_args(
        ["--name", "x", "--logdir", "unused", "--teacher", str(teacher_npz), *SMALL, *flags])
    return distill.make_setup(args, FRAMEWORK,
                              student=None if student is None else (R50, student))


def random_student() -> dict:
    """A student with a random head: every layer gets a gradient in the first step (the zero
    head of a fresh student passes none back to the body)."""
    return checkpoint.random_params(R50, 10, seed=2)


# ---- the input: tf.data's arithmetic --------------------------------------------------------
def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("sizes", [("16", "24"), ("5", "7")])  # up- and (antialiased) downsizing
def test_batches_match_tfdata(teacher_npz, sizes):
    """The same plan gives the same student and teacher images (train: two steps, and rank 1
    of a 2-way split; eval: the whole split) as bit_tfdata.distill_pipeline, to 1e-4."""
    from bit_tfdata import distill_pipeline
    from bit_tfdata.pipeline import batches

    setup = make_setup(teacher_npz, "--resolution", sizes[0], "--teacher_resolution", sizes[1])
    b = setup.config.batch
    tf_train = batches(distill_pipeline.train_dataset(setup, 0))
    for ours in distill_data.train_batches(setup, 0, 2, range(b), 1, workers=0):
        theirs = next(tf_train)
        assert ours.step == theirs["step"]
        for k in ("student", "teacher"):
            np.testing.assert_allclose(nhwc(getattr(ours, k)), theirs[k], atol=1e-4, err_msg=k)
        assert ours.mixup_lambda == pytest.approx(float(theirs["mixup_lambda"]), abs=1e-7)
        np.testing.assert_array_equal(ours.mixup_perm.numpy(), theirs["mixup_perm"])
        assert ours.mixup_lambda != 1.0 and not np.array_equal(ours.mixup_perm, np.arange(b))
    # Rank 1 of 2: the second half of the global batch, its partners inside it.
    half = range(b // 2, b)
    ours = next(distill_data.train_batches(setup, 0, 1, half, 2, workers=0))
    theirs = next(batches(distill_pipeline.train_dataset(setup, 0, shards=2)))
    np.testing.assert_allclose(nhwc(ours.teacher), theirs["teacher"][b // 2:], atol=1e-4)
    np.testing.assert_array_equal(ours.mixup_perm.numpy(), theirs["mixup_perm"][b // 2:] - b // 2)

    n = len(setup.eval)
    ours = [torch.cat(parts) for parts in zip(*distill_data.eval_batches(setup, 150, range(n), 0))]
    theirs = list(batches(distill_pipeline.eval_dataset(setup, 200)))
    mask = np.concatenate([t["mask"] for t in theirs]) > 0
    assert mask.sum() == n == len(ours[2])
    for i, k in enumerate(("student", "teacher")):
        want = np.concatenate([t[k] for t in theirs])[mask]
        np.testing.assert_allclose(nhwc(ours[i]), want, atol=1e-4, err_msg=k)
    labels = np.concatenate([t["label"] for t in theirs])[mask]
    np.testing.assert_array_equal(ours[2].numpy(), labels)


# ---- one step, by hand ------------------------------------------------------------------------
# Temperature 2 (the T² scale shows), clipping well below the gradient's norm, and weight decay
# 0.3 at base_lr 0.03: the step subtracts lr * 10 * kernel.
STEP_FLAGS = ("--temperature", "2", "--clip_norm", "0.5", "--weight_decay", "0.3")


@pytest.fixture(scope="module")
def first_step(teacher_npz):
    d = Distiller(make_setup(teacher_npz, *STEP_FLAGS, student=random_student()))
    start = d.get_state()
    step, batch = next(d.train_batches(0))
    assert step == 0
    loss = d.train_step(batch, LR)
    return d, batch, start, loss, d.get_state()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_step_matches_a_hand_computed_adamw_step(first_step):
    """The loss is T²·KL from the two models' logits on the mixed images (numpy, float64); the
    update is AdamW's first step written out: the gradient clipped to global norm 0.5, moments
    (1 - b) g and (1 - b) g², the bias-corrected ratio, decay only on the kernels."""
    d, batch, start, loss, state = first_step
    setup = d.setup
    T, lam, perm = setup.temperature, batch.mixup_lambda, batch.mixup_perm
    teacher = models.from_params(setup.teacher_arch, setup.teacher_params)
    # In the Distiller's memory format: max-pool ties (many on digits) send the gradient to
    # a different input in NCHW than in channels_last, a 2 % change of the step on some CPUs.
    nhwc = torch.channels_last
    student = models.from_params(setup.arch, setup.params).train().to(memory_format=nhwc)

    def mix(x):
        return lam * x + (1 - lam) * x[perm]

    with torch.no_grad():
        t = teacher(mix(batch.teacher)).double().numpy()
    s_logits = student(mix(batch.student).contiguous(memory_format=nhwc))
    s = s_logits.detach().double().numpy()
    lt, ls = log_softmax(t / T), log_softmax(s / T)
    want_loss = T ** 2 * np.mean(np.sum(np.exp(lt) * (lt - ls), axis=1))
    assert loss == pytest.approx(want_loss, rel=1e-5)

    # d loss / d student logits of T²·KL, by hand: T (softmax(s/T) - softmax(t/T)) / B.
    dlogits = T * (np.exp(ls) - np.exp(lt)) / len(s)
    s_logits.backward(torch.from_numpy(dlogits).float())
    g = models.from_state_dict({n: p.grad.numpy() for n, p in student.named_parameters()},
                               R50, 10)
    norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in g.values()))
    assert norm > 5 * setup.clip_norm  # clipping is active
    b1, b2, eps = distill.ADAM_B1, distill.ADAM_B2, distill.ADAM_EPS
    decay = LR * setup.weight_decay / setup.base_lr
    assert decay == pytest.approx(0.1)
    assert int(state[distill.ADAM_COUNT]) == 1
    want = {}
    for k, grad in g.items():
        gc = grad.astype(np.float64) * setup.clip_norm / norm
        mu, nu = (1 - b1) * gc, (1 - b2) * gc ** 2
        np.testing.assert_allclose(state[distill.ADAM_MU + k], mu, rtol=1e-3,
                                   atol=1e-3 * np.abs(mu).max(), err_msg=k)
        np.testing.assert_allclose(state[distill.ADAM_NU + k], nu, rtol=2e-3,
                                   atol=2e-3 * np.abs(nu).max(), err_msg=k)
        p = start[k].astype(np.float64)
        want[k] = p * (1 - decay if distill.decayed(k) else 1) - LR * (mu / (1 - b1)) / (
            np.sqrt(nu / (1 - b2)) + eps)
    diff = update_difference(state, want, start, "resnet/")
    print(f"AdamW step vs by hand: relative L2 of the update {diff:.1e}")
    # Measured 6e-4 (float32 against float64, the channels-last kernels against contiguous); a
    # missing bias correction or a decayed gamma moves it by 50 % or more.
    assert diff < 5e-3
    # Decay only where decayed(): a gamma moves by the Adam ratio alone (at most lr).
    gamma = checkpoint.PREFIX + "group_norm/gamma"
    assert np.abs(state[gamma] - start[gamma]).max() <= LR * 1.001
    kernel = checkpoint.HEAD_KERNEL
    assert np.abs(state[kernel] - start[kernel]).max() > LR * 1.5  # decay on top of the ratio


def test_zero_learning_rate_moves_only_the_moments(teacher_npz):
    d = Distiller(make_setup(teacher_npz, student=random_student()))
    start = d.get_state()
    d.train_step(next(d.train_batches(0))[1], 0.0)
    state = d.get_state()
    for k in start:
        if k.startswith(checkpoint.PREFIX):
            np.testing.assert_array_equal(state[k], start[k], err_msg=k)
    assert int(state[distill.ADAM_COUNT]) == 1
    assert all(np.abs(state[distill.ADAM_MU + k]).max() > 0 for k in d.setup.params)


def test_batch_split_gives_the_same_step(teacher_npz, first_step):
    """2 micro-batches: the same loss, gradient moments and update as the whole batch."""
    _, _, start, loss1, s1 = first_step
    d = Distiller(make_setup(teacher_npz, *STEP_FLAGS, "--batch_split", "2",
                             student=random_student()))
    loss2 = d.train_step(next(d.train_batches(0))[1], LR)
    s2 = d.get_state()
    assert loss2 == pytest.approx(loss1, rel=1e-5)
    for prefix in ("resnet/", distill.ADAM_MU, distill.ADAM_NU):
        diff = update_difference(s1, s2, start, prefix)
        print(f"split 2 vs 1, {prefix}: relative L2 of the update {diff:.1e}")
        assert diff < UPDATE_TOLERANCE / 10, prefix


def test_state_round_trip_gives_the_same_next_step(teacher_npz, first_step):
    d, _, _, _, state = first_step
    fresh = Distiller(make_setup(teacher_npz, *STEP_FLAGS, student=random_student()))
    fresh.set_state(state)
    again = fresh.get_state()
    assert again.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(again[k], state[k], err_msg=k)
    _, batch = next(d.train_batches(1))
    assert d.train_step(batch, LR) == fresh.train_step(batch, LR)
    a, b = d.get_state(), fresh.get_state()
    assert int(a[distill.ADAM_COUNT]) == int(b[distill.ADAM_COUNT]) == 2
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    bad = dict(state)
    bad[distill.ADAM_MU + checkpoint.HEAD_BIAS] = np.zeros(3, np.float32)
    with pytest.raises(checkpoint.CheckpointError):
        fresh.set_state(bad)


# ---- the CLI ------------------------------------------------------------------------------------
def cli_args(teacher_npz, logdir, name, *extra) -> list[str]:
    # base_lr 3e-4: the reference rate 0.03 is for batch 4096 and 5000 warm-up steps; over 6
    # steps of batch 8 it drives the KL up. At 3e-4 it falls from ~0.39 to ~0.2.
    return ["--name", name, "--logdir", str(logdir), "--teacher", str(teacher_npz), *SMALL,
            "--base_lr", "3e-4", "--eval_every", "6", *extra]


def load_state(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files if not k.startswith("meta/")}


def test_cli_distils_and_resumes_identically(teacher_npz, tmp_path):
    """3 steps, then the same command without --steps resumes to the schedule's end (6), and
    equals the 6 steps in one go: every array of the checkpoint, every loss, the last eval."""
    assert main(cli_args(teacher_npz, tmp_path, "halves", "--steps", "3")) == 0
    assert main(cli_args(teacher_npz, tmp_path, "halves")) == 0
    assert main(cli_args(teacher_npz, tmp_path, "straight")) == 0
    run, straight = tmp_path / "halves", tmp_path / "straight"
    assert "(resumed)" in (run / "train.log").read_text()
    a, b = load_state(run / "checkpoint.npz"), load_state(straight / "checkpoint.npz")
    assert a.keys() == b.keys() and int(a[distill.ADAM_COUNT]) == 6
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    ma, mb = (runlog.read_metrics(r / "metrics.jsonl") for r in (run, straight))
    train = [r["loss"] for r in mb if r["type"] == "train"]
    assert [r["loss"] for r in ma if r["type"] == "train"] == train and len(train) == 6
    print(f"KL loss over the run: {np.round(train, 3).tolist()}")
    assert np.mean(train[-2:]) < 0.8 * np.mean(train[:2])  # it falls
    evals = [r for r in mb if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [6]
    last = [r for r in ma if r["type"] == "eval"]
    assert [r["step"] for r in last] == [3, 6]
    for key in ("top1", "top5", "loss", "agree_top1", "agree_top5", "kl", "teacher_top1"):
        assert last[-1][key] == evals[0][key], key
        assert np.isfinite(evals[0][key])
    assert 0 <= evals[0]["agree_top1"] <= evals[0]["agree_top5"] <= 1
    assert evals[0]["kl"] > 0
    config = json.loads((straight / "config.json").read_text())
    assert (config["command"], config["framework"], config["teacher_arch"]) == (
        "distill", "pytorch", "R50x1")
    final = models.load_npz(straight / "model.npz")
    assert final.num_classes == 10
    with np.load(straight / "model.npz") as f:
        assert {k: f[k].shape for k in f.files} == checkpoint.expected_shapes(R50, 10)
        np.testing.assert_array_equal(f[checkpoint.HEAD_BIAS], b[checkpoint.HEAD_BIAS])


def test_bad_input_is_a_clear_error(teacher_npz, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("bf16 is valid on a GPU")
    assert main(cli_args(teacher_npz, tmp_path, "bad", "--precision", "bf16")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--precision bf16 needs a GPU" in err, err
    assert not (tmp_path / "bad").exists()


# ---- fp16 on the CPU (the step's logic under CPU autocast; see test_pytorch_train) -----------
def test_fp16_overflow_skips_the_step_and_the_scale_round_trips(teacher_npz, monkeypatch):
    """A loss scale (set with set_state) that overflows float16's gradients: AdamW does not step
    (parameters, moments and count unchanged; clipping unscales first) and the scale halves in
    the state; at a scale that fits, the step is taken and counted."""
    monkeypatch.setattr(torch_backend, "mixed_precision_available", lambda device: True)
    d = Distiller(make_setup(teacher_npz, "--precision", "fp16", "--batch", "4",
                             "--teacher_resolution", "16", student=random_student()))
    start = d.get_state()
    assert precision.read_loss_scale(start) == (precision.LOSS_SCALE_INIT, 0)
    d.set_state({**start, **precision.loss_scale_state(2.0 ** 30, 7)})
    batch = next(d.train_batches(0))[1]
    assert np.isfinite(d.train_step(batch, LR))
    state = d.get_state()
    for k in start:
        if not k.startswith("loss_scale/"):
            np.testing.assert_array_equal(state[k], start[k], err_msg=k)
    assert precision.read_loss_scale(state) == (2.0 ** 29, 0)
    d.scaler.update(2.0 ** 8)  # a scale that fits: the step is taken
    d.train_step(batch, LR)
    state = d.get_state()
    assert int(state[distill.ADAM_COUNT]) == 1 and precision.read_loss_scale(state) == (2.0 ** 8, 1)
    assert max(float(np.abs(state[k] - start[k]).max()) for k in d.setup.params) > LR / 2


# ---- two processes ------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_processes_equal_one(teacher_npz, tmp_path):
    """torchrun, 2 processes of 4 rows, each split in 2 micro-batches, against one process.
    Without mixup: with it, each process's partners stay in its half (the plan's shards), which
    pairs the examples differently from one process."""
    common = ["--steps", "3", "--batch_split", "2", "--eval_every", "3", "--mixup_alpha", "0",
              "--base_lr", "1e-3"]
    assert main(cli_args(teacher_npz, tmp_path, "one", *common)) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "bit_pytorch.distill", *cli_args(teacher_npz, tmp_path, "two", *common)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("[step 3] loss=") == 1  # only rank 0 prints
    one, two = (load_state(tmp_path / n / "checkpoint.npz") for n in ("one", "two"))
    assert one.keys() == two.keys() and int(two[distill.ADAM_COUNT]) == 3
    start = distill.initial_params(R50, 10, seed=0)
    diff = update_difference(one, two, start, "resnet/")
    print(f"DDP 2 processes vs 1: relative L2 of the update {diff:.2e}")
    assert diff <= UPDATE_TOLERANCE
    ma, mb = (runlog.read_metrics(tmp_path / n / "metrics.jsonl") for n in ("one", "two"))
    assert [(r["type"], r["step"]) for r in ma] == [(r["type"], r["step"]) for r in mb]
    for ra, rb in zip(ma, mb):
        keys = ["loss"] + (["kl", "agree_top5", "teacher_top1"] if ra["type"] == "eval" else [])
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-3, abs=1e-3), (ra["step"], k)


# ---- distillation against label training ------------------------------------------------------
@pytest.mark.slow
def test_distilled_student_agrees_with_the_teacher_more_than_a_label_trained_one(teacher_npz):
    """Two students from the same start, the random teacher's body with a zero head (what
    `--student teacher.npz` starts), on the same batches with the same optimizer and schedule:
    20 steps of distillation against 20 of cross-entropy on the (mixed) labels. The distilled
    student agrees with the teacher on more test images (top-1 and top-5) and is closer to it.

    Measured (lr 1e-4): top-1 agreement 0.26 against 0.04, top-5 0.95 against 0.37, KL 0.20
    against 0.35. At this size (16 px, 20 steps) the distilled student predicts the teacher's
    most frequent class (0.26 of the test images) rather than its function of each image, and
    a label-trained one lands on some class of its own: with other rates or seeds it can land on
    that same class (top-1 agreement then ties, top-5 and KL still separate them)."""
    flags = ("--batch", "16", "--teacher_resolution", "16", "--warmup_steps", "3",
             "--schedule_steps", "20", "--base_lr", "1e-4", "--batch_eval", "360")
    start = {k: np.zeros_like(v) if k.startswith(checkpoint.PREFIX + "head/") else v
             for k, v in checkpoint.read_npz(teacher_npz).items()}
    distilled = Distiller(make_setup(teacher_npz, *flags, student=start))
    labelled = Distiller(make_setup(teacher_npz, *flags, student=start))
    setup = distilled.setup
    ce = torch.nn.functional.cross_entropy
    for step, batch in distilled.train_batches(0):
        lr = setup.lr(step)
        distilled.train_step(batch, lr)
        # The same step on the labels instead of the teacher.
        lam, perm, y = batch.mixup_lambda, batch.mixup_perm, batch.labels
        x = lam * batch.student + (1 - lam) * batch.student[perm]
        for group in labelled.optimizer.param_groups:
            group["lr"] = lr
        labelled.optimizer.zero_grad(set_to_none=True)
        logits = labelled.model(x)
        (lam * ce(logits, y) + (1 - lam) * ce(logits, y[perm])).backward()
        labelled._update(labelled.optimizer, setup.clip_norm)
    ours, theirs = (distill.eval_metrics(d.eval_sums()) for d in (distilled, labelled))
    print(f"after {setup.end_step} steps: distilled {ours}\nlabel-trained {theirs}")
    assert ours["agree_top1"] > theirs["agree_top1"] + 0.1
    assert ours["agree_top5"] > theirs["agree_top5"] + 0.2
    assert ours["kl"] < 0.8 * theirs["kl"]
