"""BiT-HyperRule: resolution, mixup and learning-rate schedule from the dataset alone.

The optimiser is SGD with momentum `MOMENTUM` and no weight decay, in every framework written
as torch.optim.SGD does it: `buf = MOMENTUM * buf + grad; param -= lr * buf`.
"""

from __future__ import annotations

MOMENTUM = 0.9
SMALL_AREA = 96 * 96
# The shortest scaled schedule: a warm-up step, then at least one step at each of the four
# learning rates (base, /10, /100, /1000), the base one lasting from warm-up to decay1 inclusive.
MIN_SCHEDULE_STEPS = 6


def get_resolution(original_hw: tuple[int, int]) -> tuple[int, int]:
    """(resize, crop) for images of the given original (height, width)."""
    h, w = original_hw
    return (160, 128) if h * w < SMALL_AREA else (512, 480)


def get_schedule(dataset_size: int, schedule_steps: int | None = None
                 ) -> tuple[int, int, int, int, int]:
    """Step supports [warmup, decay1, decay2, decay3, end] for `dataset_size` training examples.

    With `schedule_steps` N (at least `MIN_SCHEDULE_STEPS`) the rule's schedule is scaled to end
    at step N, every point at the same fraction of the schedule (rounded half up, then pushed
    apart where rounding made neighbours equal or put the last decay on the last step, so that
    every phase keeps at least one step): the small-dataset (100, 200, 300, 400, 500) becomes
    (24, 48, 72, 96, 120) for N = 120.
    """
    if dataset_size < 20_000:
        rule = (100, 200, 300, 400, 500)
    elif dataset_size < 500_000:
        rule = (500, 3000, 6000, 9000, 10_000)
    else:
        rule = (500, 6000, 12_000, 18_000, 20_000)
    if schedule_steps is None:
        return rule
    if schedule_steps < MIN_SCHEDULE_STEPS:
        raise ValueError(f"schedule_steps must be at least {MIN_SCHEDULE_STEPS}, "
                         f"got {schedule_steps}")
    end = rule[-1]
    # Integer arithmetic: the same points on every platform, and no banker's rounding.
    points = [(2 * p * schedule_steps + end) // (2 * end) for p in rule]
    # Point i is at least one above point i - 1 (the warm-up at least 1) and leaves room for the
    # points after it; the last decay stays below N - 1, since a decay takes effect one step
    # after its point (get_lr), and the end stays at N.
    last = len(points) - 1
    for i in range(len(points)):
        low = points[i - 1] + 1 if i else 1
        high = schedule_steps if i == last else schedule_steps - (last - i) - 1
        points[i] = min(max(points[i], low), high)
    return tuple(points)  # type: ignore[return-value]


def get_mixup(dataset_size: int) -> float:
    """Mixup alpha: none for small datasets, 0.1 otherwise."""
    return 0.0 if dataset_size < 20_000 else 0.1


def total_steps(dataset_size: int, schedule_steps: int | None = None) -> int:
    """Number of optimizer steps the rule (scaled to `schedule_steps`) trains for."""
    return get_schedule(dataset_size, schedule_steps)[-1]


def get_lr(step: int, dataset_size: int, base_lr: float = 0.003,
           schedule_steps: int | None = None) -> float | None:
    """Learning rate at 0-based optimizer `step`, or None once training is over.

    Linear warm-up to `base_lr`, then divided by 10 at every decay point strictly below `step`.
    The schedule counts optimizer steps and does not depend on the batch size; `schedule_steps`
    scales it (see `get_schedule`).
    """
    warmup, *decays, end = get_schedule(dataset_size, schedule_steps)
    if step < warmup:
        return base_lr * step / warmup
    if step >= end:
        return None
    for decay in decays:
        if decay < step:
            base_lr /= 10
    return base_lr
