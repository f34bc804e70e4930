"""`--precision`: what the three backends share about mixed precision.

bf16 and fp16 compute on accelerators only (on CPUs without bfloat16/float16 units they are
slower than float32). fp16 needs dynamic loss scaling, and one schedule serves PyTorch's
GradScaler and TF2's own scaling, so the two skip the same steps: start at 2**15, halve the scale
and skip the update when a gradient is not finite, double it after 2000 finite steps in a row.
The scale and its count of finite steps are saved in the checkpoint, so a resumed fp16 run
continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

from bit_common.errors import BiTError

PRECISIONS = ("fp32", "bf16", "fp16")
LOSS_SCALE_INIT = 2.0 ** 15
LOSS_SCALE_GROWTH_INTERVAL = 2000
# Checkpoint keys of the fp16 loss scale (absent in fp32 and bf16 runs).
LOSS_SCALE = "loss_scale/scale"
LOSS_SCALE_GOOD_STEPS = "loss_scale/good_steps"


def needs_loss_scaling(precision: str) -> bool:
    """fp16's 5-bit exponent underflows small gradients; bf16 has float32's range."""
    return precision == "fp16"


def require_accelerator(precision: str, framework: str, accelerator: bool,
                        device: str = "GPU") -> None:
    """BiTError for mixed precision where the backend computes on a CPU."""
    if precision != "fp32" and not accelerator:
        raise BiTError(f"--precision {precision} needs a {device}; this machine has none that "
                       f"{framework} sees, and on CPU it computes in float32 only. Drop the flag "
                       f"(or pass --precision fp32).")


def loss_scale_state(scale: float, good_steps: int) -> dict[str, np.ndarray]:
    """The loss scale's checkpoint entries."""
    return {LOSS_SCALE: np.asarray(scale, np.float32),
            LOSS_SCALE_GOOD_STEPS: np.asarray(good_steps, np.int64)}


def read_loss_scale(state: dict[str, np.ndarray]) -> tuple[float, int]:
    """(scale, finite steps in a row) from a checkpoint state; the initial values if it has none
    (a run that was started in fp32 or bf16)."""
    if LOSS_SCALE not in state:
        return LOSS_SCALE_INIT, 0
    return float(state[LOSS_SCALE]), int(state[LOSS_SCALE_GOOD_STEPS])
