"""`make reproduce`: the command behind every published row of the README's result tables.

Prints the grid (models x datasets x examples per class x seeds x frameworks); with --run it
runs the commands one after another, skipping runs that already finished, then prints the
tables with `bit_common.results`. Needs the released weights, the datasets and real hardware.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bit_common import results, vtab
from bit_common.runlog import read_metrics

SEEDS = (0, 1, 2, 3, 4)  # "at least five runs" for every few-shot cell
CIFAR_FRAMEWORKS = {"BiT-M-R101x3": ("tf2", "jax", "pytorch"),
                    "BiT-M-R152x2": ("jax", "pytorch"),
                    "BiT-M-R50x1": ("tf2", "jax", "pytorch")}
IMAGENET_MODELS = ("BiT-M-R50x1", "BiT-M-R152x2", "BiT-M-R101x3")
# The README's VTAB-1k rows: fine-tuned here three times per task (the released files are runs
# 0-2 too), and the released fine-tuned files scored as they are (--steps 0).
VTAB_MODELS = ("BiT-M-R152x4", "BiT-M-R101x3")
VTAB_RUNS = (0, 1, 2)
VTAB_FRAMEWORKS = ("tf2", "jax", "pytorch")
# The released students: R152x2 distilled into R50x1 on ImageNet at 224 and 160 px, with
# big_vision's recipe (the distill command's defaults); the teacher's memory wants micro-batches.
DISTILL_RESOLUTIONS = (224, 160)
DISTILL_FRAMEWORKS = ("tf2", "jax", "pytorch")
DISTILL_BATCH_SPLIT = "32"
# The whole BiT-HyperRule otherwise (batch 512, 500 steps); micro-batches only save memory.
VTAB_BATCH_SPLIT = "16"


@dataclass(frozen=True)
class Job:
    table: str
    framework: str
    name: str
    flags: tuple[str, ...]
    command: str = "train"  # or "distill"

    @property
    def eval_only(self) -> bool:
        return "--steps" in self.flags and self.flags[self.flags.index("--steps") + 1] == "0"

    def argv(self, logdir: str, weights: str, datadir: str) -> list[str]:
        return [sys.executable, "-m", f"bit_{self.framework}.{self.command}", "--name", self.name,
                "--logdir", logdir, "--bit_pretrained_dir", weights, "--datadir", datadir,
                *self.flags]


def jobs() -> Iterator[Job]:
    """Every run behind the CIFAR, ImageNet, VTAB-1k and distillation tables."""
    for model, frameworks in CIFAR_FRAMEWORKS.items():
        for dataset in ("cifar10", "cifar100"):
            for k in (1, 5, None):
                for seed in (SEEDS if k else (0,)):
                    for fw in frameworks:
                        shots = ["--examples_per_class", str(k),
                                 "--examples_per_class_seed", str(seed)] if k else []
                        yield Job("CIFAR", fw, f"{model}-{dataset}-{k or 'full'}-s{seed}-{fw}",
                                  ("--model", model, "--dataset", dataset, *shots,
                                   "--batch", "128", "--base_lr", "0.001"))
    for model in IMAGENET_MODELS:
        for k in (1, 5, None):
            shots = ["--examples_per_class", str(k)] if k else []
            yield Job("ImageNet", "pytorch", f"{model}-imagenet2012-{k or 'full'}-pytorch",
                      ("--model", model, "--dataset", "imagenet2012", *shots,
                       "--batch", "512", "--batch_split", "16"))
    for model in VTAB_MODELS:
        for task in vtab.TASKS:
            for run in VTAB_RUNS:
                for fw in VTAB_FRAMEWORKS:
                    yield Job("VTAB-1k", fw, f"{model}-vtab-{task}-run{run}-{fw}",
                              ("--model", model, "--dataset", f"vtab/{task}", "--seed", str(run),
                               "--batch_split", VTAB_BATCH_SPLIT))
                    yield Job("VTAB-1k", fw, f"{model}-vtab-{task}-run{run}-released-{fw}",
                              ("--model", f"vtab/{model}-run{run}-{task}",
                               "--dataset", f"vtab/{task}", "--steps", "0"))
    for res in DISTILL_RESOLUTIONS:
        for fw in DISTILL_FRAMEWORKS:
            yield Job("Distillation", fw, f"distill-R152x2-R50x1-{res}-{fw}",
                      ("--teacher", "distill/R152x2_T_224", "--student", "R50x1",
                       "--dataset", "imagenet2012", "--resolution", str(res),
                       "--batch_split", DISTILL_BATCH_SPLIT), command="distill")


def finished(run_dir: Path, eval_only: bool = False) -> bool:
    """The run has its final evaluation and, unless it only evaluates, its final model."""
    return any(r.get("type") == "eval" for r in read_metrics(run_dir / "metrics.jsonl")) and \
        (eval_only or (run_dir / "model.npz").exists())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="store_true", help="run the commands, not just print them")
    p.add_argument("--logdir", default="runs/reproduce")
    p.add_argument("--bit_pretrained_dir", default="weights")
    p.add_argument("--datadir", default="data")
    p.add_argument("--only", default=None, help="substring filter on run names")
    args = p.parse_args(argv)
    grid = [j for j in jobs() if not args.only or args.only in j.name]
    for job in grid:
        cmd = job.argv(args.logdir, args.bit_pretrained_dir, args.datadir)
        print(shlex.join(["python", *cmd[1:]]))
        if args.run and not finished(Path(args.logdir) / job.name, job.eval_only):
            code = subprocess.call(cmd)
            if code:
                print(f"error: {job.name} failed with exit code {code}", file=sys.stderr)
                return code
    print(f"# {len(grid)} runs.")
    if args.run:
        print(results.tables(results.collect(args.logdir)))
        print(results.distill_tables(results.collect_distill(args.logdir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
