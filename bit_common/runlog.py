"""Run logging: a human `train.log`, a machine-readable `metrics.jsonl` and a TensorBoard event
file, the same in all three frameworks.

metrics.jsonl holds one JSON object per line:
  {"type": "train", "step": 12, "loss": 2.31, "lr": 0.00033, "img_per_s": 41.2, "time": ...}
  {"type": "eval", "step": 100, "top1": 0.91, "top5": 0.99, "loss": 0.35, "time": ...}
`step` counts the optimizer steps completed when the record was written; a train record's `lr`
is the learning rate its update used; `time` is seconds since the epoch. A train record's
`img_per_s` is that one step's figure: the global batch divided by the wall-clock duration of
its `train_step` call (forward, backward and update, until the loss is back on the host), so
waiting for the batch, evaluation and checkpoints are left out of it.

The run folder's TensorBoard event file (`events.out.tfevents.*`) holds the same values at the
same steps, under the tags `train/loss`, `train/lr`, `train/img_per_s`, `eval/loss`, `eval/top1`
and `eval/top5`. Each run of the command writes a new one, starting with the records
metrics.jsonl keeps (those up to the step it resumes from), and deletes the old one: the points
an interrupted run wrote after its checkpoint are gone from both. TensorBoard's own mechanism, a
restart marker (SessionLog.START, "purge_step") that hides an older file's later points, is not
enough: the default loader of `tensorboard --logdir` (its Rust data server) ignores it, and
would keep an interrupted run's last evaluation whenever the resumed run does not evaluate at
that step again. The new file still starts with such a marker (at step 1), for the Python loader
should an old file survive.

The console line (and train.log) shows the speed and ETA of the wall clock instead: the time
between consecutive steps, waiting for data and evaluations included, smoothed as tqdm smooths
its rate (an exponential moving average), so it follows a change of pace within a few steps.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

TRAIN_FIELDS = ("step", "loss", "lr", "img_per_s")
EVAL_FIELDS = ("step", "top1", "top5", "loss")
# Weight of the newest step in the console's pace (tqdm's default smoothing): after the pace
# changes, the estimate has covered 83 % of the change in 5 steps and 94 % in 8.
SMOOTHING = 0.3
# Event files are flushed at every evaluation, at the end, and at least this often in between,
# so a running TensorBoard follows the run and a killed run leaves its points readable.
FLUSH_SECS = 10.0
EVENTS_GLOB = "events.out.tfevents.*"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a torn last line from a crash is ignored)."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Drop records after `last_step` (written after the checkpoint a resumed run starts from);
    the records kept."""
    if not path.exists():
        return []
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    tmp.replace(path)
    return keep


class RunLog:
    """Writes train.log, metrics.jsonl, the event file and the console; only the chief process
    writes files, and with `echo` False (the other processes of a multi-process run) nothing is
    printed. `clock` (seconds, monotonic) times the console's pace."""

    def __init__(self, run_dir: Path | None, resume_step: int = 0,
                 console: TextIO | None = None, echo: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.console = (console or sys.stdout) if echo else None
        self._echo = echo
        self._log = self._metrics = self._events = None
        self._pace = _Pace(clock)
        if run_dir is not None:
            kept = truncate_metrics(run_dir / "metrics.jsonl", resume_step)
            self._log = open(run_dir / "train.log", "a", buffering=1)
            self._metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)
            self._events = _EventFile(run_dir, kept, self._warn)

    def info(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        if self.console:
            print(line, file=self.console, flush=True)
        if self._log:
            self._log.write(line + "\n")

    def _warn(self, msg: str) -> None:
        if self._echo:
            print(f"warning: {msg}", file=sys.stderr, flush=True)
        if self._log:
            self._log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} warning: {msg}\n")

    def _record(self, kind: str, step: int, flush: bool = False, **fields: float) -> None:
        now = round(time.time(), 3)
        if self._metrics:
            rec = {"type": kind, "step": step, **fields, "time": now}
            self._metrics.write(json.dumps(rec) + "\n")
        if self._events:
            self._events.add(kind, step, fields, now, flush=flush)

    def train(self, step: int, loss: float, lr: float, images: int, step_s: float,
              end_step: int) -> None:
        """Log optimizer step `step` (of `end_step`), which trained on `images` images in a
        `train_step` call of `step_s` seconds."""
        self._record("train", step, loss=loss, lr=lr, img_per_s=round(images / step_s, 2))
        pace = self._pace.tick(step)  # wall-clock seconds per step; None at the first step
        speed, eta = (("?", "?") if pace is None else
                      (f"{images / pace:.1f}", _hms(pace * (end_step - step))))
        self.info(f"[step {step}] loss={loss:.5f} lr={lr:.3e} {speed} img/s ETA {eta}")

    def eval(self, step: int, top1: float, top5: float, loss: float, **more: float) -> None:
        """An evaluation's top-1, top-5 and mean loss, and any further metrics (distillation's
        agreement with the teacher), under the tags eval/<name>."""
        self._record("eval", step, flush=True, top1=top1, top5=top5, loss=loss, **more)
        extra = "".join(f" {k}={v:.5g}" for k, v in more.items())
        self.info(f"[step {step}] eval: top1={top1:.2%} top5={top5:.2%} loss={loss:.5f}{extra}")

    def close(self) -> None:
        if self._events:
            self._events.close()
        for f in (self._log, self._metrics):
            if f:
                f.close()


class _Pace:
    """Wall-clock seconds per step: an exponential moving average of the time between
    consecutive ticks, bias-corrected as tqdm's (the first interval counts fully).

    The first tick only starts the clock: the time before it is start-up and compilation."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._last: tuple[float, int] | None = None  # (time, step) of the last tick
        self._mean = self._weight = 0.0  # the average, and its weight 1 - (1 - SMOOTHING)^n

    def tick(self, step: int) -> float | None:
        """Step `step` is done now: the seconds per step so far (None at the first tick)."""
        now, last = self._clock(), self._last
        self._last = (now, step)
        if last is not None and step > last[1]:
            per_step = (now - last[0]) / (step - last[1])
            self._mean = SMOOTHING * per_step + (1 - SMOOTHING) * self._mean
            self._weight = SMOOTHING + (1 - SMOOTHING) * self._weight
        return self._mean / self._weight if self._weight else None


class _EventFile:
    """The run folder's event file, rewritten at the start from the records metrics.jsonl kept
    (each at its record's step and time), then appended to.

    Written in the caller's thread with tensorboardX's plain writer rather than its
    SummaryWriter, which hands events to a thread through a queue: there, flush() leaves queued
    events unwritten, and a failed write ends the thread, after which the tenth event blocks
    training for good. A failure here is reported once; training goes on without the file.
    """

    def __init__(self, run_dir: Path, records: list[dict[str, Any]],
                 warn: Callable[[str], None]):
        self._run_dir, self._warn = run_dir, warn
        self._writer: Any = None
        self._failed = False
        try:
            self._open(records)
        except Exception as e:
            self._fail(e)
        self._flushed = time.monotonic()

    def _open(self, records: list[dict[str, Any]]) -> None:
        tbx = _tensorboardx()
        old = list(self._run_dir.glob(EVENTS_GLOB))
        # Named events.out.tfevents.<s>.<host>.<ns>.<pid>: TensorBoard reads a folder's files in
        # name order, and the nanoseconds keep two files of one second in order, so that, should
        # an old file outlive this one's start, this one and its restart marker come after it.
        self._writer = tbx.EventsWriter(str(self._run_dir / "events"),
                                        f".{time.time_ns()}.{os.getpid()}")
        self._writer.write_event(tbx.Event(
            wall_time=time.time(), step=1,
            session_log=tbx.SessionLog(status=tbx.SessionLog.START)))
        for r in records:
            self._write(r["type"], r["step"], {k: v for k, v in r.items()
                                               if k not in ("type", "step", "time")},
                        r.get("time", time.time()))
        self._writer.flush()
        for path in old:
            path.unlink()

    def _write(self, kind: str, step: int, values: Mapping[str, float], wall_time: float) -> None:
        tbx = _tensorboardx()
        summary = tbx.Summary(value=[tbx.Summary.Value(tag=f"{kind}/{k}", simple_value=v)
                                     for k, v in values.items()])
        self._writer.write_event(tbx.Event(wall_time=wall_time, step=step, summary=summary))

    def add(self, kind: str, step: int, values: Mapping[str, float], wall_time: float,
            flush: bool) -> None:
        if self._failed:
            return
        try:
            self._write(kind, step, values, wall_time)
            if flush or time.monotonic() - self._flushed >= FLUSH_SECS:
                self._writer.flush()
                self._flushed = time.monotonic()
        except Exception as e:  # disk full, a folder gone: never fatal
            self._fail(e)

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as e:
                if not self._failed:
                    self._fail(e)
        self._writer = None

    def _fail(self, e: Exception) -> None:
        self._failed = True
        self._warn(f"The TensorBoard event file cannot be written to {self._run_dir} "
                   f"({type(e).__name__}: {e}); training goes on without them, and "
                   f"metrics.jsonl and train.log are complete.")


@functools.cache
def _tensorboardx() -> types.SimpleNamespace:
    """tensorboardX's event writer and protos, imported when a run folder's log opens. Its
    package imports PyTorch whenever it is installed (for SummaryWriter's tensors, unused here),
    which would load a second framework into a JAX or TF2 run (3 s and 500 MB here, against
    0.4 s and 20 MB without): PyTorch is hidden while tensorboardX is imported, unless loaded."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError
    try:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import Summary
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return types.SimpleNamespace(EventsWriter=EventsWriter, Event=Event, SessionLog=SessionLog,
                                 Summary=Summary)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
