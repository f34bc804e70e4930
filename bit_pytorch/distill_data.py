"""The PyTorch input of distillation (bit_common.distill), driven step by step by `DistillPlan`.

The arithmetic is bit_tfdata.distill_pipeline's (a test holds the two together to 1e-4):

    uint8 [H, W, 3] -> crop [top:top+h, left:left+w] (the plan's box) -> float32 -> bilinear
    resize with antialiasing to (r, r) -> flip where planned -> x / 127.5 - 1

once at the student's resolution and once at the teacher's, from the one box. Mixup is the
step's (both images, the batch's lambda and partners). Evaluation takes every image's central
box (`central_boxes`). DataLoader workers, decoding and the step sampler are bit_pytorch.data's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from bit_common.distill import DistillPlan, DistillSetup, central_boxes
from bit_common.plan import sharded
from bit_pytorch import data


def crop_resize(image: np.ndarray, box: np.ndarray, size: int, flip: bool = False
                ) -> torch.Tensor:
    """One (top, left, height, width) box of a uint8 HWC image, resized to (size, size),
    flipped where asked, in [-1, 1]: float32 CHW."""
    top, left, h, w = (int(v) for v in box)
    x = data.resize(image[top:top + h, left:left + w], size)
    if flip:
        x = x.flip(-1)
    return (x / 127.5 - 1.0).contiguous()


@dataclass
class DistillBatch:
    """The rows of one step's global batch that this process trains on."""

    step: int
    student: torch.Tensor      # float32 [b, 3, r, r]
    teacher: torch.Tensor      # float32 [b, 3, rt, rt], the same crops
    labels: torch.Tensor       # int64 [b] (not used by the loss; for comparisons)
    mixup_lambda: float
    mixup_perm: torch.Tensor   # int64 [b], indices into this process's rows


class DistillTrainDataset(data.TrainDataset):
    """Items are `(step, row)`: row `row` of the global batch of `step`, as the plan says; the
    fine-tuning dataset's step cache, with distillation's crops."""

    def __init__(self, setup: DistillSetup, plan: DistillPlan):
        super().__init__(setup.train, setup.train_indices, plan)
        self.sizes = (setup.resolution, setup.teacher_resolution)

    def __getitem__(self, item: tuple[int, int]):
        step, row = item
        bp = self.batch_plan(step)
        i = int(bp.indices[row])
        try:
            image = self.images(i)
        except data._Unreadable as e:
            return None, None, 0, str(e)
        one = dataclasses.replace(bp, crop_draws=bp.crop_draws[row:row + 1])
        box = one.boxes(np.asarray(image.shape[:2])[None])[0]
        flip = bool(bp.flips[row])
        r, rt = self.sizes
        return (crop_resize(image, box, r, flip), crop_resize(image, box, rt, flip),
                int(self.labels[i]), None)


class DistillEvalDataset(torch.utils.data.Dataset):
    """Image `i` of the evaluation split: its central box at both resolutions, and its label."""

    def __init__(self, setup: DistillSetup):
        self.images, self.labels = data._SplitImages(setup.eval), setup.eval.labels
        self.sizes = (setup.resolution, setup.teacher_resolution)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        try:
            image = self.images(i)
        except data._Unreadable as e:
            return None, None, 0, str(e)
        box = central_boxes(np.asarray(image.shape[:2])[None])[0]
        r, rt = self.sizes
        return crop_resize(image, box, r), crop_resize(image, box, rt), int(self.labels[i]), None


def _collate(items) -> dict:
    errors = [e for *_, e in items if e]
    if errors:
        return {"error": errors[0]}
    return {"student": torch.stack([s for s, _, _, _ in items]),
            "teacher": torch.stack([t for _, t, _, _ in items]),
            "labels": torch.tensor([y for _, _, y, _ in items], dtype=torch.int64)}


def train_batches(setup: DistillSetup, start: int, end: int, rows: range, shards: int,
                  workers: int, pin_memory: bool = False) -> Iterator[DistillBatch]:
    """Batches of steps start..end-1, restricted to global-batch `rows` (this process's slice
    when the batch is split into `shards` equal slices, one per process: every mixup partner
    stays inside its slice)."""
    plan = sharded(setup.plan, shards, unit="processes")
    dataset = DistillTrainDataset(setup, plan)
    loader = data._loader(dataset, data.StepSampler(start, end, rows), workers, pin_memory,
                          collate=_collate)
    for step, batch in zip(range(start, end), loader):
        batch = data._check(batch)
        bp = plan.batch_plan(step)
        perm = torch.from_numpy(bp.mixup_perm[rows.start:rows.stop] - rows.start)
        yield DistillBatch(step, batch["student"], batch["teacher"], batch["labels"],
                           bp.mixup_lambda, perm)


def eval_batches(setup: DistillSetup, batch: int, rows: range, workers: int,
                 pin_memory: bool = False
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(student images, teacher images, labels) over `rows` of the evaluation split, the last
    batch possibly smaller."""
    loader = data._loader(DistillEvalDataset(setup), data._Chunks(rows, batch), workers,
                          pin_memory, collate=_collate)
    for b in loader:
        b = data._check(b)
        yield b["student"], b["teacher"], b["labels"]
