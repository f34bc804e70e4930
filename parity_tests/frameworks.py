"""Access to the three framework packages through their public contract only."""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from types import ModuleType

import numpy as np

FRAMEWORKS = ("pytorch", "jax", "tf2")


def framework_models(framework: str) -> ModuleType:
    """`bit_<framework>.models`, imported on first use."""
    return importlib.import_module(f"bit_{framework}.models")


def timm_logits(npz: Path, images: np.ndarray) -> np.ndarray:
    """Logits of timm's independent ResNet-v2 loading the same released-layout file."""
    import torch

    with torch.no_grad():
        return _timm_model(str(npz))(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


@functools.lru_cache(maxsize=1)
def _timm_model(npz: str):
    import timm

    classes = int(np.load(npz)["resnet/head/conv2d/bias"].shape[0])
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=classes)
    model.load_pretrained(npz)
    return model.eval()
