"""Fault injection through the three `train` CLIs: signals, kill -9 mid-write, corrupt files,
bad input, non-finite loss, determinism.

Bad input and corrupt checkpoints are checked for every framework in the default suite (they
fail before anything compiles). The runs that train are in the default suite for PyTorch and
behind the `slow` marker for JAX and TF2, whose first step compiles for ~20 s each; the same
shared loop (bit_common.loop) is also covered by tests/test_common_loop.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bit_common import checkpoint, loop
from bit_common.runlog import read_metrics

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("pytorch", "jax", "tf2")
TRAINING = [pytest.param("pytorch"), pytest.param("jax", marks=pytest.mark.slow),
            pytest.param("tf2", marks=pytest.mark.slow)]


def flags(logdir: Path, weights: Path, name: str, steps: int, *extra: str) -> list[str]:
    return ["--name", name, "--model", "BiT-M-R50x1", "--logdir", str(logdir),
            "--bit_pretrained_dir", str(weights), "--dataset", "digits", "--batch", "4",
            "--resolution", "36", "32", "--examples_per_class", "2", "--workers", "1",
            "--batch_eval", "120", "--base_lr", "0.1", "--steps", str(steps), *extra]


# `python -m bit_<argv[1]>.train argv[2:]`, SIGKILLed in the middle of its second checkpoint
# write (after the data, before the fsync and the rename), as a power cut or `kill -9` would.
KILLED_IN_SECOND_WRITE = """
import importlib, os, signal, sys
from bit_common import checkpoint
writes = []
def die_in_second_write(f):
    writes.append(f)
    if len(writes) == 2:
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    durable(f)
durable, checkpoint._make_durable = checkpoint._make_durable, die_in_second_write
sys.exit(importlib.import_module(f"bit_{sys.argv[1]}.train").main(sys.argv[2:]))
"""


def cli(framework: str, argv: list[str], killed_in_second_write: bool = False,
        **kw) -> subprocess.Popen:
    environ = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT)}
    program = (["-c", KILLED_IN_SECOND_WRITE, framework] if killed_in_second_write
               else ["-m", f"bit_{framework}.train"])
    return subprocess.Popen([sys.executable, *program, *argv], cwd=ROOT, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run(framework: str, argv: list[str], killed_in_second_write: bool = False
        ) -> tuple[int, str]:
    proc = cli(framework, argv, killed_in_second_write)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def state(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / loop.CHECKPOINT) as f:
        return {k: f[k] for k in f.files if k != "meta/config"}


def assert_same_state(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    assert worst <= tol, worst


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, r50_npz):
    """An uninterrupted 6-step run per framework, made on first use."""
    logdir, done = tmp_path_factory.mktemp("reference"), {}

    def get(framework: str) -> Path:
        if framework not in done:
            code, err = run(framework, flags(logdir, r50_npz.parent, framework, 6))
            assert code == 0, err[-3000:]
            done[framework] = logdir / framework
        return done[framework]
    return get


TOLERANCE = {"pytorch": 0.0, "jax": 1e-6, "tf2": 1e-6}


@pytest.mark.parametrize("framework", TRAINING)
def test_sigterm_mid_run_then_resume_equals_an_uninterrupted_run(framework, tmp_path, r50_npz,
                                                                 reference):
    argv = flags(tmp_path, r50_npz.parent, "sig", 6)
    proc = cli(framework, argv)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not any(
            s >= 2 for s in train_steps(tmp_path / "sig") or [0]):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = int(state(tmp_path / "sig")["meta/step"])
    assert 2 <= stopped <= 6 and metrics.exists()
    code, err = run(framework, argv)
    assert code == 0, err[-3000:]
    assert_same_state(state(tmp_path / "sig"), state(reference(framework)), TOLERANCE[framework])
    assert train_steps(tmp_path / "sig") == [1, 2, 3, 4, 5, 6]  # no gaps, no duplicates
    if framework == "pytorch":  # determinism: the same losses as the uninterrupted run
        losses = [r["loss"] for r in read_metrics(metrics) if r["type"] == "train"]
        assert losses == [r["loss"] for r in read_metrics(reference(framework) / "metrics.jsonl")
                          if r["type"] == "train"]


@pytest.mark.parametrize("framework", TRAINING)
def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(framework, tmp_path, r50_npz,
                                                                 reference):
    argv = flags(tmp_path, r50_npz.parent, "kill", 6, "--save_every", "3")
    code, _ = run(framework, argv, killed_in_second_write=True)
    assert code == -signal.SIGKILL
    run_dir = tmp_path / "kill"
    assert int(state(run_dir)["meta/step"]) == 3  # the step-6 write died; step 3 is intact
    assert list(run_dir.glob(".checkpoint.npz.*.tmp"))  # the torn write is there...
    code, err = run(framework, argv)
    assert code == 0, err[-3000:]
    assert not list(run_dir.glob(".*.tmp"))  # ...and cleaned up by the resumed run
    assert_same_state(state(run_dir), state(reference(framework)), TOLERANCE[framework])


@pytest.mark.parametrize("framework", TRAINING)
def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(framework, tmp_path,
                                                                           r50_npz):
    code, err = run(framework, flags(tmp_path, r50_npz.parent, "nan", 8, "--base_lr", "1e30",
                                     "--save_every", "1"))
    assert code == 2 and "The training loss became" in err and "Traceback" not in err
    bad_step = int(err.split("at step ")[1].split()[0])
    saved = state(tmp_path / "nan")
    assert int(saved["meta/step"]) == bad_step - 1
    assert not (tmp_path / "nan" / loop.FINAL_MODEL).exists()


# ---- failures before training: every framework, in-process through its CLI entry point ------
def framework(name: str):
    import importlib
    return importlib.import_module(f"bit_{name}.train").FRAMEWORK


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, r50_params):
    root = tmp_path_factory.mktemp("bad_weights")
    files = {}
    other = root / "other"
    checkpoint.write_random_checkpoint(other / "BiT-M-R50x1.npz", "R101x1", 10)
    files["other architecture"] = other
    trunc = root / "truncated"
    trunc.mkdir()
    np.savez(trunc / "full.npz", **r50_params)
    (trunc / "BiT-M-R50x1.npz").write_bytes((trunc / "full.npz").read_bytes()[:5_000_000])
    files["truncated"] = trunc
    missing = root / "missing"
    missing.mkdir()
    np.savez(missing / "BiT-M-R50x1.npz",
             **{k: v for k, v in r50_params.items() if "block4/unit03" not in k})
    files["missing keys"] = missing
    return files


BAD_INPUT = [
    ("other architecture", [], "holds a R101x1, but a R50x1 was asked for"),
    ("truncated", [], "is a damaged or truncated .npz archive"),
    ("missing keys", [], "missing key(s), first 'resnet/block4/unit03/a/group_norm/gamma'"),
    (None, ["--model", "BiT-M-R50"], "Unknown model 'BiT-M-R50'. Did you mean: BiT-M-R50x3, BiT-M-R50x1"),
    (None, ["--dataset", "cifar"], "Did you mean: cifar10"),
    (None, ["--examples_per_class", "500"], "more examples than class"),
    (None, ["--batch", "6", "--batch_split", "4"], "not divisible by --batch_split 4"),
]


@pytest.mark.parametrize("framework_name", FRAMEWORKS)
def test_bad_input_is_one_paragraph_exit_2_and_writes_nothing(framework_name, tmp_path, r50_npz,
                                                              bad_files, capsys):
    for weights, extra, message in BAD_INPUT:
        wdir = bad_files[weights] if weights else r50_npz.parent
        argv = flags(tmp_path / "logs", wdir, "bad", 2) + extra
        assert loop.main(framework(framework_name), argv) == 2, (weights, extra)
        err = capsys.readouterr().err
        assert message in err, (message, err)
        assert err.startswith("error: ") and err.count("\n") == 1  # one paragraph
        assert not (tmp_path / "logs" / "bad").exists()


@pytest.mark.parametrize("framework_name", FRAMEWORKS)
def test_unwritable_logdir_and_corrupt_checkpoint(framework_name, tmp_path, r50_npz, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = flags(blocker / "logs", r50_npz.parent, "x", 2)
    assert loop.main(framework(framework_name), argv) == 2
    assert "Cannot create --logdir" in capsys.readouterr().err
    run_dir = tmp_path / "logs" / "x"
    run_dir.mkdir(parents=True)
    (run_dir / loop.CHECKPOINT).write_bytes(b"\x00" * 100)
    assert loop.main(framework(framework_name), flags(tmp_path / "logs", r50_npz.parent, "x",
                                                      2)) == 2
    err = capsys.readouterr().err
    assert str(run_dir / loop.CHECKPOINT) in err and "left untouched" in err
    assert "is not an .npz archive" in err and "pickle" not in err
    assert (run_dir / loop.CHECKPOINT).read_bytes() == b"\x00" * 100
    assert sorted(p.name for p in run_dir.iterdir()) == [loop.CHECKPOINT]


def image_folder(root: Path, classes=("a", "b"), per_class: int = 2) -> Path:
    """root/train/<class>/ and root/val/<class>/ with `per_class` 20x20 PNGs each."""
    from PIL import Image
    for split in ("train", "val"):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    return root


def folder_flags(logdir: Path, weights: Path, datadir: Path, *extra: str) -> list[str]:
    return ["--name", "img", "--model", "BiT-M-R50x1", "--logdir", str(logdir),
            "--bit_pretrained_dir", str(weights), "--dataset", "imagefolder",
            "--datadir", str(datadir), "--batch", "4", "--resolution", "36", "32",
            "--workers", "1", *extra]


@pytest.mark.parametrize("framework_name", FRAMEWORKS)
def test_a_broken_evaluation_split_fails_before_the_first_step(framework_name, tmp_path, r50_npz,
                                                                capsys):
    """An empty class folder in val/: the run stops at once, not at its first evaluation after
    training (both splits are loaded before the first step), and writes nothing."""
    data = image_folder(tmp_path / "data")
    empty = data / "val" / "b"
    for f in empty.iterdir():
        f.unlink()
    argv = folder_flags(tmp_path / "logs", r50_npz.parent, data, "--steps", "30",
                        "--eval_every", "1000")
    assert loop.main(framework(framework_name), argv) == 2
    out, err = capsys.readouterr()
    assert f"Class folder {empty} holds no readable images" in err and "Traceback" not in err
    assert "[step" not in out
    assert not (tmp_path / "logs" / "img").exists()


def jpeg_bytes(seed: int = 0) -> bytes:
    """A 40x40 JPEG of noise (about 1.6 kB, its header about 600 bytes)."""
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), np.uint8)).save(
        buf, format="JPEG")
    return buf.getvalue()


BROKEN_HEADER = b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(2000)  # magic, then noise
CUT_IN_ITS_DATA = jpeg_bytes()[:900]  # a whole header: found only by decoding


@pytest.mark.parametrize("framework_name", FRAMEWORKS)
def test_an_image_that_does_not_decode_is_one_line_and_writes_nothing(framework_name, tmp_path,
                                                                      r50_npz):
    """Through the command as users run it, the frameworks' own logging included: a file whose
    header is broken (found when the folder is listed) and one cut inside its data (found by the
    first batch, before the run folder is written) each end the run with one line, exit 2."""
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    for name, content in (("noise.jpg", BROKEN_HEADER), ("cut.jpg", CUT_IN_ITS_DATA)):
        data = image_folder(tmp_path / name)
        bad = data / "train" / "a" / name
        bad.write_bytes(content)
        argv = folder_flags(tmp_path / "logs", r50_npz.parent, data, "--batch", "10", "--steps",
                            "1")
        proc = subprocess.run([sys.executable, "-m", f"bit_{framework_name}.train", *argv],
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.startswith(f"error: Cannot decode image {bad} ("), proc.stderr
        assert proc.stderr.count("\n") == 1 and "--skip_bad_images" in proc.stderr
        assert not (tmp_path / "logs" / "img").exists()


@pytest.mark.parametrize("framework", TRAINING)
def test_an_image_that_fails_in_a_resumed_run_keeps_its_checkpoint(framework, tmp_path, r50_npz):
    """A file damaged after the run started: the run stops with the one message, the checkpoint
    and the logs stay as they were, and once the file is replaced the same command resumes."""
    data = image_folder(tmp_path / "data")
    victim = data / "train" / "a" / "0.png"
    original = victim.read_bytes()
    argv = folder_flags(tmp_path / "logs", r50_npz.parent, data, "--steps", "1")
    code, err = run(framework, argv)
    assert code == 0, err[-3000:]
    run_dir = tmp_path / "logs" / "img"
    before = {f: (run_dir / f).read_bytes() for f in (loop.CHECKPOINT, "metrics.jsonl")}
    victim.write_bytes(original[:len(original) - 20])  # cut inside its compressed data
    argv = folder_flags(tmp_path / "logs", r50_npz.parent, data, "--steps", "2")
    code, err = run(framework, argv)
    assert code == 2 and f"error: Cannot decode image {victim} (" in err, err[-3000:]
    assert "Traceback" not in err
    assert {f: (run_dir / f).read_bytes() for f in before} == before
    victim.write_bytes(original)
    code, err = run(framework, argv)
    assert code == 0, err[-3000:]
    assert train_steps(run_dir) == [1, 2]


@pytest.mark.parametrize("framework_name", FRAMEWORKS)
def test_skip_bad_images_leaves_out_the_same_files(framework_name, tmp_path, r50_npz, capsys):
    from bit_common import cli
    data = image_folder(tmp_path / "data")
    (data / "train" / "a" / "noise.jpg").write_bytes(BROKEN_HEADER)
    (data / "train" / "b" / "cut.jpg").write_bytes(CUT_IN_ITS_DATA)
    (data / "val" / "a" / "cut.jpg").write_bytes(CUT_IN_ITS_DATA)
    argv = folder_flags(tmp_path / "logs", r50_npz.parent, data, "--skip_bad_images")
    fw = framework(framework_name)
    setup = loop.make_setup(cli.build_parser(framework_name).parse_args(argv), fw)
    assert [Path(p).relative_to(data / "train").as_posix() for p in setup.train.paths] == \
        ["a/0.png", "a/1.png", "b/0.png", "b/1.png"]
    assert len(setup.eval) == 4 and setup.train.labels.tolist() == [0, 0, 1, 1]
    err = capsys.readouterr().err
    assert err.count("warning: leaving out") == 3 and "left out 1 image(s) of the training" in err
    argv = folder_flags(tmp_path / "logs", r50_npz.parent, data, "--verify_images")
    (data / "train" / "a" / "noise.jpg").unlink()
    with pytest.raises(loop.DataError, match=f"Cannot decode image {data / 'train/b/cut.jpg'}"):
        loop.make_setup(cli.build_parser(framework_name).parse_args(argv), fw)


@pytest.mark.parametrize("framework_name", FRAMEWORKS)
def test_flag_errors_come_before_the_framework_is_imported(framework_name, tmp_path):
    """A flag error is answered before PyTorch, JAX or TensorFlow is imported (no start-up
    time, none of their logging), in one line, exit 2."""
    code = ("import sys, importlib\n"
            f"main = importlib.import_module('bit_{framework_name}.train').main\n"
            "rc = main(sys.argv[1:])\n"
            "print([m for m in ('torch', 'jax', 'tensorflow') if m in sys.modules])\n"
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *flags(tmp_path, tmp_path, "x", 2),
                           "--batch", "0"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2 and proc.stdout.strip() == "[]"
    assert proc.stderr == "error: --batch (0) and --batch_split (1) must be positive.\n"
