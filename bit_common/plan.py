"""Every random choice of training, as a pure function of (seed, step).

Which examples form a batch, where each is cropped, whether it is flipped, and how it is mixed
are decided here, in numpy, so all three frameworks see the same batches, and resuming at step
`s` needs nothing but `s` (no loader or RNG state to save).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from bit_common.errors import DataError

# Separate random streams, so that changing e.g. the augmentation never changes the data order.
_ORDER, _AUGMENT, _MIXUP = 0, 1, 2


@dataclass(frozen=True)
class BatchPlan:
    """What one optimizer step trains on (the global batch, before any device sharding)."""

    step: int
    indices: np.ndarray     # int64 [B]  examples of the training split
    offsets: np.ndarray     # int32 [B, 2]  (top, left) of the crop inside the resized image
    flips: np.ndarray       # bool [B]  horizontal flip
    mixup_lambda: float     # 1.0 = no mixup
    mixup_perm: np.ndarray  # int64 [B]  partner of each example (identity without mixup)


@dataclass(frozen=True)
class InputPlan:
    """The training input stream: epochs of seeded permutations cut into batches.

    Batches run across epoch boundaries, so every example is seen once per epoch. With
    `augment=False` images are resized straight to the crop size, never flipped or mixed.
    `random_flip` / `random_crop` False (a dataset whose label a flip or a crop would change,
    e.g. VTAB's orientations and positions) leave out only that augmentation: without random
    crops, images are resized straight to the crop size. Either way the random streams draw the
    same numbers, so the other choices stay those of the full augmentation.
    `shards` > 1 (data-parallel replicas) keeps each mixup partner inside its replica's slice.
    """

    num_examples: int
    batch: int
    resize: int
    crop: int
    seed: int = 0
    mixup_alpha: float = 0.0
    augment: bool = True
    shards: int = 1
    random_flip: bool = True
    random_crop: bool = True

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of the training examples used in `epoch`."""
        return _permutation(self.num_examples, self.seed, epoch)

    def indices(self, step: int) -> np.ndarray:
        """Training-example indices of the global batch of `step`."""
        pos = np.arange(step * self.batch, (step + 1) * self.batch, dtype=np.int64)
        epochs, within = np.divmod(pos, self.num_examples)
        out = np.empty_like(pos)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.epoch_order(int(epoch))[within[sel]]
        return out

    def batch_plan(self, step: int) -> BatchPlan:
        """Indices, crops, flips and mixup of `step`."""
        b = self.batch
        offsets = np.zeros((b, 2), np.int32)
        flips = np.zeros(b, bool)
        lam, perm = 1.0, np.arange(b, dtype=np.int64)
        if self.augment:
            rng = np.random.default_rng([self.seed, _AUGMENT, step])
            offsets = rng.integers(0, self.resize - self.crop + 1, size=(b, 2)).astype(np.int32)
            flips = (rng.random(b) < 0.5) & self.random_flip
            if not self.random_crop:  # drawn all the same, so the flips stay as they were
                offsets[:] = 0
            if self.mixup_alpha > 0:
                rng = np.random.default_rng([self.seed, _MIXUP, step])
                lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
                shard = b // self.shards
                perm = np.concatenate([s * shard + rng.permutation(shard)
                                       for s in range(self.shards)])
        return BatchPlan(step, self.indices(step), offsets, flips, lam, perm)

    @property
    def train_size(self) -> tuple[int, int]:
        """(resize, crop) actually applied: with augment or random crops off, resize straight
        to the crop."""
        return (self.resize, self.crop) if self.augment and self.random_crop else \
            (self.crop, self.crop)


def sharded(plan: Any, shards: int, unit: str = "devices") -> Any:
    """`plan` (an InputPlan or a DistillPlan) with its batch split into `shards` equal
    data-parallel slices (each mixup partner inside its slice), or a DataError naming `unit`."""
    if shards == plan.shards:
        return plan
    if shards < 1 or plan.batch % shards:
        raise DataError(f"The batch of {plan.batch} cannot be split into {shards} equal shards; "
                        f"use a batch divisible by the number of {unit}.")
    return dataclasses.replace(plan, shards=shards)


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, _ORDER, epoch]).permutation(n)
    perm.flags.writeable = False
    return perm
