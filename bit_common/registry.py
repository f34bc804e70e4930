"""Every released BiT checkpoint: its architecture, upstream classes and download address."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from bit_common.errors import unknown_name
from bit_common.vtab import VTAB_CLASSES, VTAB_TASKS  # noqa: F401 (re-exported)

BASE_URL = "https://storage.googleapis.com/bit_models/"

# Units per block (block1..block4) for each depth.
UNITS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
ARCHITECTURES: tuple[str, ...] = ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4")
VTAB_ARCHITECTURES: tuple[str, ...] = ("R50x1", "R101x1", "R50x3", "R101x3", "R152x4")
IMAGENET21K_CLASSES = 21843
ILSVRC_CLASSES = 1000


@dataclass(frozen=True)
class Arch:
    """A ResNet-v2 shape: depth (50/101/152) and width factor."""

    depth: int
    width: int

    @property
    def name(self) -> str:
        return f"R{self.depth}x{self.width}"

    @property
    def units(self) -> tuple[int, int, int, int]:
        return UNITS[self.depth]

    @property
    def feature_dim(self) -> int:
        """Channels of the pre-logits embedding."""
        return 2048 * self.width


@dataclass(frozen=True)
class ModelInfo:
    """One released checkpoint."""

    name: str          # e.g. "BiT-M-R50x1"; the file is f"{name}.npz" relative to BASE_URL
    arch: Arch
    num_classes: int   # size of the head stored in the file
    kind: str          # "upstream", "ilsvrc2012", "vtab", "distill"

    @property
    def filename(self) -> str:
        return f"{self.name}.npz"

    @property
    def url(self) -> str:
        return BASE_URL + self.filename


def parse_arch(name: str) -> Arch:
    """`"R101x3"` -> Arch(101, 3); raises BiTError for anything that is not a released shape."""
    if name not in ARCHITECTURES:
        raise unknown_name("architecture", name, ARCHITECTURES)
    depth, width = name[1:].split("x")
    return Arch(int(depth), int(width))


@cache
def all_models() -> dict[str, ModelInfo]:
    """Name -> ModelInfo for every released `.npz` (the VTAB and distilled ones use sub-folders)."""
    models: dict[str, ModelInfo] = {}

    def add(name: str, arch: str, classes: int, kind: str) -> None:
        models[name] = ModelInfo(name, parse_arch(arch), classes, kind)

    for arch in ARCHITECTURES:
        add(f"BiT-S-{arch}", arch, ILSVRC_CLASSES, "upstream")
        add(f"BiT-M-{arch}", arch, IMAGENET21K_CLASSES, "upstream")
        add(f"BiT-M-{arch}-ILSVRC2012", arch, ILSVRC_CLASSES, "ilsvrc2012")
    for arch in VTAB_ARCHITECTURES:
        for run in range(3):
            for task in VTAB_TASKS:
                add(f"vtab/BiT-M-{arch}-run{run}-{task}", arch, VTAB_CLASSES[task], "vtab")
    for res in (224, 160):
        add(f"distill/R50x1_{res}", "R50x1", ILSVRC_CLASSES, "distill")
    for res in (224, 384):
        add(f"distill/R152x2_T_{res}", "R152x2", ILSVRC_CLASSES, "distill")
    return models


def get_model(name: str) -> ModelInfo:
    """Look a released model up by name; an unknown name lists the closest ones."""
    models = all_models()
    if name not in models:
        raise unknown_name("model", name, models,
                           "upstream models are BiT-S-<arch> and BiT-M-<arch>, "
                           f"<arch> one of {', '.join(ARCHITECTURES)}.")
    return models[name]
