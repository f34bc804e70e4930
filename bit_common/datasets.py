"""The framework-free part of the datasets: the registry, `digits`, and scanning an image folder.

Framework packages decode images their own way; everything here works on labels, paths and
uint8 arrays only.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bit_common.errors import DataError, unknown_name


@dataclass(frozen=True)
class DatasetInfo:
    """What the hyper-rule and the pipelines need to know about a dataset."""

    name: str
    num_classes: int | None      # None: read off the data (imagefolder)
    image_hw: tuple[int, int] | None  # original image size; None: read off the data
    train_split: str = "train"
    eval_split: str = "test"
    tfds_name: str | None = None
    needs_datadir: bool = False


DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo("cifar10", 10, (32, 32), tfds_name="cifar10"),
    DatasetInfo("cifar100", 100, (32, 32), tfds_name="cifar100"),
    DatasetInfo("oxford_iiit_pet", 37, (224, 224), tfds_name="oxford_iiit_pet"),
    DatasetInfo("oxford_flowers102", 102, (224, 224), tfds_name="oxford_flowers102"),
    DatasetInfo("imagenet2012", 1000, (224, 224), eval_split="validation",
                tfds_name="imagenet2012"),
    DatasetInfo("digits", 10, (8, 8)),
    DatasetInfo("imagefolder", None, None, eval_split="val", needs_datadir=True),
)}


def get_dataset(name: str) -> DatasetInfo:
    """Look a dataset up by name; an unknown name lists the closest ones."""
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS,
                           "use `imagefolder` with --datadir for your own images.")
    return DATASETS[name]


@dataclass
class Split:
    """One split of a dataset: labels plus either decoded uint8 images or image file paths."""

    labels: np.ndarray                      # int64 [N]
    images: np.ndarray | None = None        # uint8 [N, H, W, 3]
    paths: list[str] | None = None          # image files, decoded by the framework pipeline
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# ---- digits: scikit-learn's bundled 8x8 handwritten digits, a real offline dataset -----------
DIGITS_TEST_EVERY = 5  # every 5th example (by index) is the fixed test split: 1437 train / 360 test


def load_digits(split: str) -> Split:
    """`digits` as uint8 RGB images (0..16 scaled to 0..255); split is 'train' or 'test'."""
    if split not in ("train", "test"):
        raise DataError(f"digits has splits 'train' and 'test', not {split!r}.")
    from sklearn.datasets import load_digits as sk_load_digits  # not a framework; lazy: slow import

    data = sk_load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    is_test = np.arange(len(images)) % DIGITS_TEST_EVERY == 0
    keep = is_test if split == "test" else ~is_test
    return Split(data.target[keep].astype(np.int64), images[keep], None,
                 [str(i) for i in range(10)])


# ---- imagefolder: <datadir>/train/<class>/*.jpg and <datadir>/val/<class>/*.jpg ---------------
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF87a", b"GIF89a", b"RIFF")


def _looks_like_image(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return any(head.startswith(m) for m in _MAGIC) and (head[:4] != b"RIFF" or head[8:] == b"WEBP")


def scan_image_folder(datadir: str | Path, split: str,
                      class_names: list[str] | None = None, warn=None) -> Split:
    """Paths and labels of `<datadir>/<split>/<class>/<image>`; sorted class names give labels.

    Files that are not images (by extension and magic bytes) are skipped with a warning naming
    them; an empty class folder or a split without images is an error.
    """
    root = Path(datadir) / split
    if not root.is_dir():
        raise DataError(f"imagefolder expects {root}/ with one sub-folder per class "
                        f"(<datadir>/train/<class>/*.jpg and <datadir>/val/<class>/*.jpg); "
                        f"{root} is not a folder. Check --datadir.")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if class_names is None:
        class_names = found
    elif found != class_names:
        raise DataError(f"{root} has classes {found}, but the training split has "
                        f"{class_names}. Both splits need the same class folders.")
    if not class_names:
        raise DataError(f"{root} has no class sub-folders. Put each class's images in "
                        f"{root}/<class name>/.")
    paths, labels, skipped = [], [], []
    for label, name in enumerate(class_names):
        files = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and _looks_like_image(p)]
        skipped += [p for p in files if p not in images]
        if not images:
            raise DataError(f"Class folder {root / name} holds no readable images "
                            f"({len(files)} other files). Add images or remove the folder.")
        paths += [str(p) for p in images]
        labels += [label] * len(images)
    for p in skipped:
        (warn or sys.stderr).write(f"warning: skipping {p}: not a JPEG/PNG/BMP/GIF/WebP image\n")
    return Split(np.asarray(labels, np.int64), None, paths, list(class_names))


def image_hw(path: str | Path) -> tuple[int, int]:
    """(height, width) of a PNG or JPEG read from its header, without decoding the pixels."""
    with open(path, "rb") as f:
        data = f.read(1 << 16)
    if data.startswith(b"\x89PNG"):
        w, h = struct.unpack(">II", data[16:24])
        return h, w
    if data.startswith(b"\xff\xd8"):
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return h, w
            i += 2 + length
    from PIL import Image  # other formats: let Pillow read the header
    with Image.open(path) as img:
        return img.height, img.width


def load_folder_or_digits(info: DatasetInfo, datadir: str | None, train: bool,
                          class_names: list[str] | None = None) -> Split:
    """`digits`, or a dataset kept as `<datadir>/train/<class>/` and `<datadir>/val/<class>/`.

    The framework-free sources both pipelines share. The validation split takes the training
    split's class names (read from `train/` when not given) so its labels mean the same.
    """
    if info.name == "digits":
        return load_digits("train" if train else "test")
    if not datadir:
        raise DataError(f"--dataset {info.name} needs --datadir (the folder holding "
                        f"train/<class>/ and val/<class>/).")
    if train:
        return scan_image_folder(datadir, "train")
    if class_names is None:
        root = Path(datadir) / "train"
        class_names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() \
            else None
    return scan_image_folder(datadir, "val", class_names=class_names)
