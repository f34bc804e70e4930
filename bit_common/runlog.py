"""Run logging: a human `train.log` and a machine-readable `metrics.jsonl`, the same in all three.

metrics.jsonl holds one JSON object per line:
  {"type": "train", "step": 12, "loss": 2.31, "lr": 0.00033, "img_per_s": 41.2, "time": ...}
  {"type": "eval", "step": 100, "top1": 0.91, "top5": 0.99, "loss": 0.35, "time": ...}
`step` counts the optimizer steps completed when the record was written; a train record's `lr`
is the learning rate its update used; `time` is seconds since the epoch.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

TRAIN_FIELDS = ("step", "loss", "lr", "img_per_s")
EVAL_FIELDS = ("step", "top1", "top5", "loss")


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


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (written after the checkpoint a resumed run starts from)."""
    if path.exists():
        keep = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(path)


class RunLog:
    """Writes train.log, metrics.jsonl and the console; only the chief process writes files, and
    with `echo` False (the other processes of a multi-process run) nothing is printed."""

    def __init__(self, run_dir: Path | None, resume_step: int = 0,
                 console: TextIO | None = None, echo: bool = True):
        self.console = (console or sys.stdout) if echo else None
        self._log = self._metrics = None
        if run_dir is not None:
            truncate_metrics(run_dir / "metrics.jsonl", resume_step)
            self._log = open(run_dir / "train.log", "a", buffering=1)
            self._metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)

    def info(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        if self.console:
            print(line, file=self.console, flush=True)
        if self._log:
            self._log.write(line + "\n")

    def _record(self, kind: str, **fields: float) -> None:
        if self._metrics:
            rec = {"type": kind, **fields, "time": round(time.time(), 3)}
            self._metrics.write(json.dumps(rec) + "\n")

    def train(self, step: int, loss: float, lr: float, img_per_s: float, eta_s: float) -> None:
        self._record("train", step=step, loss=loss, lr=lr, img_per_s=round(img_per_s, 2))
        self.info(f"[step {step}] loss={loss:.5f} lr={lr:.3e} {img_per_s:.1f} img/s "
                  f"ETA {_hms(eta_s)}")

    def eval(self, step: int, top1: float, top5: float, loss: float) -> None:
        self._record("eval", step=step, top1=top1, top5=top5, loss=loss)
        self.info(f"[step {step}] eval: top1={top1:.2%} top5={top5:.2%} loss={loss:.5f}")

    def close(self) -> None:
        for f in (self._log, self._metrics):
            if f:
                f.close()


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
