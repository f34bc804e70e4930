"""RunLog: TensorBoard event files that say what metrics.jsonl says, also after a kill and a
resume, and a console pace that follows the wall clock."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bit_common import runlog
from bit_common.runlog import RunLog, read_metrics
from conftest import metrics_scalars, tensorboard_scalars

ROOT = Path(__file__).resolve().parent.parent
TAGS = {"train/loss", "train/lr", "train/img_per_s", "eval/loss", "eval/top1", "eval/top5"}
# A run of 5 steps that evaluates at 3 and 5, then is killed: nothing closed, no buffer written.
KILLED_RUN = """
import os, sys
from pathlib import Path
from bit_common.runlog import RunLog
log = RunLog(Path(sys.argv[1]))
for step in range(1, 6):
    log.train(step, 2.0 / step, 1e-3 * step, 8, 0.1 * step, 10)
    if step in (3, 5):
        log.eval(step, 0.1 * step, 0.15 * step, 1.0 / step)
os._exit(9)
"""


def _env() -> dict[str, str]:
    return {**os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_event_files_hold_the_metrics_after_a_kill_and_a_resume(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    # Flushed at each evaluation: the killed run's points are all readable.
    killed = tensorboard_scalars(tmp_path)
    assert set(killed) == TAGS
    assert killed == metrics_scalars(tmp_path)
    assert [s for s, _ in killed["train/loss"]] == [1, 2, 3, 4, 5]
    # Resumed from the checkpoint of step 3, with other values, so that each point tells which
    # run wrote it, and evaluating at 6 only: steps 4 and 5 of the killed run must be gone, and
    # its evaluation at 5, which no later point replaces (TensorBoard's Rust loader keeps such
    # a point where only a purge step would hide it).
    log = RunLog(tmp_path, resume_step=3, console=io.StringIO())
    for step in range(4, 7):
        log.train(step, 3.0 / step, 2e-3 * step, 8, 0.2 * step, 6)
    log.eval(6, 0.7, 0.8, 0.5)
    log.close()
    files = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 1  # rewritten from metrics.jsonl: no older file for a loader to misread
    got, want = tensorboard_scalars(tmp_path), metrics_scalars(tmp_path)
    assert got == want == tensorboard_scalars(files[0])
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert got["train/loss"][3] == (4, pytest.approx(3.0 / 4))
    assert [s for s, _ in got["eval/top1"]] == [3, 6]
    assert want["train/img_per_s"][:2] == [(1, 80.0), (2, 40.0)]  # 8 images / step_s


def test_a_failed_event_write_warns_once_and_training_goes_on(tmp_path, monkeypatch, capsys):
    def full(self, event):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runlog._tensorboardx().EventsWriter, "write_event", full)
    log = RunLog(tmp_path, console=io.StringIO())
    for step in range(1, 5):
        log.train(step, 1.0, 0.1, 8, 0.1, 4)
    log.eval(4, 0.5, 0.9, 1.0)
    log.close()
    err = capsys.readouterr().err
    assert err.count("warning: The TensorBoard event file cannot be written") == 1, err
    assert "No space left on device" in err
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 4]
    assert "No space left on device" in (tmp_path / "train.log").read_text()


def test_writing_events_does_not_import_pytorch(tmp_path):
    """tensorboardX imports PyTorch when it can; a JAX or TF2 run must not load it."""
    code = ("import sys\nfrom pathlib import Path\nfrom bit_common.runlog import RunLog\n"
            "log = RunLog(Path(sys.argv[1]), echo=False)\n"
            "log.train(1, 1.0, 0.1, 8, 0.1, 2)\nlog.close()\n"
            "print('torch' in sys.modules, 'tensorboardX' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["False", "True"], proc.stderr
    assert tensorboard_scalars(tmp_path)["train/loss"] == [(1, 1.0)]


def _seconds(hms: str) -> int:
    h, m, s = (int(x) for x in hms.split(":"))
    return 3600 * h + 60 * m + s


def test_the_console_pace_follows_the_wall_clock(tmp_path):
    """train_step stays at 0.1 s while each step comes to take 7 s of wall clock (the batch is
    late): the printed speed and ETA follow within a few steps, and metrics.jsonl keeps the
    step's own figure."""
    now, console, end = [0.0], io.StringIO(), 1000
    log = RunLog(tmp_path, console=console, clock=lambda: now[0])
    for step in range(1, 31):
        now[0] += 0.1 if step <= 20 else 7.0
        log.train(step, 1.0, 0.1, 8, 0.1, end)
    log.close()
    lines = re.findall(r"\[step (\d+)\] .* (\S+) img/s ETA (\S+)", console.getvalue())
    pace = {int(s): (speed, eta) for s, speed, eta in lines}
    assert pace[1] == ("?", "?")  # the first step only starts the clock
    assert float(pace[20][0]) == pytest.approx(80.0)
    assert abs(_seconds(pace[20][1]) - 0.1 * (end - 20)) <= 1
    for step, share in ((25, 0.8), (28, 0.9)):  # 5 and 8 steps after the change
        eta, rest = _seconds(pace[step][1]), 7.0 * (end - step)
        assert share * rest <= eta <= rest, (step, pace[step])
        assert 8 / 7.0 <= float(pace[step][0]) <= 8 / (share * 7.0)
    assert {r["img_per_s"] for r in read_metrics(tmp_path / "metrics.jsonl")} == {80.0}
