"""BiT-HyperRule: resolution, mixup and learning-rate schedule from the dataset alone.

The optimiser is SGD with momentum `MOMENTUM` and no weight decay, in every framework written
as torch.optim.SGD does it: `buf = MOMENTUM * buf + grad; param -= lr * buf`.
"""

from __future__ import annotations

MOMENTUM = 0.9
SMALL_AREA = 96 * 96


def get_resolution(original_hw: tuple[int, int]) -> tuple[int, int]:
    """(resize, crop) for images of the given original (height, width)."""
    h, w = original_hw
    return (160, 128) if h * w < SMALL_AREA else (512, 480)


def get_schedule(dataset_size: int) -> tuple[int, int, int, int, int]:
    """Step supports [warmup, decay1, decay2, decay3, end] for `dataset_size` training examples."""
    if dataset_size < 20_000:
        return (100, 200, 300, 400, 500)
    if dataset_size < 500_000:
        return (500, 3000, 6000, 9000, 10_000)
    return (500, 6000, 12_000, 18_000, 20_000)


def get_mixup(dataset_size: int) -> float:
    """Mixup alpha: none for small datasets, 0.1 otherwise."""
    return 0.0 if dataset_size < 20_000 else 0.1


def total_steps(dataset_size: int) -> int:
    """Number of optimizer steps the rule trains for."""
    return get_schedule(dataset_size)[-1]


def get_lr(step: int, dataset_size: int, base_lr: float = 0.003) -> float | None:
    """Learning rate at 0-based optimizer `step`, or None once training is over.

    Linear warm-up to `base_lr`, then divided by 10 at every decay point strictly below `step`.
    The schedule counts optimizer steps and does not depend on the batch size.
    """
    warmup, *decays, end = get_schedule(dataset_size)
    if step < warmup:
        return base_lr * step / warmup
    if step >= end:
        return None
    for decay in decays:
        if decay < step:
            base_lr /= 10
    return base_lr
