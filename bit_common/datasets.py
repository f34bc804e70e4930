"""The framework-free part of the datasets: the registry (VTAB-1k tasks as `vtab/<task>`),
`digits`, and scanning an image folder.

Framework packages decode images their own way; everything here works on labels, paths and
uint8 arrays only.
"""

from __future__ import annotations

import dataclasses
import struct
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bit_common import vtab
from bit_common.errors import DataError, unknown_name

VTAB_PREFIX = "vtab/"


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
    vtab: vtab.VtabTask | None = field(default=None, repr=False)  # a VTAB-1k task
    flip_keeps_label: bool = True  # random flips and crops are safe (bit_common.plan)
    crop_keeps_label: bool = True


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
    """Look a dataset up by name (`vtab/<task>` for a VTAB-1k task); an unknown name lists the
    closest ones."""
    if name.startswith(VTAB_PREFIX):
        return vtab_dataset(vtab.get_task(name[len(VTAB_PREFIX):]))
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS,
                           "use `imagefolder` with --datadir for your own images, or "
                           "vtab/<task> for a VTAB-1k task.")
    return DATASETS[name]


def vtab_dataset(task: vtab.VtabTask) -> DatasetInfo:
    """A VTAB-1k task as a dataset: trained on train800val200 (the 1000 examples the BiT paper's
    VTAB-1k results train on, with the rule's fixed schedule and no validation run), evaluated
    on test; the image size is read off the first training image (it differs per task)."""
    return DatasetInfo(VTAB_PREFIX + task.name, task.num_classes, None,
                       train_split=task.split("train800val200"), eval_split=task.split("test"),
                       tfds_name=task.tfds_name, vtab=task,
                       flip_keeps_label=task.flip_keeps_label,
                       crop_keeps_label=task.crop_keeps_label)


@dataclass
class Split:
    """One split of a dataset: labels plus either decoded uint8 images or image file paths."""

    labels: np.ndarray                      # int64 [N]
    images: np.ndarray | None = None        # uint8 [N, H, W, 3], or object [N] of uint8
                                            # [H, W, 3] where the sizes differ (VTAB)
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


def undecodable_message(path: str | Path, reason: str) -> str:
    """The one message for an image file that does not decode, the same in the three pipelines."""
    return (f"Cannot decode image {path} ({reason}). Replace or remove the file, or pass "
            f"--skip_bad_images to leave out every image that does not decode; then run the "
            f"same command again (a run resumes from its last checkpoint).")


def scan_image_folder(datadir: str | Path, split: str,
                      class_names: list[str] | None = None, warn=None,
                      skip_bad: bool = False) -> Split:
    """Paths and labels of `<datadir>/<split>/<class>/<image>`; sorted class names give labels.

    Files that are not images (by extension and magic bytes) are skipped with a warning naming
    them. An image whose header does not parse (`header_problem`) is an error naming it, or with
    `skip_bad` is left out with a warning; an empty class folder or a split without images is an
    error.
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
    warn = warn or sys.stderr
    paths, labels, corrupt = [], [], []
    for label, name in enumerate(class_names):
        files = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and not p.name.startswith("."))
        images = []
        for p in files:
            if p.suffix.lower() not in IMAGE_SUFFIXES or not _looks_like_image(p):
                warn.write(f"warning: skipping {p}: not a JPEG/PNG/BMP/GIF/WebP image\n")
            elif (problem := header_problem(p)) is not None:
                corrupt.append((p, problem))
            else:
                images.append(p)
        if not images:
            raise DataError(f"Class folder {root / name} holds no readable images "
                            f"({len(files)} other files). Add images or remove the folder.")
        paths += [str(p) for p in images]
        labels += [label] * len(images)
    _report_undecodable(corrupt, skip_bad, f"{root}", warn)
    return Split(np.asarray(labels, np.int64), None, paths, list(class_names))


def _report_undecodable(bad: list[tuple[Path | str, str]], skip: bool, where: str,
                        warn) -> None:
    """An error naming the first undecodable file (and how many there are), or with `skip` a
    warning per file and the count."""
    if not bad:
        return
    if not skip:
        more = f" ({len(bad) - 1} more images in {where} do not decode either.)" \
            if len(bad) > 1 else ""
        raise DataError(undecodable_message(*bad[0]) + more)
    for path, problem in bad:
        warn.write(f"warning: leaving out {path}: it does not decode ({problem})\n")
    warn.write(f"warning: left out {len(bad)} image(s) of {where} that do not decode "
               f"(--skip_bad_images)\n")


def header_problem(path: str | Path) -> str | None:
    """What makes the header of an image file (already recognised by its magic bytes) unusable,
    or None: cheap checks at listing time (an empty or cut-off header, zero width or height, a
    JPEG whose segments run past the end of the file). A full decode (`verify_images`) finds
    the rest."""
    with open(path, "rb") as f:
        data = f.read(_HEADER_BYTES)
        size = f.seek(0, 2)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_header_problem(data, size)
    if data.startswith(b"\x89PNG"):
        if len(data) < 33 or data[12:16] != b"IHDR":
            return "truncated PNG header"
        w, h = struct.unpack(">II", data[16:24])
        return "zero width or height in its PNG header" if not (w and h) else None
    if data.startswith(b"GIF"):
        if len(data) < 13:
            return "truncated GIF header"
        w, h = struct.unpack("<HH", data[6:10])
        return "zero width or height in its GIF header" if not (w and h) else None
    if data.startswith(b"BM") and len(data) < 26:
        return "truncated BMP header"
    return None


_HEADER_BYTES = 1 << 20  # EXIF and ICC segments come before a JPEG's frame header
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field (TEM, RSTn)
_JPEG_FRAMES = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOFn


def _jpeg_header_problem(data: bytes, size: int) -> str | None:
    """Walk a JPEG's marker segments from SOI to the frame header (SOFn), strictly."""
    i = 2
    while True:
        if i + 4 > len(data):
            # Past the bytes read: cut off if the file ends here, else give the decoder the say.
            return "truncated JPEG header" if len(data) >= size else None
        if data[i] != 0xFF:
            return f"corrupt JPEG header: no marker at byte {i}"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):
            return "corrupt JPEG header: image data before the frame header"
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if length < 2 or i + 2 + length > size:
            return f"corrupt or cut-off JPEG: a segment at byte {i} runs past the end of the file"
        if marker in _JPEG_FRAMES:
            if i + 9 > len(data):
                return "truncated JPEG header"
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return "zero width or height in its JPEG header" if not (w and h) else None
        i += 2 + length


def pillow_decode(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3], decoded by Pillow (the PyTorch pipeline's decoder)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy


def pillow_image_problem(path: str) -> str | None:
    """Why `pillow_decode` fails on the file at `path`, or None."""
    try:
        pillow_decode(path)
    except Exception as e:  # any failure to decode is the file's problem
        return f"{type(e).__name__}: {e}"
    return None


def verify_images(split: Split, problem: Callable[[str], str | None], skip: bool, what: str,
                  threads: int = 4, warn=None) -> Split:
    """Decode every image file of `split` with `problem` (the framework pipeline's decoder: the
    problem text, or None when the file decodes), with a progress bar. An undecodable file is a
    DataError naming it, or with `skip` the split without it (a warning per file, and the count).
    A split held in memory or in tfds is returned as it is."""
    if split.paths is None:
        return split
    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, threads)) as pool:  # decoders release the GIL
        found = list(tqdm(pool.map(problem, split.paths), total=len(split.paths),
                          desc=f"decoding the {what} images", unit="img", file=sys.stderr,
                          leave=False, mininterval=1.0))
    bad = [(p, f) for p, f in zip(split.paths, found) if f is not None]
    _report_undecodable(bad, skip, f"the {what} split", warn or sys.stderr)
    if not bad:
        return split
    keep = np.asarray([f is None for f in found])
    labels = split.labels[keep]
    missing = sorted(set(range(len(split.class_names))) - set(labels.tolist()))
    if missing:
        raise DataError(f"No image of class {split.class_names[missing[0]]!r} in the {what} "
                        f"split decodes. Add images that do, or remove the class folder.")
    return dataclasses.replace(split, labels=labels,
                               paths=[p for p, k in zip(split.paths, keep) if k])


def first_image_hw(split: Split) -> tuple[int, int]:
    """(height, width) of the split's first image, in memory or in a file (the hyper-rule's
    resolution for datasets whose images differ in size)."""
    if split.images is not None:
        if not len(split.images):
            raise DataError("The training split is empty.")
        return tuple(int(v) for v in np.shape(split.images[0])[:2])
    return image_hw(split.paths[0])


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
                          class_names: list[str] | None = None, skip_bad: bool = False) -> Split:
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
        return scan_image_folder(datadir, "train", skip_bad=skip_bad)
    if class_names is None:
        root = Path(datadir) / "train"
        class_names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() \
            else None
    return scan_image_folder(datadir, "val", class_names=class_names, skip_bad=skip_bad)


def local_splits(info: DatasetInfo, datadir: str | None, skip_bad: bool = False
                 ) -> tuple[Split, Split]:
    """(train, evaluation) of `digits` or of `<datadir>/train/` and `<datadir>/val/` folders."""
    train = load_folder_or_digits(info, datadir, train=True, skip_bad=skip_bad)
    return train, load_folder_or_digits(info, datadir, train=False,
                                        class_names=train.class_names or None,
                                        skip_bad=skip_bad)
