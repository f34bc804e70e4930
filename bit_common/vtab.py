"""The 19 VTAB-1k tasks as data: tfds builder, splits, label, classes and safe augmentation.

VTAB-1k (Zhai et al. 2019, https://arxiv.org/abs/1910.04867) fine-tunes on 800 training and 200
validation examples of each task (`train800`, `val200`; `train800val200` for the final run) and
reports top-1 on `test`. Every definition here is the canonical one of
https://github.com/google-research/task_adaptation, `task_adaptation/data/<dataset>.py` (the
builders that define train800 and val200: commit ed9b417 for most, master for dtd.py and
dmlab.py): the `tfds.builder(...)` string, the `tfds_splits` dict, the preprocess function that
derives the label and `num_classes`. Where a builder computes a slice from a split's size
(`PERCENT * n // 100`, or `test[50%:]` for smallnorb), the boundary is worked out here from the
size TFDS gives that version (`split_sizes`, from the TFDS catalog) and written as a literal
tfds split string, so that choosing the examples needs no dataset metadata.

task_adaptation itself applies no augmentation (its data_loader only resizes), so
`flip_keeps_label` and `crop_keeps_label` follow the BiT paper instead (Kolesnikov et al. 2020,
sec. 3.3: random flips and crops are left out on tasks where they destroy the label, such as an
object's orientation or coordinates in pixel space), applied to each label's definition; the
comment above each structured task says why.

Names are those of the released fine-tuned checkpoints (`vtab/BiT-M-{arch}-run{r}-{name}.npz`);
`bit_common.registry` takes its task list and head sizes from here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bit_common.errors import DataError, unknown_name

GROUPS: tuple[str, ...] = ("natural", "specialized", "structured")
SPLITS: tuple[str, ...] = ("train800", "val200", "train800val200", "test")

Example = Mapping[str, Any]  # one tfds example as numpy values (what tfds.as_numpy yields)


# ---- labels: pure functions of one example ----------------------------------------------------
def _attribute(example: Example, key: str = "label") -> int:
    """The example's own class label `key`."""
    return int(example[key])


def _bin(value: float, edges: np.ndarray) -> int:
    """The index of the last edge strictly below `value`: bins (e0, e1], (e1, e2], ..., and -1 at
    or below e0. task_adaptation's `reduce_max(where(edges - value < 0))` on float32 values."""
    return int(np.count_nonzero(edges < np.float32(value))) - 1


def _dsprites_bin(example: Example, key: str, factor: float) -> int:
    """A dsprites latent index grouped into coarser classes: floor(index / factor) in float32,
    as task_adaptation's DSpritesData does (factor = original classes / 16)."""
    return int(np.floor(np.float32(example[key]) / np.float32(factor)))


def _clevr_count(example: Example) -> int:
    """Number of objects minus 3 (a CLEVR scene holds 3 to 10)."""
    return len(example["objects"]["size"]) - 3


# Depth (pixel_coords z) of the closest object; task_adaptation's thresholds, float32-exact.
CLEVR_DISTANCE_EDGES = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0], np.float32)


def _clevr_distance(example: Example) -> int:
    """Bin of the smallest pixel_coords z over the scene's objects."""
    z = np.asarray(example["objects"]["pixel_coords"], np.float32).reshape(-1, 3)[:, 2]
    return _bin(z.min(), CLEVR_DISTANCE_EDGES)


KITTI_VEHICLE_TYPES = 3  # `type` 0, 1, 2: Car, Van, Truck
KITTI_NO_VEHICLE = 1000.0  # the depth that stands for "no vehicle" (the last class)
KITTI_DISTANCE_EDGES = np.array([-100.0, 8.0, 20.0, 999.0], np.float32)


def _kitti_distance(example: Example) -> int:
    """Bin of the depth (location z, metres) of the closest car, van or truck; 3 without one."""
    objects = example["objects"]
    types = np.asarray(objects["type"]).reshape(-1)
    z = np.asarray(objects["location"], np.float32).reshape(-1, 3)[:, 2]
    vehicles = np.append(z[types < KITTI_VEHICLE_TYPES], np.float32(KITTI_NO_VEHICLE))
    return _bin(vehicles.min(), KITTI_DISTANCE_EDGES)


# ---- the task record ------------------------------------------------------------------------
@dataclass(frozen=True)
class VtabTask:
    """One VTAB-1k task, as task_adaptation defines it."""

    name: str                    # the released checkpoints' name, e.g. "clevr-count"
    group: str                   # "natural", "specialized" or "structured"
    tfds_name: str               # tfds.builder() argument, config and version included
    num_classes: int
    train800: str                # tfds split strings
    val200: str
    test: str
    label_fn: Callable[[Example], int] = field(repr=False)
    flip_keeps_label: bool       # a random horizontal flip leaves the label correct
    crop_keeps_label: bool       # a random crop leaves the label correct
    split_sizes: dict[str, int]  # examples in each tfds split of that version (TFDS catalog)
    source: str                  # the task_adaptation registry entry that defines the task
    image_key: str = "image"
    pixel_scale: int = 1         # dsprites stores 0/1 pixels, which task_adaptation scales by 255

    def split(self, name: str) -> str:
        """The tfds split string of "train800", "val200", "train800val200" or "test"."""
        if name not in SPLITS:
            raise DataError(f"VTAB-1k task {self.name} has splits {', '.join(SPLITS)}, not "
                            f"{name!r}.")
        if name == "train800val200":
            return f"{self.train800}+{self.val200}"
        return getattr(self, name)

    def label(self, example: Example) -> int:
        """The class of one tfds example (a dict of numpy values) of `tfds_name`."""
        try:
            label = self.label_fn(example)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise DataError(
                f"VTAB-1k task {self.name} cannot derive a label from this example "
                f"({type(e).__name__}: {e}); it takes examples of tfds {self.tfds_name} as "
                f"tfds.as_numpy gives them, with the keys of its features.") from None
        if not 0 <= label < self.num_classes:
            raise DataError(
                f"VTAB-1k task {self.name}: this example gives label {label}, outside "
                f"0..{self.num_classes - 1}; it is not an example of tfds {self.tfds_name} "
                f"(check the dataset name and version).")
        return label

    def image(self, example: Example) -> np.ndarray:
        """The example's image as uint8 [H, W, 3], as task_adaptation feeds it: one channel
        (dsprites, smallnorb) repeated to three, dsprites' 0/1 pixels scaled to 0/255."""
        try:
            img = np.asarray(example[self.image_key])
        except KeyError:
            raise DataError(f"VTAB-1k task {self.name}: the example has no {self.image_key!r} "
                            f"image; it takes examples of tfds {self.tfds_name}.") from None
        if img.ndim == 2:
            img = img[..., None]
        if img.ndim != 3 or img.shape[-1] not in (1, 3):
            raise DataError(f"VTAB-1k task {self.name}: image of shape {img.shape}, expected "
                            f"[H, W, 1] or [H, W, 3].")
        img = np.broadcast_to(img, img.shape[:2] + (3,)).astype(np.uint8)
        return img * np.uint8(self.pixel_scale) if self.pixel_scale != 1 else img


TASKS: dict[str, VtabTask] = {t.name: t for t in (
    # ---- natural: photographs of objects and scenes; flips and crops keep the class --------
    # val200 starts at 90% of train: 90 * 3060 // 100 = 2754.
    VtabTask("caltech101", "natural", "caltech101:3.*.*", 102,
             "train[:800]", "train[2754:2954]", "test", _attribute, True, True,
             {"train": 3060, "test": 6084}, "caltech101"),
    # 90 * 50000 // 100 = 45000.
    VtabTask("cifar100", "natural", "cifar100:3.*.*", 100,
             "train[:800]", "train[45000:45200]", "test", _attribute, True, True,
             {"train": 50000, "test": 10000}, 'cifar(num_classes=100)'),
    VtabTask("dtd", "natural", "dtd:3.*.*", 47,
             "train[:800]", "validation[:200]", "test", _attribute, True, True,
             {"train": 1880, "validation": 1880, "test": 1880}, "dtd"),
    VtabTask("oxford_flowers102", "natural", "oxford_flowers102:2.*.*", 102,
             "train[:800]", "validation[:200]", "test", _attribute, True, True,
             {"train": 1020, "validation": 1020, "test": 6149}, "oxford_flowers102"),
    # 80 * 3680 // 100 = 2944. task_adaptation pins 3.*.*, which tfds 4.x no longer builds or
    # reads; 4.0.0 has the same splits, sizes and 37 breed labels (it adds head boxes and
    # re-encodes the images that were corrupt).
    VtabTask("oxford_iiit_pet", "natural", "oxford_iiit_pet:4.*.*", 37,
             "train[:800]", "train[2944:3144]", "test", _attribute, True, True,
             {"train": 3680, "test": 3669}, "oxford_iiit_pet"),
    VtabTask("sun397", "natural", "sun397/tfds:4.*.*", 397,
             "train[:800]", "validation[:200]", "test", _attribute, True, True,
             {"train": 76128, "validation": 10875, "test": 21750}, "sun397"),
    # 90 * 73257 // 100 = 65931. A mirrored or shifted digit is still that digit.
    VtabTask("svhn", "natural", "svhn_cropped:3.*.*", 10,
             "train[:800]", "train[65931:66131]", "test", _attribute, True, True,
             {"train": 73257, "test": 26032, "extra": 531131}, "svhn"),
    # ---- specialized: medical and remote-sensing images, no canonical orientation --------------
    VtabTask("patch_camelyon", "specialized", "patch_camelyon:2.*.*", 2,
             "train[:800]", "validation[:200]", "test", _attribute, True, True,
             {"train": 262144, "validation": 32768, "test": 32768}, "patch_camelyon"),
    # train / val / test are 60 / 20 / 20% of the one train split of 27000: 16200, 5400, 5400.
    VtabTask("eurosat", "specialized", "eurosat/rgb:2.*.*", 10,
             "train[:800]", "train[16200:16400]", "train[21600:]", _attribute, True, True,
             {"train": 27000}, 'eurosat(subset="rgb")'),
    # 60 / 20 / 20% of 31500: 18900, 6300, 6300.
    VtabTask("resisc45", "specialized", "resisc45:3.*.*", 45,
             "train[:800]", "train[18900:19100]", "train[25200:]", _attribute, True, True,
             {"train": 31500}, "resisc45"),
    VtabTask("diabetic_retinopathy", "specialized",
             "diabetic_retinopathy_detection/btgraham-300:3.*.*", 5,
             "train[:800]", "validation[:200]", "test", _attribute, True, True,
             {"train": 35126, "validation": 10906, "test": 42670},
             'diabetic_retinopathy(config="btgraham-300")'),
    # ---- structured: counts, distances, positions and poses ---------------------------------
    # 90 * 70000 // 100 = 63000; tfds' validation split is the test set. A flip keeps the
    # count; a crop can cut objects out of the frame.
    VtabTask("clevr-count", "structured", "clevr:3.*.*", 8,
             "train[:800]", "train[63000:63200]", "validation", _clevr_count, True, False,
             {"train": 70000, "validation": 15000, "test": 15000}, 'clevr(task="count_all")'),
    # A flip keeps every depth; a crop can cut the closest object out of the frame.
    VtabTask("clevr-distance", "structured", "clevr:3.*.*", 6,
             "train[:800]", "train[63000:63200]", "validation", _clevr_distance, True, False,
             {"train": 70000, "validation": 15000, "test": 15000},
             'clevr(task="closest_object_distance")'),
    # {close, far, very far} x {positive, negative reward} of the object in view: a flip keeps
    # both; a crop can cut the object out of the frame.
    VtabTask("dmlab", "structured", "dmlab:2.0.1", 6,
             "train[:800]", "validation[:200]", "test", _attribute, True, False,
             {"train": 65550, "validation": 22628, "test": 22735}, "dmlab"),
    # task_adaptation pins kitti:3.1.0 (its maintainers: 3.2.0 holds the same data, issue #18).
    # A flip keeps every depth; a crop can cut the closest vehicle out of the frame.
    VtabTask("kitti-distance", "structured", "kitti:3.1.0", 4,
             "train[:800]", "validation[:200]", "test", _kitti_distance, True, False,
             {"train": 6347, "validation": 423, "test": 711},
             'kitti(task="closest_vehicle_distance")'),
    # train / val / test are 80 / 10 / 10% of the one train split of 737280: 589824, 73728,
    # 73728. The label is a coordinate in pixel space: a flip mirrors it (class k -> 15 - k),
    # a crop shifts it.
    VtabTask("dsprites-xpos", "structured", "dsprites:2.*.*", 16,
             "train[:800]", "train[589824:590024]", "train[663552:]",
             functools.partial(_dsprites_bin, key="label_x_position", factor=32 / 16),
             False, False, {"train": 737280},
             'dsprites(predicted_attribute="label_x_position", num_classes=16)', pixel_scale=255),
    # The label is an orientation, which a flip mirrors; a crop keeps it.
    VtabTask("dsprites-orientation", "structured", "dsprites:2.*.*", 16,
             "train[:800]", "train[589824:590024]", "train[663552:]",
             functools.partial(_dsprites_bin, key="label_orientation", factor=40 / 16),
             False, True, {"train": 737280},
             'dsprites(predicted_attribute="label_orientation", num_classes=16)',
             pixel_scale=255),
    # val is test[:50%] and test test[50%:]: 12150 of 24300. The azimuth is an orientation,
    # which a flip mirrors; a crop keeps it.
    VtabTask("smallnorb-azimuth", "structured", "smallnorb:2.*.*", 18,
             "train[:800]", "test[:200]", "test[12150:]",
             functools.partial(_attribute, key="label_azimuth"), False, True,
             {"train": 24300, "test": 24300}, 'smallnorb(predicted_attribute="label_azimuth")'),
    # The camera's elevation survives a flip and a crop.
    VtabTask("smallnorb-elevation", "structured", "smallnorb:2.*.*", 9,
             "train[:800]", "test[:200]", "test[12150:]",
             functools.partial(_attribute, key="label_elevation"), True, True,
             {"train": 24300, "test": 24300}, 'smallnorb(predicted_attribute="label_elevation")'),
)}

# The registry's view: the names of the released fine-tuned files and their head sizes.
VTAB_TASKS: tuple[str, ...] = tuple(TASKS)
VTAB_CLASSES: dict[str, int] = {name: t.num_classes for name, t in TASKS.items()}


def get_task(name: str) -> VtabTask:
    """Look a VTAB-1k task up by its released name; an unknown name lists all 19."""
    if name not in TASKS:
        raise DataError(str(unknown_name("VTAB-1k task", name, TASKS,
                                         f"they are {', '.join(TASKS)}.")))
    return TASKS[name]


def group_means(top1_by_task: Mapping[str, float]) -> dict[str, float]:
    """VTAB-1k's summary of per-task top-1: the mean of each group whose tasks are all present,
    and `mean`, over all 19 tasks (each task weighing the same, as VTAB reports it) once all
    are. An unknown task name is a DataError."""
    for name in top1_by_task:
        get_task(name)
    means = {}
    for group in GROUPS:
        names = [n for n, t in TASKS.items() if t.group == group]
        if all(n in top1_by_task for n in names):
            means[group] = math.fsum(top1_by_task[n] for n in names) / len(names)
    if len(top1_by_task) == len(TASKS):
        means["mean"] = math.fsum(top1_by_task.values()) / len(TASKS)
    return means
