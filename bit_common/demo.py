"""`make demo`: fine-tune BiT on the offline `digits` data in one framework, in a few minutes.

Uses the real `<model>.npz` when it is in --bit_pretrained_dir or can be downloaded; offline it
writes a random checkpoint in the released layout and says so plainly.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bit_common import checkpoint, registry
from bit_common.errors import BiTError
from bit_common.results import plot_curves
from bit_common.runlog import read_metrics
from bit_common.weights import download, local_path, model_url

FRAMEWORKS = {"pytorch": "bit_pytorch.train", "jax": "bit_jax.train", "tf2": "bit_tf2.train"}
STEPS = "160"
# About a minute of training on 2 idle CPU cores: BiT-HyperRule's schedule scaled to 160 steps of
# 64 images at 24 px (at these sizes a step costs nearly the same at 16 px, 10 % more at 32 px),
# evaluated twice, checkpointed at the end only. Digits are 8x8 images, which a random crop cuts
# into and a flip turns into other shapes: from the random start, training with them reached
# 92 % top-1 against 97 % without (32 px, 250-300 steps of 32), so the demo trains without them.
DEMO_FLAGS = ["--dataset", "digits", "--batch", "64", "--resolution", "24", "24", "--no-augment",
              "--schedule_steps", STEPS, "--eval_every", "80", "--save_every", STEPS,
              "--batch_eval", "120", "--workers", "1"]
# A random backbone needs a larger step than the rule's 0.003 to learn in 160 steps; with these
# flags 0.03 reached 95 % (and 0.05 at 32 px 88 %), 0.02 97-98 %.
RANDOM_LR = "0.02"


def prepare_weights(model: str, pretrained_dir: Path, offline_dir: Path) -> tuple[Path, bool]:
    """(folder holding `<model>.npz`, whether it holds the real weights). Tries one download
    (not with BIT_OFFLINE=1) and leaves no empty folder behind when it fails."""
    if local_path(model, pretrained_dir).is_file():
        return pretrained_dir, True
    if os.environ.get("BIT_OFFLINE") != "1":
        existed = pretrained_dir.exists()
        print(f"{model}.npz is not in {pretrained_dir}/: trying to download {model_url(model)} "
              f"(BIT_OFFLINE=1 skips this).", flush=True)
        try:
            download(model_url(model), local_path(model, pretrained_dir), timeout=10)
            return pretrained_dir, True
        except BiTError:
            print("(the download failed: no network here)")
            if not existed:
                _remove_empty_dirs(local_path(model, pretrained_dir).parent, pretrained_dir)
    info = registry.get_model(model)
    path = local_path(model, offline_dir)
    if not path.is_file():
        checkpoint.write_random_checkpoint(path, info.arch, info.num_classes, seed=0)
    return offline_dir, False


def _remove_empty_dirs(leaf: Path, top: Path) -> None:
    """Remove `leaf` and its parents up to `top` while they are empty."""
    for d in [leaf, *leaf.parents]:
        if not d.is_dir() or any(d.iterdir()):
            return
        d.rmdir()
        if d == top:
            return


@dataclass(frozen=True)
class RunTimes:
    """Where one invocation's seconds went, from the timestamps of metrics.jsonl."""

    startup: float     # launch to the first step's record: imports, weights, data, compiling
    training: float    # the steps after the first, less the evaluations between them
    steps: int         # the steps `training` covers
    evaluation: float  # every evaluation (JAX and TF2 compile theirs in the first)
    evaluations: int


def run_times(records: list[dict[str, Any]], launched: float) -> RunTimes | None:
    """The times of the records written after `launched` (Unix seconds); None when there are
    none (the run was already complete). A step's record is written when the step is done, and
    an evaluation's after it, so the difference is the evaluation's time."""
    train = [r for r in records if r["type"] == "train" and r["time"] >= launched]
    if not train:
        return None
    done_at = {r["step"]: r["time"] for r in train}
    evals = {r["step"]: r["time"] - done_at[r["step"]] for r in records
             if r["type"] == "eval" and r["step"] in done_at}
    between = sum(t for step, t in evals.items() if step < train[-1]["step"])
    return RunTimes(startup=train[0]["time"] - launched,
                    training=train[-1]["time"] - train[0]["time"] - between,
                    steps=len(train) - 1, evaluation=sum(evals.values()),
                    evaluations=len(evals))


def describe_times(times: RunTimes | None, framework: str) -> str:
    """The demo's timing line: training apart from start-up (and compilation) and evaluation."""
    if times is None:
        return "(The run was already complete: nothing was trained now.)"
    first = ("imports, weights, data, compiling the training step and the first step"
             if framework in ("jax", "tf2") else "imports, weights, data and the first step")
    per_step = times.training / times.steps if times.steps else float("nan")
    return (f"Training: {times.training:.1f} s for the {times.steps} steps after the first "
            f"({per_step:.2f} s a step). Start-up: {times.startup:.1f} s ({first}). "
            f"Evaluation: {times.evaluation:.1f} s ({times.evaluations} evaluations).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=FRAMEWORKS, default="pytorch")
    p.add_argument("--model", default="BiT-M-R50x1")
    p.add_argument("--bit_pretrained_dir", default="weights")
    p.add_argument("--logdir", default="runs/demo")
    args = p.parse_args(argv)
    try:
        registry.get_model(args.model)
    except BiTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    weights_dir, real = prepare_weights(args.model, Path(args.bit_pretrained_dir),
                                        Path(args.logdir) / "random_weights")
    if real:
        print(f"Using the released weights {local_path(args.model, weights_dir)}.")
        lr = []
    else:
        print(f"*** {registry.get_model(args.model).filename} is not in "
              f"{args.bit_pretrained_dir}/ and was not downloaded: starting from a RANDOM "
              f"checkpoint in the released BiT layout. This run shows the whole pipeline (data, "
              f"model, BiT-HyperRule's schedule scaled to {STEPS} steps, evaluation, "
              f"checkpoints) learning digits from scratch, offline; it is not BiT's transfer "
              f"accuracy. To fine-tune the released model instead, download it with `python -m "
              f"bit_common.weights {args.model} --dir {args.bit_pretrained_dir}` and run this "
              f"command again. ***")
        lr = ["--base_lr", RANDOM_LR]
    name = f"{args.framework}-{args.model.replace('/', '_')}-{'bit' if real else 'random'}"
    cmd = [sys.executable, "-m", FRAMEWORKS[args.framework], "--name", name, "--model",
           args.model, "--logdir", args.logdir, "--bit_pretrained_dir", str(weights_dir),
           *DEMO_FLAGS, *lr]
    print("$ " + " ".join(cmd[2:]), flush=True)
    launched = time.time()
    code = subprocess.call(cmd)
    run_dir = Path(args.logdir) / name
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r["type"] == "eval"]
    if code == 0 and evals:
        curves = plot_curves([run_dir], run_dir / "curves.png")
        print(f"\nFinal top-1 on digits' test split: {evals[-1]['top1']:.1%} (chance 10%) after "
              f"{evals[-1]['step']} steps.\n"
              f"{describe_times(run_times(records, launched), args.framework)}\n"
              f"Logs: {run_dir}/train.log, metrics: {run_dir}/metrics.jsonl, fine-tuned model: "
              f"{run_dir}/model.npz\nLoss and top-1 against step: {curves}")
    return code


if __name__ == "__main__":
    sys.exit(main())
