"""Distillation by "patient and consistent" function matching (Beyer et al. 2021, "Knowledge
distillation: A good teacher is patient and consistent"): `python -m bit_<framework>.distill`.

A frozen teacher and the student see the same augmented image (one inception crop, flip and
mixup per example, the one crop box resized to each one's resolution), the teacher's logits are
computed in the same step, and the loss is `T² · KL(softmax(teacher / T) ‖ softmax(student / T))`
averaged over the batch: no labels. The defaults are big_vision's reference configuration
(`configs/proj/distill/bit_i1k.py`, R152x2 into R50x1 on ILSVRC-2012): Adam (b1 0.9, b2 0.999,
eps 1e-8) on gradients clipped to global norm 1.0, learning rate 0.03 with 5000 linear warm-up
steps then cosine decay to 0, weight decay 3e-4 on the kernels decoupled from the learning rate
(each step subtracts `schedule(t) / base_lr · wd · kernel`, big_vision's `optax.make`), mixup
with a Beta(1, 1) ratio on every batch, batch 4096 and 1200 epochs; evaluation on the central
87.5 % box (resize 256, central crop 224).

This module holds what the three frameworks share: the flags, the augmentation plan (every crop,
flip and mixup a pure function of seed and step, so resumed runs and all three frameworks feed
identical pairs), the crop boxes, the schedule, the run's set-up, the optimizer state's canonical
layout, the evaluation metrics, and the `Recipe` that runs it through `bit_common.loop`. Each
framework's `distiller.Distiller` is the backend: its optimizer is its own library's Adam with
decoupled weight decay (`torch.optim.AdamW`, `optax.adamw`, `keras.optimizers.AdamW`) and
global-norm clipping, fed the learning rate of `learning_rate` at every step.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bit_common import checkpoint, cli, loop, registry
from bit_common.datasets import DatasetInfo, Split, get_dataset
from bit_common.errors import BiTError, CheckpointError, DataError
from bit_common.plan import InputPlan
from bit_common.registry import ARCHITECTURES, Arch
from bit_common.weights import find_or_download

# big_vision's configs/proj/distill/bit_i1k.py.
BASE_LR = 0.03
WEIGHT_DECAY = 3e-4
WARMUP_STEPS = 5000
CLIP_NORM = 1.0
MIXUP_ALPHA = 1.0
TEMPERATURE = 1.0
BATCH = 4096
EPOCHS = 1200
RESOLUTION = 224
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
EVAL_CROP_FRACTION = 224 / 256  # resize 256, central crop 224: the central 87.5 % box
INCEPTION_AREA = (0.08, 1.0)    # fraction of the image's area an inception crop covers
INCEPTION_RATIO = (3 / 4, 4 / 3)  # its width / height

# Checkpoint keys of the optimizer state: adam/mu/<canonical key>, adam/nu/<...>, adam/count.
ADAM_MU, ADAM_NU, ADAM_COUNT = "adam/mu/", "adam/nu/", "adam/count"
# The eval sums of a Distiller, in this order (`eval_metrics` turns them into the record).
EVAL_SUMS = ("top1", "top5", "loss", "agree_top1", "agree_top5", "kl", "teacher_top1", "count")
RESUME_KEYS = ("teacher", "student", "dataset", "batch", "base_lr", "weight_decay",
               "warmup_steps", "schedule_steps", "clip_norm", "mixup_alpha", "temperature",
               "seed", "resolution", "teacher_resolution", "augment")

# Separate random streams as in bit_common.plan (the data order is InputPlan's own).
_AUGMENT, _MIXUP = 11, 12


# ---- the flags -----------------------------------------------------------------------------
def build_parser(framework: str) -> argparse.ArgumentParser:
    """The parser of the three distill modules; only the program name names the framework."""
    p = cli.new_parser(f"python -m bit_{framework}.distill",
                       "Distil a BiT teacher into a student by patient and consistent function "
                       "matching (Beyer et al. 2021).")
    p.add_argument("--teacher", required=True,
                   help="The teacher: a released model whose head fits the dataset (e.g. "
                        "distill/R152x2_T_224 for imagenet2012) or an .npz in the released "
                        "layout (a train run's model.npz).")
    p.add_argument("--student", required=True,
                   help=f"The student: an architecture ({', '.join(ARCHITECTURES)}) started "
                        f"from random weights, or a released model or .npz whose body starts "
                        f"it (its head is replaced by zeros).")
    cli.add_run_flags(p, "name", "logdir", "bit_pretrained_dir", "dataset", "datadir",
                      "tfds_manual_dir", "batch", "batch_split", "batch_eval", "workers",
                      "eval_every", "save_every", "save", "steps", "schedule_steps", "seed",
                      "augment", "precision", "verify_images", "skip_bad_images",
                      bit_pretrained_dir={"help": "Where to look for the teacher's and "
                                                  "student's <model>.npz; downloaded there "
                                                  "when absent."},
                      batch={"default": BATCH},
                      schedule_steps={"help": f"Length of the schedule: the cosine decay "
                                              f"reaches 0 at this step (default: {EPOCHS} "
                                              f"epochs of the training set at --batch)."},
                      seed={"help": "Seed of data order, crops, flips and mixup."},
                      steps={"help": "Stop after this many optimizer steps, without "
                                     "changing the schedule (--schedule_steps sets it)."},
                      augment={"help": "No inception crop, flip or mixup: both models see the "
                                       "central box (for debugging and cross-framework "
                                       "checks)."})
    p.add_argument("--resolution", type=int, default=RESOLUTION,
                   help="The student's input size: each crop box is resized to it.")
    p.add_argument("--teacher_resolution", type=int, default=None,
                   help="The teacher's input size for the same crop box (default: the "
                        "student's), e.g. 384 for distill/R152x2_T_384.")
    p.add_argument("--base_lr", type=float, default=BASE_LR,
                   help="Peak learning rate of Adam, after the warm-up.")
    p.add_argument("--weight_decay", type=float, default=WEIGHT_DECAY,
                   help="Weight decay of the kernels, decoupled from the learning rate (scaled "
                        "by the schedule only).")
    p.add_argument("--warmup_steps", type=int, default=WARMUP_STEPS,
                   help="Linear warm-up steps before the cosine decay.")
    p.add_argument("--clip_norm", type=float, default=CLIP_NORM,
                   help="Clip the gradients to this global norm (0: no clipping).")
    p.add_argument("--mixup_alpha", type=float, default=MIXUP_ALPHA,
                   help="Mixup on every batch with a Beta(alpha, alpha) ratio (0: no mixup).")
    p.add_argument("--temperature", type=float, default=TEMPERATURE,
                   help="Softmax temperature T of the KL loss (scaled by T²).")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Errors argparse cannot express, raised before anything is read or written."""
    if args.batch < 1 or args.batch_split < 1 or args.batch % args.batch_split:
        raise BiTError(f"--batch {args.batch} must be a positive multiple of --batch_split "
                       f"{args.batch_split}: each micro-batch must have the same size.")
    positive = ("batch_eval", "resolution", "teacher_resolution", "eval_every", "save_every",
                "steps", "schedule_steps", "base_lr", "temperature")
    for flag in positive:
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise BiTError(f"--{flag} must be positive, got {value}.")
    for flag in ("warmup_steps", "weight_decay", "clip_norm", "mixup_alpha"):
        if getattr(args, flag) < 0:
            raise BiTError(f"--{flag} must not be negative, got {getattr(args, flag)}.")
    if "/" in args.name or args.name in ("", ".", ".."):
        raise BiTError(f"--name {args.name!r} must be a plain folder name (no '/').")


def check_flags(args: argparse.Namespace) -> DatasetInfo:
    """Every check of the flags that needs no file: the dataset."""
    check_args(args)
    info = get_dataset(args.dataset)
    if info.needs_datadir and not args.datadir:
        raise DataError(f"--dataset {args.dataset} needs --datadir (the folder holding "
                        f"train/<class>/ and val/<class>/).")
    if re.fullmatch(r"R\d+x\d+", args.student):
        registry.parse_arch(args.student)  # an architecture this project does not have fails
    else:
        _weights_source(args.student, "student")  # as does an unknown model name
    _weights_source(args.teacher, "teacher")
    return info


# ---- the augmentation plan -------------------------------------------------------------------
@dataclass(frozen=True)
class DistillBatchPlan:
    """What one distillation step feeds both models (the global batch)."""

    step: int
    indices: np.ndarray     # int64 [B]  examples of the training split
    crop_draws: np.ndarray  # float64 [B, 4]  uniforms of the inception crop (`inception_boxes`)
    flips: np.ndarray       # bool [B]
    mixup_lambda: float     # 1.0 = no mixup
    mixup_perm: np.ndarray  # int64 [B]  partner of each example (identity without mixup)
    augment: bool = True    # False: the central box (`central_boxes`), no flip, no mixup

    def boxes(self, sizes: np.ndarray) -> np.ndarray:
        """int32 [B, 4] (top, left, height, width) of each example's crop, given its image's
        [B, 2] (height, width)."""
        if not self.augment:
            return central_boxes(sizes)
        return inception_boxes(sizes, self.crop_draws)


@dataclass(frozen=True)
class DistillPlan:
    """The training stream: InputPlan's epochs of seeded permutations, with an inception crop
    and a flip per example and mixup of every batch. `shards` > 1 keeps each mixup partner in
    its data-parallel replica's slice."""

    num_examples: int
    batch: int
    seed: int = 0
    mixup_alpha: float = MIXUP_ALPHA
    augment: bool = True
    shards: int = 1

    def batch_plan(self, step: int) -> DistillBatchPlan:
        b = self.batch
        order = InputPlan(self.num_examples, b, 1, 1, seed=self.seed)
        rng = np.random.default_rng([self.seed, _AUGMENT, step])
        draws, flips = rng.random((b, 4)), rng.random(b) < 0.5
        lam, perm = 1.0, np.arange(b, dtype=np.int64)
        if self.augment and self.mixup_alpha > 0:
            rng = np.random.default_rng([self.seed, _MIXUP, step])
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            shard = b // self.shards
            perm = np.concatenate([s * shard + rng.permutation(shard)
                                   for s in range(self.shards)])
        return DistillBatchPlan(step, order.indices(step), draws, flips & self.augment, lam,
                                perm, self.augment)


def inception_boxes(sizes: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Inception-style random crops: int32 [B, 4] (top, left, height, width) inside images of
    [B, 2] (height, width), from [B, 4] uniforms in [0, 1).

    The box covers 8-100 % of the image's area with a width/height ratio in [3/4, 4/3] (log-
    uniform), clipped to the image rather than redrawn, so four numbers decide it.
    """
    sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
    u = np.asarray(draws, np.float64).reshape(-1, 4)
    h, w = sizes[:, 0], sizes[:, 1]
    area = h * w * (INCEPTION_AREA[0] + u[:, 0] * (INCEPTION_AREA[1] - INCEPTION_AREA[0]))
    lo, hi = np.log(INCEPTION_RATIO[0]), np.log(INCEPTION_RATIO[1])
    ratio = np.exp(lo + u[:, 1] * (hi - lo))
    ch = np.clip(np.rint(np.sqrt(area / ratio)), 1, h)
    cw = np.clip(np.rint(np.sqrt(area * ratio)), 1, w)
    top = np.floor(u[:, 2] * (h - ch + 1))
    left = np.floor(u[:, 3] * (w - cw + 1))
    return np.stack([top, left, ch, cw], axis=1).astype(np.int32)


def central_boxes(sizes: np.ndarray, fraction: float = EVAL_CROP_FRACTION) -> np.ndarray:
    """int32 [B, 4] (top, left, height, width) of the central `fraction` of each image: resizing
    it to r is resizing the image to r / fraction and cropping the central r."""
    sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    hw = np.maximum(np.rint(sizes * fraction), 1).astype(np.int64)
    tl = (sizes - hw) // 2
    return np.concatenate([tl, hw], axis=1).astype(np.int32)


# ---- the schedule --------------------------------------------------------------------------
def learning_rate(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of the update at 0-based `step`: linear from 0 to `base_lr` over the
    warm-up, then cosine to 0 at `total_steps`; the schedule of optax's
    `warmup_cosine_decay_schedule(0, base_lr, warmup_steps, total_steps)` and Keras'
    `CosineDecay(0, total_steps - warmup_steps, warmup_target=base_lr,
    warmup_steps=warmup_steps)` (a test holds the three together)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    decay = max(total_steps - warmup_steps, 1)
    t = min(step - warmup_steps, decay) / decay
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))


def decayed(key: str) -> bool:
    """Whether weight decay applies to a canonical parameter: kernels (big_vision's
    `.*/kernel$`), not group-norm scales and offsets or the head's bias."""
    return key.endswith("/kernel")


# ---- the run's set-up ----------------------------------------------------------------------
@dataclass
class DistillSetup:
    """Everything a Distiller needs, decided once by `make_setup`."""

    config: loop.RunConfig
    dataset: DatasetInfo
    train: Split
    eval: Split
    num_classes: int
    arch: Arch                         # the student's
    params: dict[str, np.ndarray]      # the student's start (canonical)
    teacher_arch: Arch
    teacher_params: dict[str, np.ndarray]
    plan: DistillPlan
    resolution: int                    # the student's input size
    teacher_resolution: int
    base_lr: float
    weight_decay: float                # decoupled: the step subtracts lr / base_lr * wd * kernel
    warmup_steps: int
    total_steps: int                   # the schedule's length
    clip_norm: float                   # 0: no clipping
    temperature: float
    end_step: int

    @property
    def train_indices(self) -> np.ndarray:
        return np.arange(len(self.train), dtype=np.int64)

    def lr(self, step: int) -> float:
        return learning_rate(step, self.base_lr, self.warmup_steps, self.total_steps)


def _weights_source(spec: str, role: str) -> registry.ModelInfo | Path:
    """`spec` as an .npz file or a released model; anything else is a BiTError."""
    path = Path(spec)
    if path.suffix == ".npz" or path.is_file():
        if not path.is_file():
            raise CheckpointError(f"--{role} {spec}: no such file. Pass an .npz in the released "
                                  f"layout, or the name of a released model.")
        return path
    try:
        return registry.get_model(spec)
    except BiTError as e:
        raise BiTError(f"--{role}: {e}") from None


def _load(spec: str, role: str, pretrained_dir: str, num_classes: int | None = None
          ) -> tuple[Arch, dict[str, np.ndarray]]:
    source = _weights_source(spec, role)
    if isinstance(source, Path):
        return checkpoint.load_params(source, num_classes=num_classes)
    path = find_or_download(source.name, pretrained_dir)
    return checkpoint.load_params(path, num_classes=num_classes, expected=source.arch)


def initial_params(arch: Arch, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A student from scratch in the released layout: He-normal kernels (standardization removes
    their scale), group norm at identity, a zero head."""
    rng = np.random.default_rng(seed)
    params = {}
    for key, shape in checkpoint.expected_shapes(arch, num_classes).items():
        if key.endswith("/gamma"):
            value = np.ones(shape)
        elif key.endswith("/beta") or key.startswith("resnet/head/"):
            value = np.zeros(shape)
        else:
            value = rng.standard_normal(shape) * np.sqrt(2.0 / int(np.prod(shape[:-1])))
        params[key] = value.astype(np.float32)
    return params


def load_teacher(args: argparse.Namespace, num_classes: int, dataset: str
                 ) -> tuple[Arch, dict[str, np.ndarray]]:
    """The teacher's weights, its own head included, which must predict the dataset's classes."""
    arch, params = _load(args.teacher, "teacher", args.bit_pretrained_dir)
    classes = int(params[checkpoint.HEAD_BIAS].shape[0])
    if classes != num_classes:
        raise CheckpointError(
            f"The teacher {args.teacher} predicts {classes} classes, but --dataset {dataset} "
            f"has {num_classes}: distillation matches the teacher's outputs, so its head must "
            f"be for this dataset. Pass a teacher fine-tuned on {dataset} (the model.npz of a "
            f"`train` run on it).")
    return arch, params


def load_student(args: argparse.Namespace, num_classes: int) -> tuple[Arch, dict[str, np.ndarray]]:
    """The student's start: random weights of an architecture, or a checkpoint's with a zero
    head for the dataset's classes."""
    if args.student in ARCHITECTURES:
        arch = registry.parse_arch(args.student)
        return arch, initial_params(arch, num_classes, args.seed)
    return _load(args.student, "student", args.bit_pretrained_dir, num_classes=num_classes)


def make_setup(args: argparse.Namespace, framework: loop.Framework,
               teacher: tuple[Arch, Mapping[str, np.ndarray]] | None = None,
               student: tuple[Arch, Mapping[str, np.ndarray]] | None = None) -> DistillSetup:
    """The whole run from the flags: both splits, the teacher and the student, the plan, the
    schedule and the end step. `teacher` / `student` (arch, canonical params) replace the
    weights the flags name; the tests pass random ones."""
    info = check_flags(args)
    config = loop.RunConfig.from_args(args)
    train, evaluation = loop.load_splits(args, framework, config, info)
    num_classes = info.num_classes or len(train.class_names)
    t_arch, t_params = teacher or load_teacher(args, num_classes, args.dataset)
    s_arch, s_params = student or load_student(args, num_classes)
    checkpoint.validate(t_params, t_arch, num_classes, source="The teacher")
    checkpoint.validate(s_params, s_arch, num_classes, source="The student")
    n = len(train)
    total = args.schedule_steps or math.ceil(EPOCHS * n / args.batch)
    if args.warmup_steps >= total:
        raise BiTError(f"--warmup_steps {args.warmup_steps} leaves no room for the decay of a "
                       f"{total}-step schedule. Pass a shorter --warmup_steps (e.g. "
                       f"{max(total // 10, 1)}) or a longer --schedule_steps.")
    end = total if args.steps is None else min(args.steps, total)
    plan = DistillPlan(n, args.batch, args.seed, args.mixup_alpha, args.augment)
    return DistillSetup(config, info, train, evaluation, num_classes, s_arch, dict(s_params),
                        t_arch, dict(t_params), plan, args.resolution,
                        args.teacher_resolution or args.resolution, args.base_lr,
                        args.weight_decay, args.warmup_steps, total, args.clip_norm,
                        args.temperature, end)


# ---- the optimizer state and the evaluation --------------------------------------------------
def join_state(params: Mapping[str, np.ndarray], mu: Mapping[str, np.ndarray],
               nu: Mapping[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """One checkpoint state from the student's canonical params and Adam's moments."""
    return {**params, **{ADAM_MU + k: v for k, v in mu.items()},
            **{ADAM_NU + k: v for k, v in nu.items()},
            ADAM_COUNT: np.asarray(count, np.int64)}


def split_state(state: Mapping[str, np.ndarray], arch: Arch, num_classes: int
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray],
                           int]:
    """(params, mu, nu, count) of a checkpoint state, each validated against the student."""
    params = {k: v for k, v in state.items() if k.startswith(checkpoint.PREFIX)}
    parts = [params]
    for prefix in (ADAM_MU, ADAM_NU):
        parts.append({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    for part, what in zip(parts, ("parameters", "Adam first moments", "Adam second moments")):
        checkpoint.validate(part, arch, num_classes,
                            source=f"The student {what} of the run folder's checkpoint")
    return parts[0], parts[1], parts[2], int(state[ADAM_COUNT])


def eval_metrics(sums: np.ndarray) -> dict[str, float]:
    """The eval record from a Distiller's `eval_sums` (EVAL_SUMS): the student's top-1, top-5
    and cross-entropy, its agreement with the teacher (the teacher's top-1 class among the
    student's top 1 and top 5, big_vision's `agree`), the mean KL term of the loss, and the
    teacher's own top-1."""
    values = dict(zip(EVAL_SUMS, (float(v) for v in np.asarray(sums, np.float64))))
    count = max(values.pop("count"), 1.0)
    return {k: v / count for k, v in values.items()}


class Distillation(loop.Recipe):
    """`distill` through the shared loop."""

    command = "distill"
    resume_keys = RESUME_KEYS

    def parser(self, framework: str) -> argparse.ArgumentParser:
        return build_parser(framework)

    def check_flags(self, args: argparse.Namespace) -> None:
        check_flags(args)

    def make_setup(self, args: argparse.Namespace, framework: loop.Framework) -> DistillSetup:
        return make_setup(args, framework)

    def make_backend(self, framework: loop.Framework, setup: Any) -> loop.Backend:
        return framework.make_distiller(setup)

    def lr(self, args: argparse.Namespace, setup: Any, step: int) -> float:
        return setup.lr(step)

    def describe(self, args: argparse.Namespace, setup: Any, framework: str, start: int) -> str:
        return (f"{framework}: distilling {args.teacher} ({setup.teacher_arch.name}, "
                f"{setup.teacher_resolution} px) into {args.student} ({setup.arch.name}, "
                f"{setup.resolution} px) on {args.dataset}, {setup.plan.num_examples} training "
                f"examples, {setup.num_classes} classes, mixup {setup.plan.mixup_alpha}, "
                f"steps {start}->{setup.end_step} of {setup.total_steps} (warm-up "
                f"{setup.warmup_steps}, cosine), lr {setup.base_lr}, weight decay "
                f"{setup.weight_decay}, clip {setup.clip_norm or 'off'}, T {setup.temperature}"
                + (" (resumed)" if start else ""))

    def eval_metrics(self, sums: np.ndarray) -> dict[str, float]:
        return eval_metrics(sums)

    def run_config(self, args: argparse.Namespace, setup: Any) -> dict[str, Any]:
        return {"arch": setup.arch.name, "teacher_arch": setup.teacher_arch.name,
                "num_classes": setup.num_classes, "num_train_examples": setup.plan.num_examples,
                "teacher_resolution": setup.teacher_resolution,
                "total_steps": setup.total_steps}


DISTILLATION = Distillation()


def main(framework: loop.Framework, argv: list[str] | None = None) -> int:
    """`python -m bit_<framework>.distill`: parse, distil; a BiTError is exit 2."""
    return loop.main(framework, argv, recipe=DISTILLATION)
