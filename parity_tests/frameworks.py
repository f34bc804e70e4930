"""Access to the three framework packages through their public contract only."""

from __future__ import annotations

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
    import timm
    import torch

    classes = int(np.load(npz)["resnet/head/conv2d/bias"].shape[0])
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=classes)
    model.load_pretrained(str(npz))
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
