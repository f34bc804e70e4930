"""`make demo`: fine-tune BiT on the offline `digits` data in one framework, in a few minutes.

Uses the real `<model>.npz` when it is in --bit_pretrained_dir or can be downloaded; offline it
writes a random checkpoint in the released layout and says so plainly.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from bit_common import checkpoint, registry
from bit_common.errors import BiTError
from bit_common.results import plot_curves
from bit_common.runlog import read_metrics
from bit_common.weights import download, local_path, model_url

FRAMEWORKS = {"pytorch": "bit_pytorch.train", "jax": "bit_jax.train", "tf2": "bit_tf2.train"}
# Small enough for 2 CPU cores: 32 px crops, 150 steps of 32 images.
DEMO_FLAGS = ["--dataset", "digits", "--batch", "32", "--resolution", "40", "32",
              "--steps", "150", "--eval_every", "50", "--batch_eval", "120", "--workers", "2"]
RANDOM_LR = "0.03"  # a random backbone needs a larger step than the rule's 0.003 to learn quickly


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
        print("*** No released weights here and no network: starting from a RANDOM checkpoint "
              "in the released BiT layout. The run shows the whole pipeline learning offline, "
              "not BiT's transfer accuracy. To fine-tune the released model, put "
              f"{registry.get_model(args.model).filename} into {args.bit_pretrained_dir}/ "
              f"(`python -m bit_common.weights {args.model} --dir {args.bit_pretrained_dir}` "
              f"downloads it) and run the same command again. ***")
        lr = ["--base_lr", RANDOM_LR]
    name = f"{args.framework}-{args.model.replace('/', '_')}-{'bit' if real else 'random'}"
    cmd = [sys.executable, "-m", FRAMEWORKS[args.framework], "--name", name, "--model",
           args.model, "--logdir", args.logdir, "--bit_pretrained_dir", str(weights_dir),
           *DEMO_FLAGS, *lr]
    print("$ " + " ".join(cmd[2:]), flush=True)
    code = subprocess.call(cmd)
    run_dir = Path(args.logdir) / name
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "eval"]
    if code == 0 and evals:
        curves = plot_curves([run_dir], run_dir / "curves.png")
        print(f"\nFinal top-1 on digits' test split: {evals[-1]['top1']:.1%} (chance 10%) after "
              f"{evals[-1]['step']} steps.\nLogs: {run_dir}/train.log, metrics: "
              f"{run_dir}/metrics.jsonl, fine-tuned model: {run_dir}/model.npz\n"
              f"Loss and top-1 against step: {curves}")
    return code


if __name__ == "__main__":
    sys.exit(main())
