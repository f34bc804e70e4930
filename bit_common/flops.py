"""Analytic FLOP counts of a ResNet-v2, so benchmarks can report achieved GFLOP/s."""

from __future__ import annotations

from bit_common.checkpoint import unit_names
from bit_common.registry import Arch


def _out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def forward_flops(arch: Arch, height: int, width: int, num_classes: int = 0) -> int:
    """Multiply-add FLOPs (2 per MAC) of the convolutions and the head for one image.

    Normalisation, activations and pooling are left out: they are a few percent of the total.
    """
    h, w = _out(height, 7, 2, 3), _out(width, 7, 2, 3)
    macs = h * w * 7 * 7 * 3 * 64 * arch.width
    h, w = _out(h, 3, 2, 1), _out(w, 3, 2, 1)  # max pool
    for _, _, cin, cmid, cout, stride in unit_names(arch):
        ho, wo = _out(h, 3, stride, 1), _out(w, 3, stride, 1)
        macs += h * w * cin * cmid           # a: 1x1 at the input resolution
        macs += ho * wo * 9 * cmid * cmid    # b: 3x3, carries the stride
        macs += ho * wo * cmid * cout        # c: 1x1
        if cin != cout or stride != 1:
            macs += ho * wo * cin * cout     # projection (1x1, strided)
        h, w = ho, wo
    macs += arch.feature_dim * num_classes
    return 2 * macs


def train_flops(arch: Arch, height: int, width: int, num_classes: int = 0) -> int:
    """Forward plus backward (about twice the forward: gradients of inputs and of weights)."""
    return 3 * forward_flops(arch, height, width, num_classes)
