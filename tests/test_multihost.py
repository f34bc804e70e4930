"""Multi-process runs on localhost, started as the README's "Multi-GPU and multi-host" section
says: two JAX processes (`jax.distributed`) and two TF2 workers (`TF_CONFIG`) reach the weights of
one process; a killed process ends the others with the project's message, the checkpoint intact,
and the same command resumes (PyTorch through torchrun, JAX, TF2); only process 0 prints."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bit_common import runlog
from conftest import UPDATE_TOLERANCE, update_difference

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
       "TF_CPP_MIN_LOG_LEVEL": "2"}
SMALL = ["--model", "BiT-M-R50x1", "--dataset", "digits", "--batch", "8",
         "--resolution", "40", "32", "--workers", "0", "--batch_eval", "360",
         "--eval_every", "100"]
# Past the first steps at a large base rate, so that the weights move well beyond rounding.
MOVING = ["--steps", "5", "--base_lr", "10"]
PEER_LOST = "Another process of this multi-process run stopped"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(ckpt_dir: Path, logdir: Path, name: str, *flags: str) -> list[str]:
    return ["--name", name, "--logdir", str(logdir), "--bit_pretrained_dir", str(ckpt_dir),
            *SMALL, *flags]


def _processes(framework: str, argvs: list[list[str]]) -> list[tuple[list[str], dict]]:
    """The commands and environments of one run, process i with `argvs[i]`, as the README
    starts them: torchrun (one launcher), or one command per process for JAX and TF2."""
    port, n = _free_port(), len(argvs)
    workers = [f"localhost:{_free_port()}" for _ in range(n)]  # TF_CONFIG's cluster
    if framework == "pytorch":
        return [([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node", str(n), "-m", "bit_pytorch.train", *argvs[0]], ENV)]
    out = []
    for i, argv in enumerate(argvs):
        if framework == "jax":
            env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                   "JAX_NUM_PROCESSES": str(n), "JAX_PROCESS_ID": str(i)}
        else:
            env = {"TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                            "task": {"type": "worker", "index": i}})}
        out.append(([sys.executable, "-m", f"bit_{framework}.train", *argv], {**ENV, **env}))
    return out


def _start(framework: str, argvs: list[list[str]], logs: Path) -> list[subprocess.Popen]:
    """Start the run's processes, each writing stdout/stderr to logs/<i>.out and <i>.err."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, (cmd, env) in enumerate(_processes(framework, argvs)):
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, text=True,
                                      stdout=open(logs / f"{i}.out", "w"),
                                      stderr=open(logs / f"{i}.err", "w")))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()


def _run(framework: str, argvs: list[list[str]], logs: Path) -> list[int]:
    return _wait(_start(framework, argvs, logs), timeout=600)


def _text(logs: Path, i: int, stream: str) -> str:
    return (logs / f"{i}.{stream}").read_text()


def _weights(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files if not k.startswith("meta/")}


def _start_weights(r50_params: dict) -> dict[str, np.ndarray]:
    """The weights fine-tuning starts from: the file's, with the zero head."""
    return {k: np.zeros_like(v) if "/head/" in k else v for k, v in r50_params.items()}


# ---- two processes reach the weights of one ---------------------------------------------------
@pytest.mark.parametrize("framework", ["jax", "tf2"])
def test_two_processes_equal_one(framework, r50_npz, r50_params, ckpt_dir, tmp_path):
    """Process 1 gets its own --logdir: only process 0 writes, and a rerun that finds the
    checkpoint in one process's folder but not in the other's stops every process at once."""
    one, two, other = tmp_path / "one", tmp_path / "two", tmp_path / "other"
    assert _run(framework, [_argv(ckpt_dir, one, "run", *MOVING)], tmp_path / "logs1") == [0]
    argvs = [_argv(ckpt_dir, two, "run", *MOVING), _argv(ckpt_dir, other, "run", *MOVING)]
    codes = _run(framework, argvs, tmp_path / "logs2")
    assert codes == [0, 0], _text(tmp_path / "logs2", 0, "err")[-3000:]
    assert not (other / "run").exists()  # process 1 wrote no run folder
    assert "[step 5]" in _text(tmp_path / "logs2", 0, "out")
    assert "[step" not in _text(tmp_path / "logs2", 1, "out")  # only process 0 prints

    start = _start_weights(r50_params)
    a, b = _weights(one / "run/checkpoint.npz"), _weights(two / "run/checkpoint.npz")
    assert a.keys() == b.keys()
    keys = [k for k in start if k.startswith("resnet/")]
    moved = np.sqrt(sum(np.sum((a[k] - start[k]) ** 2) for k in keys)
                    / sum(np.sum(start[k] ** 2) for k in keys))
    diff = update_difference(a, b, start, "resnet/")
    print(f"{framework}: 2 processes vs 1, relative L2 of the update {diff:.2e}")
    assert moved > 0.01 and diff <= UPDATE_TOLERANCE
    zero_momentum = {k: np.zeros_like(v) for k, v in a.items() if k.startswith("momentum/")}
    assert update_difference(a, b, zero_momentum, "momentum/") <= UPDATE_TOLERANCE
    la = [r["loss"] for r in runlog.read_metrics(one / "run/metrics.jsonl") if r["type"] == "train"]
    lb = [r["loss"] for r in runlog.read_metrics(two / "run/metrics.jsonl") if r["type"] == "train"]
    # At this rate the loss climbs (to ~50 by step 5), which amplifies the rounding of another
    # reduction order: the first steps agree closely, the later ones to a percent or two.
    assert len(la) == len(lb) == 5 and np.allclose(la[:3], lb[:3], rtol=1e-4)
    assert np.allclose(la, lb, rtol=3e-2)

    longer = [a + ["--steps", "6"] for a in argvs]  # process 0 finds its checkpoint, 1 does not
    codes = _run(framework, longer, tmp_path / "logs3")
    assert codes == [2, 2]
    for i in (0, 1):
        err = _text(tmp_path / "logs3", i, "err")
        assert "found a checkpoint" in err and "shared file system" in err and "Traceback" not in err
    assert int(np.load(two / "run/checkpoint.npz")["meta/step"]) == 5  # untouched


# ---- a process killed mid-run ---------------------------------------------------------------------
def _rank1_pid(launcher: subprocess.Popen) -> int:
    """torchrun's child process of rank 1."""
    out = subprocess.run(["ps", "--ppid", str(launcher.pid), "-o", "pid="],
                         capture_output=True, text=True).stdout.split()
    for pid in map(int, out):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"RANK=1" in env:
            return pid
    raise AssertionError(f"no rank-1 child among {out}")


@pytest.mark.parametrize("framework", ["pytorch", "jax", "tf2"])
def test_a_killed_process_ends_the_run_cleanly_and_the_same_command_resumes(
        framework, r50_npz, ckpt_dir, tmp_path):
    logdir, logs = tmp_path / "shared", tmp_path / "logs"
    argv = _argv(ckpt_dir, logdir, "run", "--steps", "8", "--save_every", "1")
    procs = _start(framework, [argv, argv], logs)
    try:
        out0 = logs / "0.out"
        while "[step 3]" not in out0.read_text():
            assert all(p.poll() is None for p in procs), _text(logs, 0, "err")[-3000:]
            time.sleep(0.2)
        victim = _rank1_pid(procs[0]) if framework == "pytorch" else procs[1].pid
        os.kill(victim, signal.SIGKILL)
        # JAX's own heartbeat timeout would end the survivor after 100 s, with a fatal log.
        code = procs[0].wait(timeout=60)
    finally:
        for p in procs:
            p.kill()
    assert code != 0
    err = _text(logs, 0, "err")
    assert PEER_LOST in err, err[-3000:]
    if framework != "pytorch":  # torchrun prints its own report of the lost rank after ours
        assert "Traceback" not in err, err[-3000:]
    run = logdir / "run"
    with np.load(run / "checkpoint.npz") as f:  # intact: every array reads
        saved = int(f["meta/step"])
        assert all(f[k].size for k in f.files if not k.startswith("meta/"))
    assert 3 <= saved < 8

    codes = _run(framework, [argv, argv], tmp_path / "logs_resumed")
    assert codes == [0] * len(codes), _text(tmp_path / "logs_resumed", 0, "err")[-3000:]
    printed = _text(tmp_path / "logs_resumed", 0, "out")
    assert f"steps {saved}->8" in printed and "(resumed)" in printed
    # Only process 0 prints (torchrun gathers both ranks' output in one stream).
    assert printed.count("[step 8] loss=") == 1
    if framework != "pytorch":
        assert "[step" not in _text(tmp_path / "logs_resumed", 1, "out")
    steps = [r["step"] for r in runlog.read_metrics(run / "metrics.jsonl") if r["type"] == "train"]
    assert steps == list(range(1, 9))
