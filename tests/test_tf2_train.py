"""bit_tf2.train: the CLI end to end on `digits`, resume, batch_split, 2 replicas, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bit_common import checkpoint, loop, precision, trainable
from bit_common.runlog import read_metrics
from conftest import (MIXED_UPDATE_TOLERANCE, UPDATE_TOLERANCE, metrics_scalars, run_setup,
                      tensorboard_scalars, update_difference)

tf = pytest.importorskip("tensorflow")
train = pytest.importorskip("bit_tf2.backend")
models = pytest.importorskip("bit_tf2.models")
main = pytest.importorskip("bit_tf2.train").main

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--dataset", "digits", "--batch", "8", "--resolution", "40", "32", "--eval_every", "2",
         "--workers", "1"]


def _argv(name: str, logdir: Path, weights: Path, *extra: str) -> list[str]:
    return ["--name", name, "--model", "BiT-M-R50x1", "--logdir", str(logdir),
            "--bit_pretrained_dir", str(weights), *QUICK, *extra]


def _cli(argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bit_tf2.train", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _max_diff(a: dict, b: dict, prefix: str = "") -> float:
    keys = [k for k in a if k.startswith(prefix) and not k.startswith("meta/")]
    assert sorted(keys) == sorted(k for k in b if k.startswith(prefix)
                                  and not k.startswith("meta/"))
    return max(float(np.abs(a[k] - b[k]).max()) for k in keys)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, r50_npz):
    """The required CLI run, in a fresh process: 4 steps, evaluation every 2."""
    logdir = tmp_path_factory.mktemp("tf2_runs")
    proc = _cli(_argv("straight", logdir, r50_npz.parent, "--steps", "4"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return logdir / "straight", proc


def test_cli_end_to_end(straight):
    run, proc = straight
    for name in ("train.log", "metrics.jsonl", "checkpoint.npz", "model.npz", "config.json"):
        assert (run / name).is_file(), name
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert 0 <= r["top1"] <= r["top5"] <= 1 and np.isfinite(r["loss"])
    train_losses = [r["loss"] for r in records if r["type"] == "train"]
    assert train_losses[0] == pytest.approx(np.log(10), abs=1e-5)  # zero head: uniform logits
    assert [r["lr"] for r in records if r["type"] == "train"] == pytest.approx(
        [0.0, 3e-5, 6e-5, 9e-5])
    config = json.loads((run / "config.json").read_text())
    assert config["framework"] == "tf2" and config["crop"] == 32
    state = _load(run / "checkpoint.npz")
    assert int(state["meta/step"]) == 4
    want = checkpoint.expected_shapes(checkpoint.infer_arch(state)[0], 10)
    assert {k: v.shape for k, v in state.items() if k.startswith("resnet/")} == want
    assert {k[len(loop.MOMENTUM_PREFIX):]: v.shape for k, v in state.items()
            if k.startswith(loop.MOMENTUM_PREFIX)} == want
    # model.npz is the released layout, loadable by the contract.
    m = models.load_npz(run / "model.npz")
    assert m.num_classes == 10
    assert "Traceback" not in proc.stderr


def test_resume_matches_straight_run(straight, tmp_path, r50_npz):
    """N/2 steps, then the same command with --steps N, equals N straight steps (<= 1e-6)."""
    run, _ = straight
    argv = _argv("halves", tmp_path, r50_npz.parent)
    assert main(argv + ["--steps", "2"]) == 0
    assert int(_load(tmp_path / "halves" / "checkpoint.npz")["meta/step"]) == 2
    assert main(argv + ["--steps", "4"]) == 0
    a, b = _load(run / "checkpoint.npz"), _load(tmp_path / "halves" / "checkpoint.npz")
    assert int(b["meta/step"]) == 4
    assert _max_diff(a, b, "resnet/") <= 1e-6
    assert _max_diff(a, b, loop.MOMENTUM_PREFIX) <= 1e-6
    assert _max_diff(_load(run / "model.npz"), _load(tmp_path / "halves" / "model.npz")) <= 1e-6
    ra = [r for r in read_metrics(run / "metrics.jsonl")]
    rb = [r for r in read_metrics(tmp_path / "halves" / "metrics.jsonl")]
    assert [(r["type"], r["step"]) for r in ra] == [(r["type"], r["step"]) for r in rb]
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    # TensorBoard reads the same losses from the two event files, one point per step.
    halves = tmp_path / "halves"
    assert tensorboard_scalars(halves)["train/loss"] == metrics_scalars(halves)["train/loss"]
    # A finished run does nothing when started again.
    assert main(argv + ["--steps", "4"]) == 0


# ---- one optimizer step, in process ---------------------------------------------------------
def _setup(weights_dir: Path, *extra: str) -> loop.RunSetup:
    """The CLI's set-up, keeping the file's non-zero head, so that every parameter gets a
    gradient."""
    return run_setup("tf2", *QUICK, *extra,
                     params=checkpoint.read_npz(weights_dir / "BiT-M-R50x1.npz"))


def _mixup_batch(setup: loop.RunSetup) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    b, crop = setup.config.batch, setup.crop
    half = b // 2  # partners inside each half, so the batch is valid for 1 and 2 replicas
    perm = np.concatenate([rng.permutation(half), half + rng.permutation(half)])
    return {"image": rng.uniform(-1, 1, (b, crop, crop, 3)).astype(np.float32),
            "label": rng.integers(0, 10, b).astype(np.int32),
            "mixup_lambda": np.float32(0.7), "mixup_perm": perm.astype(np.int32)}


def _close(a: dict, b: dict, prefix: str, tol: float = 1e-5) -> None:
    """Every array under `prefix` agrees to `tol`, relative to its scale when that exceeds 1."""
    for k in a:
        if k.startswith(prefix):
            scale = max(1.0, float(np.abs(a[k]).max()))
            assert float(np.abs(a[k] - b[k]).max()) <= tol * scale, k


@pytest.fixture(scope="module")
def backend(r50_npz):
    """One backend (batch 8, no split) shared by the step tests; each resets its state."""
    b = train.TF2Backend(_setup(r50_npz.parent))
    b.initial = b.get_state()
    return b


def test_batch_split_equivalence(backend, r50_npz):
    """One step of batch 8 in 4 micro-batches equals one step of batch 8 at once (the whole
    update to UPDATE_TOLERANCE relative L2; see `update_difference`)."""
    backend.set_state(backend.initial)
    batch = _mixup_batch(backend.setup)
    loss1 = backend.train_step(batch, 0.1)
    s1 = backend.get_state()
    split = train.TF2Backend(_setup(r50_npz.parent, "--batch_split", "4"))
    loss4 = split.train_step(batch, 0.1)
    s4 = split.get_state()
    assert loss1 == pytest.approx(loss4, abs=1e-5)
    assert _max_diff(s1, backend.initial, "resnet/") > 1e-3  # the step did move the weights
    for prefix in ("resnet/", loop.MOMENTUM_PREFIX):
        diff = update_difference(s1, s4, backend.initial, prefix)
        print(f"split 4 vs 1, {prefix}: relative L2 of the update {diff:.1e}")
        assert diff < UPDATE_TOLERANCE, prefix
    # The micro-batch loop runs one iteration at a time (else the forward passes of several
    # micro-batches are alive at once and splitting saves no memory).
    graph = split._step.get_concrete_function(split.distribute(batch),
                                              tf.constant(0.1)).graph.as_graph_def()
    loops = [n for f in graph.library.function for n in f.node_def
             if n.op in ("While", "StatelessWhile")]
    assert loops and all(n.attr["parallel_iterations"].i == 1 for n in loops)


def test_sgd_is_torch_sgd(backend):
    """buf = 0.9 buf + g; p -= lr buf, checked on the head against numpy over two steps."""
    backend.set_state(backend.initial)
    p0 = backend.initial
    batch = _mixup_batch(backend.setup)
    batch["mixup_lambda"] = np.float32(1.0)
    labels = np.eye(10)[batch["label"]]

    def head_grad(state):
        feats = models.embed(backend.model, batch["image"])
        logits = feats @ state[checkpoint.HEAD_KERNEL][0, 0] + state[checkpoint.HEAD_BIAS]
        prob = np.exp(logits - logits.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        loss = float(np.mean(-np.log((prob * labels).sum(1))))
        return loss, ((prob - labels) / len(labels)).sum(0)

    want_loss, g1 = head_grad(p0)
    loss = backend.train_step(batch, 0.1)
    assert loss == pytest.approx(want_loss, abs=1e-5)
    s1 = backend.get_state()
    bias, mom = checkpoint.HEAD_BIAS, loop.MOMENTUM_PREFIX + checkpoint.HEAD_BIAS
    np.testing.assert_allclose(s1[mom], g1, atol=1e-5)
    np.testing.assert_allclose(s1[bias], p0[bias] - 0.1 * g1, atol=1e-5)
    # Another lr: the buffer holds gradients, not lr-scaled steps (Keras' SGD would differ).
    _, g2 = head_grad(s1)
    backend.train_step(batch, 0.01)
    s2 = backend.get_state()
    np.testing.assert_allclose(s2[mom], 0.9 * g1 + g2, atol=1e-5)
    np.testing.assert_allclose(s2[bias], s1[bias] - 0.01 * (0.9 * g1 + g2), atol=1e-5)


@pytest.mark.parametrize("trained, split", [("head", "1"), ("block3", "2")])
def test_partial_training_moves_the_trained_and_nothing_else(r50_npz, trained, split):
    """Two steps at a high learning rate (the file's head, so the backbone gets gradients from
    the first step), through the micro-batch loop for block3: every frozen variable and its
    momentum are bit-identical to the start, every trained one has moved."""
    be = train.TF2Backend(_setup(r50_npz.parent, "--train", trained, "--batch_split", split))
    start = be.get_state()
    batch = _mixup_batch(be.setup)
    for _ in range(2):
        assert np.isfinite(be.train_step(batch, 0.5))
    state = be.get_state()
    keys = set(trainable.trained_keys(be.setup.params, trained))
    assert keys and len(keys) < len(be.setup.params)
    for k in be.setup.params:
        if k in keys:
            assert np.abs(state[k] - start[k]).max() > 0, k
            assert np.abs(state[loop.MOMENTUM_PREFIX + k]).max() > 0, k
        else:
            np.testing.assert_array_equal(state[k], start[k], err_msg=k)
            assert not state[loop.MOMENTUM_PREFIX + k].any(), k


# ---- mixed precision, run on the CPU -----------------------------------------------------------
# On a GPU the same programs run; here a patch lets the backend build them on the CPU, so the
# step's logic (the mixed policy, loss scaling, skipped steps, the scale in the checkpoint) is
# tested on a machine without one. Compared with float32 on `tame_npz` (conftest.py).
@pytest.fixture(scope="module")
def tame_fp32(backend, tame_npz):
    """The shared float32 backend's step from `tame_npz` on the first digits batch."""
    params = checkpoint.read_npz(tame_npz)
    start = loop.join_state(params, {k: np.zeros_like(v) for k, v in params.items()})
    backend.set_state(start)
    _, batch = next(backend.train_batches(0))
    loss = backend.train_step(batch, 0.1)
    return start, batch, loss, backend.get_state()


def _mixed_backend(tame_npz, name: str) -> train.TF2Backend:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "mixed_precision_available", lambda: True)
        be = train.TF2Backend(_setup(tame_npz.parent, "--precision", name, "--batch_split", "2"))
    assert be.model.dtype_policy.name == {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[name]
    return be


@pytest.fixture(scope="module")
def fp16_backend(tame_npz):
    return _mixed_backend(tame_npz, "fp16")


def _check_mixed_step(be: train.TF2Backend, name: str, tame_fp32) -> None:
    """One step of 2 micro-batches against float32's one, from the same state and batch."""
    start, batch, loss32, s32 = tame_fp32
    be.set_state(start)
    loss = be.train_step(batch, 0.1)
    state = be.get_state()
    assert loss == pytest.approx(loss32, rel=0.02)
    for prefix in ("resnet/", loop.MOMENTUM_PREFIX):
        diff = update_difference(s32, state, start, prefix)
        print(f"{name} vs fp32, {prefix}: relative L2 of the update {diff:.1e}")
        assert diff < MIXED_UPDATE_TOLERANCE[name], prefix
    assert all(state[k].dtype == np.float32 for k in s32)  # variables stay float32
    if name == "fp16":  # one finite step on the shared schedule, saved with the checkpoint
        assert precision.read_loss_scale(state) == (precision.LOSS_SCALE_INIT, 1)
    else:
        assert precision.LOSS_SCALE not in state


def test_fp16_step_matches_float32(fp16_backend, tame_fp32):
    _check_mixed_step(fp16_backend, "fp16", tame_fp32)


@pytest.mark.slow
def test_bf16_step_matches_float32(tame_npz, tame_fp32):
    _check_mixed_step(_mixed_backend(tame_npz, "bf16"), "bf16", tame_fp32)


def test_fp16_overflow_skips_the_step_and_the_scale_resumes(fp16_backend, tame_fp32):
    start, batch, _, _ = tame_fp32
    be = fp16_backend
    # 2**30 overflows float16's gradients (max 65504) but not float32's loss.
    be.set_state({**start, **precision.loss_scale_state(2.0 ** 30, 7)})
    assert np.isfinite(be.train_step(batch, 0.1))
    state = be.get_state()
    assert _max_diff(state, start, "resnet/") == 0 and _max_diff(state, start, "momentum/") == 0
    assert precision.read_loss_scale(state) == (2.0 ** 29, 0)
    # At 2**10 the step is finite and moves the weights; as the 2000th finite step in a row it
    # doubles the scale.
    be.set_state({**state, **precision.loss_scale_state(2.0 ** 10, 1999)})
    be.train_step(batch, 0.1)
    grown = be.get_state()
    assert precision.read_loss_scale(grown) == (2.0 ** 11, 0)
    assert _max_diff(grown, start, "resnet/") > 1e-4


@pytest.mark.slow
def test_two_replicas_equal_one(r50_npz, tmp_path):
    """The CPU split into 2 logical devices: a MirroredStrategy step equals the 1-device step."""
    code = f"""
        from conftest import update_difference
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import sys; sys.path.insert(0, {str(REPO / "tests")!r})
        from test_tf2_train import _setup, _mixup_batch
        from bit_tf2 import backend as train
        from pathlib import Path
        assert len(tf.config.list_logical_devices("CPU")) == 2
        setup = _setup(Path({str(r50_npz.parent)!r}), "--batch_split", "2")
        batch = _mixup_batch(setup)
        out = []
        start = None
        for strategy in (tf.distribute.OneDeviceStrategy("/cpu:0"), train.make_strategy()):
            backend = train.TF2Backend(setup, strategy=strategy)
            start = start or backend.get_state()
            loss = backend.train_step(batch, 0.1)
            out.append((backend.replicas, loss, backend.get_state()))
        (r1, a, s1), (r2, b, s2) = out
        print(r1, r2, abs(a - b), update_difference(s1, s2, start, "resnet/"),
              update_difference(s1, s2, start, "momentum/"))
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r1, r2, dl, dp, dm = proc.stdout.split()[-5:]
    assert (int(r1), int(r2)) == (1, 2)
    assert float(dl) <= 1e-5
    # Relative L2 of the whole update (see conftest.update_difference).
    assert float(dp) <= UPDATE_TOLERANCE and float(dm) <= UPDATE_TOLERANCE


# ---- bad input: one paragraph on stderr, exit 2, no traceback, nothing written ----------------
def test_bad_input_through_the_cli(tmp_path, r50_npz):
    proc = _cli(_argv("bad", tmp_path, r50_npz.parent, "--batch_split", "3"))
    assert proc.returncode == 2
    assert "not divisible by --batch_split" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()


def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_inputs(capsys, tmp_path, r50_npz, r50_params):
    weights = r50_npz.parent
    _fails(capsys, _argv("a", tmp_path, weights, "--model", "BiT-M-R50x2"), "Did you mean")
    _fails(capsys, _argv("a", tmp_path, weights, "--dataset", "digit"), "Unknown dataset")
    _fails(capsys, _argv("a", tmp_path, weights, "--examples_per_class", "1000"),
           "--examples_per_class 1000")
    # A file of another architecture, and a truncated one, under the expected name.
    other = tmp_path / "other"
    other.mkdir()
    (other / "BiT-M-R101x1.npz").write_bytes(r50_npz.read_bytes())
    _fails(capsys, _argv("a", tmp_path, other, "--model", "BiT-M-R101x1"), "R50x1", "R101x1")
    (other / "BiT-M-R50x1.npz").write_bytes(r50_npz.read_bytes()[:50_000])
    _fails(capsys, _argv("a", tmp_path, other), "BiT-M-R50x1.npz", "damaged or truncated .npz archive")
    bad = dict(r50_params)
    bad["resnet/block1/unit02/b/standardized_conv2d/kernel"] = np.zeros((3, 3, 64, 32),
                                                                         np.float32)
    np.savez(other / "BiT-M-R50x1.npz", **bad)
    _fails(capsys, _argv("a", tmp_path, other), "block1/unit02/b/standardized_conv2d/kernel",
           "(3, 3, 64, 32)", "(3, 3, 64, 64)")
    if not tf.config.list_physical_devices("GPU"):
        _fails(capsys, _argv("a", tmp_path, weights, "--precision", "bf16"), "needs a GPU")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root ignores permissions
            _fails(capsys, ["--name", "a", "--model", "BiT-M-R50x1", "--logdir", str(locked),
                            "--bit_pretrained_dir", str(weights), *QUICK], "not writable")
    finally:
        locked.chmod(0o700)
    assert not (tmp_path / "a").exists()


def test_a_lost_worker_is_described_by_its_telling_line():
    from bit_tf2.backend import _peer_detail
    message = ("Graph execution error:\n\nDetected at node CollectiveReduceV2 defined at (most "
               "recent call last):\n  File \"train.py\", line 3\n\nCollective ops is aborted by: "
               "UNAVAILABLE: failed to connect to all addresses\nAdditional GRPC error "
               "information ...")
    assert _peer_detail(message) == ("Collective ops is aborted by: UNAVAILABLE: failed to "
                                     "connect to all addresses")
    assert _peer_detail("Graph execution error:\n\nsomething else") == "Graph execution error:"
