"""The one argument parser of `python -m bit_{pytorch,jax,tf2}.train`."""

from __future__ import annotations

import argparse
from typing import Any

from bit_common import hyperrule
from bit_common.errors import BiTError
from bit_common.precision import PRECISIONS
from bit_common.trainable import TRAIN_CHOICES

HELP_WIDTH = 100


class _Formatter(argparse.HelpFormatter):
    """Shows a flag's default only where it has one worth showing (not None, not a switch)."""

    def __init__(self, prog: str):
        super().__init__(prog, width=HELP_WIDTH)  # fixed: the README quotes this text

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and action.nargs != 0:
            text += " (default: %(default)s)"
        return text


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the help layout of every command of this project."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Formatter)


def add_run_flags(p: argparse.ArgumentParser, *names: str, **overrides: dict[str, Any]) -> None:
    """Add the flags `names` (keys of RUN_FLAGS, in that order) to `p`; `overrides[name]`
    replaces some of a flag's settings (its default or help) for another command."""
    for name in names:
        flags, settings = RUN_FLAGS[name]
        p.add_argument(*flags, **{**settings, **overrides.get(name, {})})


# The flags of a run of any command: name -> (option strings, add_argument settings).
RUN_FLAGS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "name": (("--name",), dict(
        required=True, help="Name of this run; logs and checkpoints go to <logdir>/<name>/, "
                            "and running the same name again resumes it.")),
    "model": (("--model",), dict(
        required=True, help="Released model to fine-tune, e.g. BiT-M-R50x1 (BiT-M gives the "
                            "best results); see README for all names.")),
    "logdir": (("--logdir",), dict(required=True, help="Where to write run folders (small).")),
    "bit_pretrained_dir": (("--bit_pretrained_dir",), dict(
        default=".", help="Where to look for <model>.npz; downloaded there when absent.")),
    "dataset": (("--dataset",), dict(
        required=True,
        help="cifar10, cifar100, oxford_iiit_pet, oxford_flowers102, imagenet2012, digits "
             "(offline), imagefolder (your own images in --datadir) or vtab/<task> (a VTAB-1k "
             "task, from tfds in --datadir).")),
    "datadir": (("--datadir",), dict(
        default=None, help="Dataset location: download/cache folder, or for imagefolder the "
                           "folder holding train/<class>/ and val/<class>/.")),
    "examples_per_class": (("--examples_per_class",), dict(
        type=int, default=None,
        help="Few-shot: train on this many random examples of every class only.")),
    "examples_per_class_seed": (("--examples_per_class_seed",), dict(
        type=int, default=0, help="Random seed for selecting the few-shot examples.")),
    "batch": (("--batch",), dict(type=int, default=512, help="Global batch size.")),
    "batch_split": (("--batch_split",), dict(
        type=int, default=1, help="Split each batch into this many micro-batches whose "
                                  "gradients are accumulated (same update, less memory).")),
    "base_lr": (("--base_lr",), dict(
        type=float, default=0.003,
        help="Base learning rate of BiT-HyperRule; the default is most likely best.")),
    "eval_every": (("--eval_every",), dict(
        type=int, default=None,
        help="Evaluate every so many steps; there is always an evaluation at the end.")),
    "workers": (("--workers",), dict(type=int, default=8,
                                     help="Input-pipeline worker processes.")),
    "save": (("--no-save",), dict(
        dest="save", action="store_false",
        help="Write no checkpoints or final model (a stopped run then cannot resume).")),
    "tfds_manual_dir": (("--tfds_manual_dir",), dict(
        default=None, help="Manually downloaded files for tfds datasets (imagenet2012).")),
    "batch_eval": (("--batch_eval",), dict(type=int, default=32,
                                           help="Evaluation batch size.")),
    "steps": (("--steps",), dict(
        type=int, default=None,
        help="Stop after this many optimizer steps, without changing the schedule (a shorter "
             "run never reaches its decays; --schedule_steps shortens the schedule). 0: "
             "evaluation only, of --model with its own head (which must have the dataset's "
             "classes, e.g. a vtab/ model on its task); writes the eval record, no "
             "checkpoint.")),
    "schedule_steps": (("--schedule_steps",), dict(
        type=int, default=None,
        help="Scale BiT-HyperRule's schedule to end at this step, its warm-up and decays at "
             "the same fractions (120 for a small dataset: 24, 48, 72, 96, 120).")),
    "resolution": (("--resolution",), dict(
        type=int, nargs=2, metavar=("RESIZE", "CROP"), default=None,
        help="Override the rule's resize and crop sizes, e.g. --resolution 160 128.")),
    "seed": (("--seed",), dict(type=int, default=0,
                               help="Seed of data order, crops, flips and mixup.")),
    "augment": (("--no-augment",), dict(
        dest="augment", action="store_false",
        help="No random crop, flip or mixup: train images are resized straight to the crop "
             "size (for debugging and cross-framework checks).")),
    "save_every": (("--save_every",), dict(
        type=int, default=None,
        help="Checkpoint every so many steps (default: at every evaluation); one is always "
             "written at the end and on SIGINT/SIGTERM.")),
    "precision": (("--precision",), dict(
        choices=PRECISIONS, default="fp32",
        help="Compute precision on accelerators (bf16/fp16 mixed precision); parameters stay "
             "float32.")),
    "verify_images": (("--verify_images",), dict(
        action="store_true",
        help="Decode every image file of both splits before the first step (a progress bar), "
             "so that none fails mid-run.")),
    "skip_bad_images": (("--skip_bad_images",), dict(
        action="store_true",
        help="Leave out image files that do not decode, with a warning naming each and their "
             "count (implies --verify_images).")),
    "train": (("--train",), dict(
        choices=TRAIN_CHOICES, default="all",
        help="Which layers to fine-tune: all, only the head (a linear probe), or blockK to "
             "block4 with the final norm and the head (the root and earlier blocks stay "
             "frozen).")),
}

# The original big_transfer flags, with their meaning and defaults, then what this project adds.
TRAIN_FLAGS = ("name", "model", "logdir", "bit_pretrained_dir", "dataset", "datadir",
               "examples_per_class", "examples_per_class_seed", "batch", "batch_split", "base_lr",
               "eval_every", "workers", "save", "tfds_manual_dir", "batch_eval",
               "steps", "schedule_steps", "resolution", "seed", "augment", "save_every",
               "precision", "verify_images", "skip_bad_images", "train")


def build_parser(framework: str) -> argparse.ArgumentParser:
    """The parser shared by the three train modules; only the program name names the framework."""
    p = new_parser(f"python -m bit_{framework}.train",
                   "Fine-tune a released BiT model with BiT-HyperRule.")
    add_run_flags(p, *TRAIN_FLAGS)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Errors argparse cannot express, raised before anything is written."""
    if args.batch < 1 or args.batch_split < 1:
        raise BiTError(f"--batch ({args.batch}) and --batch_split ({args.batch_split}) must be "
                       f"positive.")
    if args.batch % args.batch_split:
        raise BiTError(f"--batch {args.batch} is not divisible by --batch_split "
                       f"{args.batch_split}; each micro-batch must have the same size. Use e.g. "
                       f"--batch_split {_divisor_near(args.batch, args.batch_split)}.")
    for flag in ("eval_every", "steps", "save_every", "examples_per_class"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "steps" else 1):
            raise BiTError(f"--{flag} must be at least {0 if flag == 'steps' else 1}, got "
                           f"{value}" + (" (0: evaluation only)." if flag == "steps" else "."))
    if args.schedule_steps is not None and args.schedule_steps < hyperrule.MIN_SCHEDULE_STEPS:
        raise BiTError(f"--schedule_steps must be at least {hyperrule.MIN_SCHEDULE_STEPS}, got "
                       f"{args.schedule_steps}: the schedule needs a warm-up step and a step "
                       f"at each of its four learning rates. Use --schedule_steps "
                       f"{hyperrule.MIN_SCHEDULE_STEPS} or more, or leave it out for the rule's "
                       f"own schedule.")
    if args.batch_eval < 1:
        raise BiTError(f"--batch_eval must be at least 1, got {args.batch_eval}.")
    if args.resolution is not None:
        resize, crop = args.resolution
        if not 0 < crop <= resize:
            raise BiTError(f"--resolution {resize} {crop}: the crop must be positive and no "
                           f"larger than the resize.")
    if "/" in args.name or args.name in ("", ".", ".."):
        raise BiTError(f"--name {args.name!r} must be a plain folder name (no '/').")


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))
