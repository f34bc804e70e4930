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

from bit_common import results
from bit_common.runlog import read_metrics

SEEDS = (0, 1, 2, 3, 4)  # "at least five runs" for every few-shot cell
CIFAR_FRAMEWORKS = {"BiT-M-R101x3": ("tf2", "jax", "pytorch"),
                    "BiT-M-R152x2": ("jax", "pytorch"),
                    "BiT-M-R50x1": ("tf2", "jax", "pytorch")}
IMAGENET_MODELS = ("BiT-M-R50x1", "BiT-M-R152x2", "BiT-M-R101x3")


@dataclass(frozen=True)
class Job:
    table: str
    framework: str
    name: str
    flags: tuple[str, ...]

    def argv(self, logdir: str, weights: str, datadir: str) -> list[str]:
        return [sys.executable, "-m", f"bit_{self.framework}.train", "--name", self.name,
                "--logdir", logdir, "--bit_pretrained_dir", weights, "--datadir", datadir,
                *self.flags]


def jobs() -> Iterator[Job]:
    """Every run behind the CIFAR and ImageNet tables."""
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


def finished(run_dir: Path) -> bool:
    return any(r.get("type") == "eval" for r in read_metrics(run_dir / "metrics.jsonl")) and \
        (run_dir / "model.npz").exists()


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
        if args.run and not finished(Path(args.logdir) / job.name):
            code = subprocess.call(cmd)
            if code:
                print(f"error: {job.name} failed with exit code {code}", file=sys.stderr)
                return code
    print(f"# {len(grid)} runs. VTAB-1k and the distilled students need datasets this project "
          f"does not ship loaders for yet; their published numbers are listed in the README.")
    if args.run:
        print(results.tables(results.collect(args.logdir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
