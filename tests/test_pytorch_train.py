"""bit_pytorch.train: the CLI end to end on `digits`, resume, --batch_split, mixup, DDP, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bit_common import checkpoint, precision, runlog, trainable
from bit_pytorch import backend as torch_backend
from bit_pytorch import data, models
from bit_pytorch.backend import PyTorchBackend
from bit_pytorch.train import main
from conftest import (MIXED_UPDATE_TOLERANCE, UPDATE_TOLERANCE, metrics_scalars, run_setup,
                      tensorboard_scalars, update_difference)

ROOT = Path(__file__).resolve().parents[1]
# One OpenMP thread: fast and deterministic on a shared 2-core machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SMALL = ["--model", "BiT-M-R50x1", "--dataset", "digits", "--batch", "8",
         "--resolution", "40", "32", "--workers", "0", "--batch_eval", "120"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli_args(ckpt_dir, logdir, name, *extra) -> list[str]:
    return ["--name", name, "--logdir", str(logdir), "--bit_pretrained_dir", str(ckpt_dir),
            *SMALL, *extra]


def load_state(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files if not k.startswith("meta/")}


def run_cli(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bit_pytorch.train", *argv], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


# ---- end to end, resume, determinism ----------------------------------------------------------
def test_cli_run_writes_everything_and_resumes_identically(r50_npz, ckpt_dir, tmp_path):
    # 2 steps, then the same command with --steps 4 resumes at step 2.
    assert main(cli_args(ckpt_dir, tmp_path, "halves", "--steps", "2", "--eval_every", "2")) == 0
    run = tmp_path / "halves"
    for f in ("train.log", "metrics.jsonl", "checkpoint.npz", "model.npz", "config.json"):
        assert (run / f).is_file(), f
    assert main(cli_args(ckpt_dir, tmp_path, "halves", "--steps", "4", "--eval_every", "2")) == 0
    assert "(resumed)" in (run / "train.log").read_text()
    # The same 4 steps in one go.
    assert main(cli_args(ckpt_dir, tmp_path, "straight", "--steps", "4", "--eval_every", "2")) == 0

    a, b = load_state(run / "checkpoint.npz"), load_state(tmp_path / "straight/checkpoint.npz")
    assert a.keys() == b.keys()
    assert any(k.startswith("momentum/") for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ma = runlog.read_metrics(run / "metrics.jsonl")
    mb = runlog.read_metrics(tmp_path / "straight/metrics.jsonl")
    assert [(r["type"], r["step"]) for r in ma] == [(r["type"], r["step"]) for r in mb] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]
    for ra, rb in zip(ma, mb):
        assert ra["loss"] == rb["loss"]
        if ra["type"] == "eval":
            assert ra["top1"] == rb["top1"] and ra["top5"] == rb["top5"]
    # TensorBoard reads the same losses from the two event files, one point per step.
    assert tensorboard_scalars(run)["train/loss"] == metrics_scalars(run)["train/loss"]
    # The final model is a released-layout file with the task's head.
    final = models.load_npz(run / "model.npz")
    assert final.num_classes == 10
    with np.load(run / "model.npz") as f:
        assert {k: f[k].shape for k in f.files} == checkpoint.expected_shapes(final.arch, 10)
    # Nothing to do once the run is complete.
    before = (run / "checkpoint.npz").stat().st_mtime_ns
    assert main(cli_args(ckpt_dir, tmp_path, "halves", "--steps", "4")) == 0
    assert "nothing to do" in (run / "train.log").read_text()
    assert (run / "checkpoint.npz").stat().st_mtime_ns == before


# ---- the optimizer step, called directly ------------------------------------------------------
def make_backend(r50_npz, batch=8, batch_split=1, extra=(), keep_head=False) -> PyTorchBackend:
    """A backend as the CLI builds it: with a zero 10-way head (fine-tuning's), or with
    `keep_head` the file's random one, so that every layer gets a gradient."""
    setup = run_setup("pytorch", "--bit_pretrained_dir", str(r50_npz.parent), "--batch",
                      str(batch), "--batch_split", str(batch_split), "--resolution", "40", "32",
                      "--workers", "0", *extra,
                      params=checkpoint.read_npz(r50_npz) if keep_head else None)
    return PyTorchBackend(setup)


def first_batch(backend: PyTorchBackend, lam: float = 1.0, perm=None) -> data.TrainBatch:
    step, batch = next(backend.train_batches(0))
    assert step == batch.step == 0
    if perm is not None:
        batch.mixup_lambda, batch.mixup_perm = lam, torch.as_tensor(perm)
    return batch


@pytest.fixture(scope="module")
def split1_state(r50_npz):
    be = make_backend(r50_npz, keep_head=True)
    start = be.get_state()
    kept = {k: v.copy() for k, v in start.items()}
    loss = be.train_step(first_batch(be), 0.1)
    for k in start:  # a snapshot, not views of the tensors the step updates in place
        np.testing.assert_array_equal(start[k], kept[k], err_msg=k)
    return loss, be.get_state(), start


def test_batch_split_gives_the_same_step(r50_npz, split1_state):
    """4 micro-batches give the full batch's step: every layer's update (the file's head, so
    the backbone gets gradients too) to UPDATE_TOLERANCE relative L2, the loss to 1e-5."""
    loss1, s1, start = split1_state
    be = make_backend(r50_npz, batch_split=4, keep_head=True)
    loss4 = be.train_step(first_batch(be), 0.1)
    s4 = be.get_state()
    assert abs(loss1 - loss4) < 1e-5
    assert s1.keys() == s4.keys()
    worst = max(float(np.abs(s1[k] - s4[k]).max() / (np.abs(s1[k]).max() + 1e-12)) for k in s1)
    print(f"split 4 vs 1: max relative difference {worst:.2e}")
    assert worst < 1e-5
    for prefix in ("resnet/", "momentum/"):
        diff = update_difference(s1, s4, start, prefix)
        print(f"split 4 vs 1, {prefix}: relative L2 of the update {diff:.1e}")
        assert diff < UPDATE_TOLERANCE, prefix
    moved = [float(np.abs(s1[k] - start[k]).max()) for k in be.setup.params]
    assert max(moved) > 1e-4 and min(moved) > 0  # the step changed every parameter array


def test_state_round_trip_and_momentum(r50_npz, split1_state):
    _, state, _ = split1_state
    be = make_backend(r50_npz)
    fresh = be.get_state()
    assert all(not fresh[k].any() for k in fresh if k.startswith("momentum/"))
    be.set_state(state)
    again = be.get_state()
    for k in state:
        np.testing.assert_array_equal(again[k], state[k], err_msg=k)
    bad = dict(state)
    bad["resnet/head/conv2d/bias"] = np.zeros(3, np.float32)
    with pytest.raises(checkpoint.CheckpointError):
        be.set_state(bad)


def test_mixup_step_matches_manual_computation(r50_npz):
    lam, perm = 0.7, [3, 0, 1, 2, 7, 6, 5, 4]
    be = make_backend(r50_npz)
    batch = first_batch(be, lam, perm)
    loss = be.train_step(batch, 0.1)

    model = models.from_params(be.setup.arch, be.setup.params).train()
    x, y = batch.images, batch.labels
    xm = lam * x + (1 - lam) * x[perm]
    logits = model(xm)
    ce = torch.nn.functional.cross_entropy
    ref = lam * ce(logits, y) + (1 - lam) * ce(logits, y[perm])
    ref.backward()
    assert abs(loss - ref.item()) < 1e-5
    state = be.get_state()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    want = models.to_params(model)
    worst = max(float(np.abs(state[k] - want[k]).max()) for k in want)
    assert worst < 1e-5


# ---- --train: partial fine-tuning ---------------------------------------------------------------
@pytest.mark.parametrize("train, split, name, npz, lr", [
    ("head", 1, "fp32", "r50_npz", 0.5),
    ("block3", 2, "fp32", "r50_npz", 0.5),
    # GradScaler's unscale and step see the trained only; at 0.5 the second step overflows.
    ("block3", 1, "fp16", "tame_npz", 0.1),
])
def test_partial_training_moves_the_trained_and_nothing_else(train, split, name, npz, lr,
                                                             request):
    """Two steps at a high learning rate (the file's head, so the backbone gets gradients from
    the first step): every frozen parameter and its momentum stay bit-identical and get no
    gradient at all (the backward pass stops at the first trained layer); every trained one
    moves."""
    if name != "fp32":
        request.getfixturevalue("mixed_on_cpu")
    be = make_backend(request.getfixturevalue(npz), batch_split=split, keep_head=True,
                      extra=["--train", train, "--precision", name])
    start = be.get_state()
    batch = first_batch(be)
    for _ in range(2):
        assert np.isfinite(be.train_step(batch, lr))
    state = be.get_state()
    trained = set(trainable.trained_keys(be.setup.params, train))
    assert trained and len(trained) < len(be.setup.params)
    for k in be.setup.params:
        p = be.params[models.param_name(k)]
        if k in trained:
            assert np.abs(state[k] - start[k]).max() > 0, k
            assert np.abs(state["momentum/" + k]).max() > 0, k
        else:
            np.testing.assert_array_equal(state[k], start[k], err_msg=k)
            assert not state["momentum/" + k].any(), k
            assert p.grad is None and not p.requires_grad, k
    if name == "fp16":
        assert precision.read_loss_scale(state) == (precision.LOSS_SCALE_INIT, 2)


# ---- mixed precision, run on the CPU ------------------------------------------------------------
# On a GPU the same code runs under CUDA autocast; here it runs under CPU autocast, so the step's
# logic (autocast, loss scaling, unscaling, skipped steps, the scale in the checkpoint) is tested
# on a machine without one.
# The update of every layer is compared with float32's on `tame_npz` (see conftest.py).


@pytest.fixture
def mixed_on_cpu(monkeypatch):
    monkeypatch.setattr(torch_backend, "mixed_precision_available", lambda device: True)


@pytest.fixture(scope="module")
def tame_fp32_step(tame_npz):
    be = make_backend(tame_npz, keep_head=True)
    start = be.get_state()
    loss = be.train_step(first_batch(be), 0.1)
    return start, loss, be.get_state()


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_mixed_precision_step_matches_float32(name, mixed_on_cpu, tame_npz, tame_fp32_step):
    start, loss32, s32 = tame_fp32_step
    be = make_backend(tame_npz, batch_split=2, extra=["--precision", name], keep_head=True)
    loss = be.train_step(first_batch(be), 0.1)
    state = be.get_state()
    assert abs(loss - loss32) < 0.02 * abs(loss32)
    for prefix in ("resnet/", "momentum/"):
        diff = update_difference(s32, state, start, prefix)
        print(f"{name} vs fp32, {prefix}: relative L2 of the update {diff:.1e}")
        assert diff < MIXED_UPDATE_TOLERANCE[name], prefix
    assert all(state[k].dtype == np.float32 for k in s32)  # parameters stay float32
    if name == "fp16":  # one finite step on the shared schedule, saved with the checkpoint
        assert state[precision.LOSS_SCALE] == precision.LOSS_SCALE_INIT
        assert state[precision.LOSS_SCALE_GOOD_STEPS] == 1
    else:
        assert precision.LOSS_SCALE not in state


def test_fp16_overflow_skips_the_step_and_the_scale_resumes(mixed_on_cpu, r50_npz):
    be = make_backend(r50_npz, extra=["--precision", "fp16"], keep_head=True)
    start = be.get_state()
    # 2**30 overflows float16's gradients (max 65504) but not float32's loss.
    be.set_state({**start, **precision.loss_scale_state(2.0 ** 30, 7)})
    loss = be.train_step(first_batch(be), 0.1)
    assert np.isfinite(loss)
    state = be.get_state()
    for k in start:
        if not k.startswith("loss_scale/"):
            np.testing.assert_array_equal(state[k], start[k], err_msg=k)  # nothing moved
    assert precision.read_loss_scale(state) == (2.0 ** 29, 0)
    # A fresh backend resumes the saved scale; at 2**10 the step is finite and moves the
    # weights, and as the 2000th finite step in a row it doubles the scale.
    again = make_backend(r50_npz, extra=["--precision", "fp16"], keep_head=True)
    again.set_state({**state, **precision.loss_scale_state(2.0 ** 10, 1999)})
    again.train_step(first_batch(again), 0.1)
    grown = again.get_state()
    assert precision.read_loss_scale(grown) == (2.0 ** 11, 0)  # 2000 finite steps: doubled
    assert max(float(np.abs(grown[k] - start[k]).max()) for k in start
               if k.startswith("resnet/")) > 1e-4


def test_fp16_run_saves_the_loss_scale_and_resumes_it(mixed_on_cpu, r50_npz, ckpt_dir, tmp_path):
    """Through the CLI: checkpoint.npz holds the scale and its count of finite steps, and the
    resumed run continues the count (a fresh scale would restart it at 0)."""
    argv = cli_args(ckpt_dir, tmp_path, "fp16", "--precision", "fp16", "--eval_every", "2")
    assert main(argv + ["--steps", "2"]) == 0
    state = load_state(tmp_path / "fp16/checkpoint.npz")
    assert precision.read_loss_scale(state) == (precision.LOSS_SCALE_INIT, 2)
    assert main(argv + ["--steps", "4"]) == 0
    state = load_state(tmp_path / "fp16/checkpoint.npz")
    assert precision.read_loss_scale(state) == (precision.LOSS_SCALE_INIT, 4)


# ---- errors through the CLI -------------------------------------------------------------------
BAD_INPUTS = {
    "split": (["--batch_split", "3"], "not divisible by --batch_split"),
    "model": (["--model", "BiT-M-R50x2"], "Unknown model"),
    "dataset": (["--dataset", "cifar11"], "Unknown dataset"),
    "few-shot": (["--examples_per_class", "1000"], "--examples_per_class 1000"),
    "precision": (["--precision", "bf16"], "--precision bf16 needs a GPU"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_clear_error(case, r50_npz, ckpt_dir, tmp_path, capsys):
    extra, message = BAD_INPUTS[case]
    if case == "precision" and torch.cuda.is_available():
        pytest.skip("bf16 is valid on a GPU")
    argv = cli_args(ckpt_dir, tmp_path, "bad", "--steps", "1") + extra  # later flags win
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "bad").exists()  # nothing written before the error


def test_bad_input_through_the_real_cli(r50_npz, ckpt_dir, tmp_path):
    """A subprocess proves it: one paragraph on stderr, no traceback, exit status 2."""
    proc = run_cli(cli_args(ckpt_dir, tmp_path, "bad", "--batch_split", "3"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert "not divisible by --batch_split" in proc.stderr
    assert not (tmp_path / "bad").exists()


# ---- two processes under DistributedDataParallel ------------------------------------------------
def test_ddp_two_processes_equal_one(r50_npz, r50_params, ckpt_dir, tmp_path):
    # 5 steps at a large base rate: the weights move by ~40 % of their norm.
    common = ["--steps", "5", "--base_lr", "10", "--batch_split", "2", "--batch_eval", "360"]
    assert main(cli_args(ckpt_dir, tmp_path, "one", *common)) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "bit_pytorch.train", *cli_args(ckpt_dir, tmp_path, "two", *common)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("[step 5] loss=") == 1  # only rank 0 prints
    one, two = load_state(tmp_path / "one/checkpoint.npz"), load_state(
        tmp_path / "two/checkpoint.npz")
    assert one.keys() == two.keys()
    start = {k: np.zeros_like(v) if "/head/" in k else v for k, v in r50_params.items()}
    diff = update_difference(one, two, start, "resnet/")
    print(f"DDP 2 processes vs 1: relative L2 of the update {diff:.2e}")
    assert diff <= UPDATE_TOLERANCE
    ma = runlog.read_metrics(tmp_path / "one/metrics.jsonl")
    mb = runlog.read_metrics(tmp_path / "two/metrics.jsonl")
    assert [(r["type"], r["step"]) for r in ma] == [(r["type"], r["step"]) for r in mb]
    la = [r["loss"] for r in ma if r["type"] == "train"]
    lb = [r["loss"] for r in mb if r["type"] == "train"]
    # The loss climbs at this rate, which amplifies the rounding of another reduction order.
    assert np.allclose(la[:3], lb[:3], rtol=1e-4) and np.allclose(la, lb, rtol=3e-2)
    assert json.loads((tmp_path / "two/config.json").read_text())["framework"] == "pytorch"


# ---- SIGTERM mid-run, with input workers --------------------------------------------------------
def test_sigterm_saves_and_the_rerun_finishes_identically(r50_npz, ckpt_dir, tmp_path):
    import signal

    argv = cli_args(ckpt_dir, tmp_path, "stopped", "--steps", "5", "--save_every", "100",
                    "--eval_every", "100", "--workers", "2")
    proc = subprocess.Popen([sys.executable, "-m", "bit_pytorch.train", *argv], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if "[step 1]" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    run = tmp_path / "stopped"
    with np.load(run / "checkpoint.npz") as f:
        stopped_at = int(f["meta/step"])
    assert 1 <= stopped_at < 5 and not (run / "model.npz").exists()
    assert main(argv[:-2] + ["--workers", "0"]) == 0  # resume (the worker count may change)
    assert main(cli_args(ckpt_dir, tmp_path, "straight", "--steps", "5", "--eval_every",
                         "100")) == 0
    a, b = load_state(run / "checkpoint.npz"), load_state(tmp_path / "straight/checkpoint.npz")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    steps = [r["step"] for r in runlog.read_metrics(run / "metrics.jsonl") if r["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5]
