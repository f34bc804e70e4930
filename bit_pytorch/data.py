"""The torchvision input pipeline, driven step by step by bit_common's InputPlan.

Which examples a step trains on, where each is cropped and whether it is flipped come from
`plan.batch_plan(step)`, a pure function of the step: the pipeline has no state of its own, and
resuming at step `s` needs only `s`. DataLoader workers prepare whole steps in parallel (a batch
sampler yields one list of `(step, row)` items per step); pinned memory feeds a GPU.

Preprocessing, identical in spirit and arithmetic to the tf.data pipelines of bit_jax / bit_tf2:

    uint8 HWC -> float32 -> bilinear resize (antialias) to (R, R) -> crop [top:top+c, left:left+c]
    -> horizontal flip if planned -> x / 127.5 - 1

Evaluation resizes straight to (c, c). No rounding back to uint8 anywhere.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from bit_common import datasets, tfds_source
from bit_common.datasets import DatasetInfo, Split
from bit_common.errors import DataError
from bit_common.loop import RunConfig
from bit_common.plan import InputPlan

DEFAULT_DATADIR = os.path.join("~", ".cache", "bit_datasets")


# ---- splits: labels plus images (arrays) or paths; labels never need a decoded image ---------
def _root(config: RunConfig) -> Path:
    return Path(os.path.expanduser(config.datadir or DEFAULT_DATADIR))


def _torchvision(cls, root: Path, **kwargs):
    """A torchvision dataset from `root`, downloaded there only when it is not present yet."""
    try:
        return cls(str(root), download=False, **kwargs)
    except RuntimeError:
        pass  # not there (or corrupt): download
    try:
        return cls(str(root), download=True, **kwargs)
    except Exception as e:  # offline, disk full, server gone ...
        raise DataError(
            f"{cls.__name__} is not in {root} and could not be downloaded there "
            f"({type(e).__name__}: {e}). Download it on a machine with network access and "
            f"copy it into --datadir {root}.") from None


def _cifar(root: Path, name: str, train: bool) -> Split:
    from torchvision.datasets import CIFAR10, CIFAR100

    ds = _torchvision(CIFAR10 if name == "cifar10" else CIFAR100, root, train=train)
    return Split(np.asarray(ds.targets, np.int64), np.asarray(ds.data, np.uint8), None,
                 list(ds.classes))


def _pet(root: Path, split: str) -> Split:
    from torchvision.datasets import OxfordIIITPet

    ds = _torchvision(OxfordIIITPet, root, split=split, target_types="category")
    return Split(np.asarray(ds._labels, np.int64), None, [str(p) for p in ds._images],
                 list(ds.classes))


def _flowers(root: Path, split: str) -> Split:
    from torchvision.datasets import Flowers102

    ds = _torchvision(Flowers102, root, split=split)
    return Split(np.asarray(ds._labels, np.int64), None, [str(p) for p in ds._image_files],
                 [str(i) for i in range(102)])


def load_splits(config: RunConfig, info: DatasetInfo) -> tuple[Split, Split]:
    """The full training split and the evaluation split of `--dataset` (labels, and images or
    image paths): cifar/pet/flowers/digits test, imagenet2012/imagefolder val/, and a VTAB-1k
    task's train800val200 and test read from tfds exactly as the tf.data pipeline reads them."""
    name, root = info.name, _root(config)
    if info.vtab is not None:
        # torch._dynamo (which the optimizer imports) loaded after TensorFlow has run crashes the
        # process (torch 2.14, TensorFlow 2.21), as torchvision does: load it before tfds runs.
        import torch._dynamo  # noqa: F401
        return tfds_source.load_vtab_splits(info.vtab, config.datadir)
    if name in ("cifar10", "cifar100"):
        return _cifar(root, name, train=True), _cifar(root, name, train=False)
    if name == "oxford_iiit_pet":
        return _pet(root, "trainval"), _pet(root, "test")
    if name == "oxford_flowers102":
        return _flowers(root, "train"), _flowers(root, "test")
    if name in ("imagenet2012", "imagefolder", "digits"):
        return datasets.local_splits(info, config.datadir, config.skip_bad_images)
    raise DataError(f"The PyTorch pipeline has no loader for dataset {name!r}.")


# ---- preprocessing ----------------------------------------------------------------------------
decode = datasets.pillow_decode  # an image file as uint8 RGB [H, W, 3]
image_problem = datasets.pillow_image_problem  # why `decode` fails on a file, or None


def resize(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 HWC -> float32 CHW resized to (size, size), bilinear with antialiasing.

    The arithmetic of `torchvision.transforms.v2.functional.resize(x, [size, size],
    antialias=True)` on a float tensor (the very kernel it calls, bit for bit; a test checks),
    run on the channels-last view of the HWC image, which is the fastest path.
    """
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    if tuple(x.shape[1:]) == (size, size):
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0]


def train_image(image: np.ndarray, resize_to: int, crop: int, top: int, left: int,
                flip: bool) -> torch.Tensor:
    """Resize, crop at (top, left), flip if asked, scale to [-1, 1]: float32 CHW."""
    x = resize(image, resize_to)[:, top:top + crop, left:left + crop]
    if flip:
        x = x.flip(-1)
    return (x / 127.5 - 1.0).contiguous()


def eval_image(image: np.ndarray, crop: int) -> torch.Tensor:
    """Resize straight to (crop, crop), scale to [-1, 1]: float32 CHW."""
    return (resize(image, crop) / 127.5 - 1.0).contiguous()


# numpy in, numpy out: the same conveniences as bit_tf2.data, for cross-framework checks.
def _nhwc(images: list[torch.Tensor], crop: int) -> np.ndarray:
    if not images:
        return np.zeros((0, crop, crop, 3), np.float32)
    return torch.stack(images).permute(0, 2, 3, 1).contiguous().numpy()


def preprocess_eval(images_uint8: np.ndarray, crop: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, crop, crop, 3], exactly the evaluation batches' ops."""
    return _nhwc([eval_image(im, crop) for im in np.asarray(images_uint8, np.uint8)], crop)


def preprocess_train(images_uint8: np.ndarray, resize: int, crop: int, offsets: np.ndarray,
                     flips: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, crop, crop, 3], exactly the training batches' ops
    (offsets int [N, 2] (top, left) inside the resized image, flips bool [N])."""
    images = np.asarray(images_uint8, np.uint8)
    offsets = np.asarray(offsets, np.int64).reshape(len(images), 2)
    flips = np.asarray(flips, bool).reshape(len(images))
    if len(images) and (offsets.min() < 0 or offsets.max() > resize - crop):
        raise DataError(f"Crop offsets must lie in [0, {resize - crop}] for resize {resize} and "
                        f"crop {crop}.")
    return _nhwc([train_image(im, resize, crop, int(o[0]), int(o[1]), bool(f))
                  for im, o, f in zip(images, offsets, flips)], crop)


class _SplitImages:
    """Image `i` of a Split as uint8 HWC, decoded from its file when the split holds paths (or
    from its bytes, a VTAB split's evaluation images)."""

    def __init__(self, split: Split):
        self.split = split

    def __call__(self, i: int) -> np.ndarray:
        if self.split.images is not None:
            return self.split.images[i]
        if isinstance(self.split, tfds_source.VtabSplit):  # encoded: the tf.data pipeline's decoder
            return self.split.image(i)
        path = self.split.paths[i]
        try:
            return decode(path)
        except Exception as e:  # reported in the main process as a DataError naming the file
            raise _Unreadable(datasets.undecodable_message(path, f"{type(e).__name__}: {e}")
                              ) from None


class _Unreadable(Exception):
    pass


# ---- training: one DataLoader batch per optimizer step ------------------------------------------
@dataclass
class TrainBatch:
    """The rows of one step's global batch that this process trains on."""

    step: int
    images: torch.Tensor     # float32 [b, 3, crop, crop]
    labels: torch.Tensor     # int64 [b]
    mixup_lambda: float
    mixup_perm: torch.Tensor  # int64 [b], indices into this process's rows


class TrainDataset(Dataset):
    """Items are `(step, row)`: row `row` of the global batch of `step`, as the plan says."""

    def __init__(self, split: Split, train_indices: np.ndarray, plan: InputPlan):
        self.images, self.labels = _SplitImages(split), split.labels
        self.train_indices, self.plan = np.asarray(train_indices), plan
        self._cache: dict[int, object] = {}

    def batch_plan(self, step: int):
        bp = self._cache.get(step)
        if bp is None:
            if len(self._cache) > 4:
                self._cache.clear()
            bp = self._cache[step] = self.plan.batch_plan(step)
        return bp

    def __len__(self) -> int:
        return self.plan.num_examples

    def __getitem__(self, item: tuple[int, int]):
        step, row = item
        bp = self.batch_plan(step)
        i = int(self.train_indices[bp.indices[row]])
        resize_to, crop = self.plan.train_size
        try:
            image = self.images(i)
        except _Unreadable as e:
            return None, 0, str(e)
        top, left = (int(v) for v in bp.offsets[row])
        x = train_image(image, resize_to, crop, top, left, bool(bp.flips[row]))
        return x, int(self.labels[i]), None


class StepSampler(Sampler):
    """Yields, for every step from `start` to `end`, the list of this process's `(step, row)`."""

    def __init__(self, start: int, end: int, rows: Sequence[int]):
        self.start, self.end, self.rows = start, end, list(rows)

    def __iter__(self):
        for step in range(self.start, self.end):
            yield [(step, r) for r in self.rows]

    def __len__(self) -> int:
        return max(0, self.end - self.start)


def _worker_init(_worker_id: int) -> None:
    """Workers leave SIGINT/SIGTERM to the main process, which checkpoints and then stops them
    (Ctrl-C reaches the whole process group; a worker dying of it would abort the save)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _worker_context() -> str | None:
    """Fork workers, unless JAX or TensorFlow runs threads in this process (notebooks, tests,
    benchmarks import them beside torch): forking those can deadlock, so start a forkserver."""
    return "forkserver" if {"jax", "tensorflow"} & sys.modules.keys() else None


def _loader(dataset: Dataset, sampler: Sampler, workers: int, pin_memory: bool,
            collate=None) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                      collate_fn=collate or _collate,
                      pin_memory=pin_memory, prefetch_factor=2 if workers else None,
                      worker_init_fn=_worker_init if workers else None,
                      multiprocessing_context=_worker_context() if workers else None)


def _collate(items):
    errors = [e for _, _, e in items if e]
    if errors:
        return {"error": errors[0]}
    return {"images": torch.stack([x for x, _, _ in items]),
            "labels": torch.tensor([y for _, y, _ in items], dtype=torch.int64)}


def _check(batch: dict) -> dict:
    if "error" in batch:
        raise DataError(batch["error"])
    return batch


def train_batches(split: Split, train_indices: np.ndarray, plan: InputPlan, start: int,
                  end: int, rows: range, workers: int, pin_memory: bool = False
                  ) -> Iterator[TrainBatch]:
    """Batches of steps start..end-1, restricted to global-batch `rows` (this process's slice).

    `plan.shards` must keep every mixup partner inside `rows` (one shard per process).
    """
    dataset = TrainDataset(split, train_indices, plan)
    loader = _loader(dataset, StepSampler(start, end, rows), workers, pin_memory)
    first = rows.start
    for step, batch in zip(range(start, end), loader):
        batch = _check(batch)
        bp = plan.batch_plan(step)
        perm = torch.from_numpy(bp.mixup_perm[rows.start:rows.stop] - first)
        yield TrainBatch(step, batch["images"], batch["labels"], bp.mixup_lambda, perm)


# ---- evaluation ---------------------------------------------------------------------------------
class EvalDataset(Dataset):
    def __init__(self, split: Split, crop: int):
        self.images, self.labels, self.crop = _SplitImages(split), split.labels, crop

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        try:
            image = self.images(i)
        except _Unreadable as e:
            return None, 0, str(e)
        return eval_image(image, self.crop), int(self.labels[i]), None


class _Chunks(Sampler):
    def __init__(self, rows: range, batch: int):
        self.rows, self.batch = rows, batch

    def __iter__(self):
        for i in range(self.rows.start, self.rows.stop, self.batch):
            yield list(range(i, min(i + self.batch, self.rows.stop)))

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch)


def eval_batches(split: Split, crop: int, batch: int, rows: range, workers: int,
                 pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) over `rows` of the evaluation split, the last batch possibly smaller."""
    loader = _loader(EvalDataset(split, crop), _Chunks(rows, batch), workers, pin_memory)
    for b in loader:
        b = _check(b)
        yield b["images"], b["labels"]


def shard_rows(total: int, rank: int, world: int) -> range:
    """This process's contiguous slice of `total` rows (sizes differ by at most one)."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))
