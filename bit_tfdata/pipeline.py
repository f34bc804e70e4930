"""The one tf.data + tensorflow-datasets input pipeline, shared by bit_jax and bit_tf2.

Every random choice comes from `setup.plan.batch_plan(step)` (bit_common.plan), so the training
stream is a pure function of the step: `train_dataset(setup, s)` yields exactly the batches
`s, s+1, ...` that a run started at 0 would have seen there. Mixup is *not* applied here: each
batch carries `mixup_lambda` and `mixup_perm` and the model step mixes the full batch.

Preprocessing (identical to bit_pytorch's pipeline, op for op):

    uint8 -> float32 -> tf.image.resize((R, R), bilinear, antialias=True)   (no rounding)
          -> crop [top:top+crop, left:left+crop] at the plan's offset
          -> left-right flip where the plan says
          -> x / 127.5 - 1                                                  float32 in [-1, 1]

with (R, crop) = `setup.plan.train_size`; evaluation resizes straight to (crop, crop).

Where the images come from:

- `digits`: uint8 arrays in memory (`Split.images`).
- `vtab/<task>`: a `tfds_source.VtabSplit`, read by `bit_common.tfds_source` exactly as
  bit_pytorch reads it: the training images decoded in memory (an object array where their
  sizes differ, fetched by index), the evaluation images encoded, decoded by its `image(i)`.
- `imagefolder` (and `imagenet2012` when --datadir holds `train/` and `val/` folders): files
  (`Split.paths`), read and decoded with `tf.io.decode_image(channels=3,
  expand_animations=False)` in a `tf.py_function`. A file that does not decode gives a 1x1
  placeholder image and its message in the batch's `error` (TensorFlow would print the
  py_function's traceback for a raised error); `batches()` raises it as a `DataError` naming
  the file, before the batch is used.
- tfds datasets: a `TfdsSplit` (a `Split` with the labels and what is needed to re-read examples
  by index). Labels are read with the image feature skipped (`SkipDecoding`), so few-shot sampling
  never decodes an image. Random access by index:
    * splits up to `IN_MEMORY_BYTES` (4 GiB; env BIT_TFDS_IN_MEMORY_BYTES), e.g. all of CIFAR,
      pets, flowers, ImageNet's validation split: the *encoded* images (PNG/JPEG bytes) are kept
      in memory from the same single pass that reads the labels (CIFAR-10 train: ~120 MB, a few
      seconds) and decoded in the pipeline;
    * larger splits (ImageNet train): tfds' ArrayRecord random access (`as_data_source`) when the
      dataset was prepared as array_record (this module prepares imagenet2012 that way when it
      prepares it); otherwise the encoded bytes of only the examples the run needs (a few-shot
      subset) are gathered in one pass, and a subset too large for memory is a `DataError`
      explaining the two ways out (array_record, or train/ val/ folders).
    Evaluation of a large split streams it in order, without random access.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from bit_common import tfds_source
from bit_common.datasets import DatasetInfo, Split, local_splits, undecodable_message
from bit_common.errors import DataError
from bit_common.loop import RunConfig, RunSetup
from bit_common.plan import sharded

AUTOTUNE = tf.data.AUTOTUNE
IN_MEMORY_BYTES = int(os.environ.get("BIT_TFDS_IN_MEMORY_BYTES", 4 << 30))


# ---- splits ------------------------------------------------------------------------------------
@dataclass
class TfdsSplit(Split):
    """A tfds split: labels, plus what is needed to re-read examples by index."""

    tfds_name: str = ""
    split_name: str = ""
    builder: Any = field(default=None, repr=False)
    encoded: np.ndarray | None = field(default=None, repr=False)  # object [N] of bytes, or None


def load_splits(config: RunConfig, info: DatasetInfo) -> tuple[Split, Split]:
    """The full training split and the evaluation split (digits 'test', imagefolder 'val',
    tfds `info.eval_split`): labels, plus images in memory, file paths or a tfds handle."""
    if info.name == "digits" or _image_folders(config, info):
        return local_splits(info, config.datadir, config.skip_bad_images)
    if info.vtab is not None:
        return tfds_source.load_vtab_splits(info.vtab, config.datadir)
    if info.tfds_name:
        builder = _tfds_builder(config, info)
        return _load_tfds(builder, info, info.train_split), _load_tfds(builder, info,
                                                                       info.eval_split)
    raise DataError(f"Dataset {info.name!r} has no loader in the tf.data pipeline.")


def _image_folders(config: RunConfig, info: DatasetInfo) -> bool:
    if info.name == "imagefolder":
        return True
    datadir = config.datadir
    return (info.name == "imagenet2012" and bool(datadir) and (Path(datadir) / "train").is_dir()
            and (Path(datadir) / "val").is_dir())


def _tfds_builder(config: RunConfig, info: DatasetInfo) -> Any:
    import tensorflow_datasets as tfds

    datadir = config.datadir
    try:
        builder = tfds.builder(info.tfds_name, data_dir=datadir)
    except Exception as e:
        raise DataError(f"tensorflow-datasets cannot open {info.tfds_name!r} in "
                        f"{datadir or 'its default folder'} ({type(e).__name__}: {e}).") from None
    if not builder.is_prepared():
        manual = config.tfds_manual_dir
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual),
                # The big one is written with random access, so full training can read it by index.
                file_format="array_record" if info.name == "imagenet2012" else None)
        except Exception as e:
            hint = (" imagenet2012 cannot be downloaded: put ILSVRC2012_img_train.tar and "
                    "ILSVRC2012_img_val.tar in --tfds_manual_dir, or give --datadir a folder with "
                    "train/<class>/ and val/<class>/ image folders."
                    if info.name == "imagenet2012" else
                    " Check the network, or prepare it elsewhere and point --datadir at that "
                    "tensorflow_datasets folder.")
            raise DataError(f"Could not download and prepare tfds dataset {info.tfds_name!r} "
                            f"in {builder.data_dir} ({type(e).__name__}: {e}).{hint}") from None
    return builder


def _split_bytes(builder: Any, split: str) -> int:
    try:
        return int(builder.info.splits[split].num_bytes)
    except Exception:  # unknown (e.g. mocked metadata): treat as small
        return 0


def _read_tfds(builder: Any, split: str, keep: Callable[[np.ndarray], np.ndarray] | bool
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One in-order pass, images skipped: (labels, kept bytes or None, kept indices or None).

    `keep` True keeps every image's encoded bytes, False none, a function of the example indices
    returns a boolean mask of those to keep.
    """
    import tensorflow_datasets as tfds

    try:
        ds = builder.as_dataset(split=split, shuffle_files=False,
                                decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:
        raise DataError(f"Cannot read split {split!r} of tfds dataset {builder.name!r} "
                        f"({type(e).__name__}: {e}).") from None
    want_bytes = keep is not False
    ds = ds.map(lambda ex: (ex["label"], ex["image"]) if want_bytes else (ex["label"],),
                num_parallel_calls=AUTOTUNE).batch(4096).prefetch(2)
    labels, blobs, kept, start = [], [], [], 0
    for batch in ds.as_numpy_iterator():
        lab = batch[0]
        labels.append(lab.astype(np.int64))
        if want_bytes:
            idx = np.arange(start, start + len(lab), dtype=np.int64)
            mask = np.ones(len(lab), bool) if keep is True else keep(idx)
            blobs.append(batch[1][mask])
            kept.append(idx[mask])
        start += len(lab)
    if not labels:
        raise DataError(f"Split {split!r} of tfds dataset {builder.name!r} is empty.")
    lab = np.concatenate(labels)
    if not want_bytes:
        return lab, None, None
    return lab, np.concatenate(blobs), np.concatenate(kept)


def _load_tfds(builder: Any, info: DatasetInfo, split: str) -> TfdsSplit:
    small = _split_bytes(builder, split) <= IN_MEMORY_BYTES
    labels, encoded, _ = _read_tfds(builder, split, keep=small)
    try:
        names = list(builder.info.features["label"].names)
    except Exception:
        names = [str(i) for i in range(int(labels.max()) + 1)]
    return TfdsSplit(labels, None, None, names, tfds_name=info.tfds_name, split_name=split,
                     builder=builder, encoded=encoded)


# ---- where one example's uint8 image comes from --------------------------------------------------
def _rgb_uint8(images: np.ndarray) -> np.ndarray:
    """[N, H, W], [N, H, W, 1] or [N, H, W, 3] uint8 -> [N, H, W, 3]."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"Images must be uint8, got {images.dtype}.")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"Images must be [N, H, W, 3] (or grayscale), got {images.shape}.")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _decode_bytes(data: tf.Tensor) -> tf.Tensor:
    img = tf.io.decode_image(data, channels=3, expand_animations=False)
    img.set_shape([None, None, 3])
    return img


def _decode_file(path: str) -> tf.Tensor:
    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


def _op_problem(e: tf.errors.OpError) -> str:
    """A TensorFlow op error as `<Class>: <message>`, without the op and device names."""
    message = re.sub(r"\{\{.*?\}\}\s*", "", e.message or "")
    message = re.sub(r"\s*\[Op:.*$", "", message, flags=re.S).strip()
    return f"{type(e).__name__}: {message}"


def image_problem(path: str) -> str | None:
    """Why this pipeline cannot decode the image file at `path`, or None (--verify_images)."""
    try:
        _decode_file(path)
    except tf.errors.OpError as e:
        return _op_problem(e)
    return None


_PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)


def _read_file_py(path: tf.Tensor) -> tuple[tf.Tensor, str]:
    name = path.numpy().decode("utf-8", "replace")
    try:
        return _decode_file(name), ""
    except tf.errors.OpError as e:
        return tf.constant(_PLACEHOLDER), undecodable_message(name, _op_problem(e))


def _read_file(path: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    img, error = tf.py_function(_read_file_py, [path], (tf.uint8, tf.string))
    img.set_shape([None, None, 3])
    error.set_shape([])
    return img, error


def _without_error(fetch: Callable[[tf.Tensor], tf.Tensor]
                   ) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    return lambda i: (fetch(i), tf.constant(""))


def _first_error(errors: tf.Tensor) -> tf.Tensor:
    """The first non-empty message of a batch's [B] `error` strings, or ""."""
    bad = tf.boolean_mask(errors, tf.strings.length(errors) > 0)
    return tf.cond(tf.size(bad) > 0, lambda: bad[0], lambda: tf.constant(""))


class _Source:
    """Maps split indices to positions (numpy) and positions to (uint8 [H, W, 3] image, error
    message or "") (tf)."""

    def __init__(self, fetch: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]],
                 kept: np.ndarray | None = None):
        self.fetch = fetch
        self.kept = kept  # sorted split indices held, or None for all

    def positions(self, split_indices: np.ndarray) -> np.ndarray:
        if self.kept is None:
            return split_indices.astype(np.int64)
        return np.searchsorted(self.kept, split_indices).astype(np.int64)


def _source(split: Split, needed: np.ndarray | None, what: str) -> _Source:
    """Random access to the images of `split` (`needed`: split indices the caller will ask for)."""
    if split.images is not None and split.images.dtype == object:  # sizes differ
        images = split.images
        return _Source(_without_error(_numpy_fetch(lambda i: images[i])))
    if split.images is not None:
        images = tf.constant(_rgb_uint8(split.images))
        return _Source(_without_error(lambda i: tf.gather(images, i)))
    if split.paths is not None:
        paths = tf.constant(split.paths, tf.string)
        return _Source(lambda i: _read_file(tf.gather(paths, i)))
    if isinstance(split, tfds_source.VtabSplit):  # the decoder bit_pytorch uses too
        return _Source(_without_error(_numpy_fetch(split.image)))
    if not isinstance(split, TfdsSplit):
        raise DataError(f"The {what} split holds neither images, paths nor a tfds handle.")
    if split.encoded is not None:
        encoded = tf.constant(split.encoded, tf.string)
        return _Source(_without_error(lambda i: _decode_bytes(tf.gather(encoded, i))))
    return _large_tfds_source(split, needed, what)


def _numpy_fetch(image: Callable[[int], np.ndarray]) -> Callable[[tf.Tensor], tf.Tensor]:
    """Image `i` (uint8 [H, W, 3], sizes differing) from a numpy function of the index."""
    def get(i: np.ndarray) -> np.ndarray:
        return image(int(i))

    def fetch(i: tf.Tensor) -> tf.Tensor:
        img = tf.numpy_function(get, [i], tf.uint8, stateful=False)
        img.set_shape([None, None, 3])
        return img

    return fetch


def _large_tfds_source(split: TfdsSplit, needed: np.ndarray | None, what: str) -> _Source:
    import tensorflow_datasets as tfds

    try:  # ArrayRecord random access
        records = split.builder.as_data_source(
            split.split_name, decoders={"image": tfds.decode.SkipDecoding()})
    except Exception:
        records = None
    if records is not None:
        def get(i: np.ndarray) -> bytes:
            return records[int(i)]["image"]

        return _Source(_without_error(lambda i: _decode_bytes(
            tf.reshape(tf.numpy_function(get, [i], tf.string, stateful=False), []))))
    wanted = np.unique(np.arange(len(split)) if needed is None else needed)
    total = _split_bytes(split.builder, split.split_name)
    if total * len(wanted) / max(len(split), 1) > IN_MEMORY_BYTES:
        raise DataError(
            f"The {what} split {split.tfds_name}/{split.split_name} ({total / 2**30:.0f} GiB) is "
            f"stored as TFRecord, which cannot be read by index, and the {len(wanted)} examples "
            f"this run needs do not fit in memory. Prepare it with random access (`tfds build "
            f"{split.tfds_name} --file_format=array_record`), give --datadir train/ and val/ "
            f"image folders, or train on a few-shot subset (--examples_per_class).")
    lookup = np.zeros(len(split), bool)
    lookup[wanted] = True
    _, encoded, kept = _read_tfds(split.builder, split.split_name, keep=lambda idx: lookup[idx])
    enc = tf.constant(encoded, tf.string)
    return _Source(_without_error(lambda i: _decode_bytes(tf.gather(enc, i))), kept)


# ---- the preprocessing ops (shared by the datasets and the numpy conveniences) --------------
def _train_image(image: tf.Tensor, resize: int, crop: int, offset: tf.Tensor,
                 flip: tf.Tensor) -> tf.Tensor:
    x = tf.cast(image, tf.float32)
    x = tf.image.resize(x, (resize, resize), method="bilinear", antialias=True)
    x = tf.slice(x, tf.stack([offset[0], offset[1], 0]), [crop, crop, 3])
    x = tf.cond(flip, lambda: tf.reverse(x, axis=[1]), lambda: x)
    return x / 127.5 - 1.0


def _eval_image(image: tf.Tensor, crop: int) -> tf.Tensor:
    x = tf.cast(image, tf.float32)
    x = tf.image.resize(x, (crop, crop), method="bilinear", antialias=True)
    return x / 127.5 - 1.0


def _num_calls(setup: RunSetup) -> int:
    workers = setup.config.workers
    return int(workers) if workers > 0 else AUTOTUNE


def _options() -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = True
    return opts


# ---- training -----------------------------------------------------------------------------------
def train_dataset(setup: RunSetup, start_step: int, shards: int = 1) -> tf.data.Dataset:
    """Infinite stream of global batches for steps start_step, start_step + 1, ...

    Each element: `image` float32 [B, crop, crop, 3] in [-1, 1], `label` int32 [B],
    `mixup_lambda` float32 [], `mixup_perm` int32 [B], `step` int64 []; B = setup.config.batch.
    `shards` > 1: the batch will be split into that many data-parallel slices, and mixup
    partners are drawn inside each slice (bit_common.plan.InputPlan.shards).
    """
    plan = sharded(setup.plan, shards)
    batch = plan.batch
    resize, crop = plan.train_size
    train_indices = np.asarray(setup.train_indices, np.int64)
    labels = np.asarray(setup.train.labels)
    source = _source(setup.train, train_indices, "training")

    def plan_np(step: np.ndarray):
        bp = plan.batch_plan(int(step))
        idx = train_indices[bp.indices]
        return (np.full(batch, step, np.int64), source.positions(idx),
                labels[idx].astype(np.int32), bp.offsets.astype(np.int32), bp.flips.astype(bool),
                np.full(batch, bp.mixup_lambda, np.float32), bp.mixup_perm.astype(np.int32))

    def load(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image, error = source.fetch(ex.pop("pos"))
        image = _train_image(image, resize, crop, ex.pop("offset"), ex.pop("flip"))
        return {"image": image, "error": error, **ex}

    fields = {"step": (tf.int64, ()), "pos": (tf.int64, ()), "label": (tf.int32, ()),
              "offset": (tf.int32, (2,)), "flip": (tf.bool, ()),
              "mixup_lambda": (tf.float32, ()), "mixup_perm": (tf.int32, ())}
    return step_stream(setup, start_step, batch, (plan_np, fields), load, ("image", "label"))


PlanFields = dict[str, tuple[tf.DType, tuple[int, ...]]]


def step_stream(setup: Any, start_step: int, batch: int,
                plan: tuple[Callable[[np.ndarray], tuple[np.ndarray, ...]], PlanFields],
                load: Callable[[dict], dict], per_example: tuple[str, ...]) -> tf.data.Dataset:
    """Steps start_step, start_step + 1, ...: each step's plan (`plan` = (plan_np, fields):
    plan_np(step) returns the fields' [B, *shape] arrays in their order), its examples loaded in
    parallel and in order (`load`), batched again; the batch keeps `per_example` and
    `mixup_perm` whole, the step and mixup ratio once, and its first error."""
    plan_np, fields = plan

    def plan_tf(step: tf.Tensor) -> dict[str, tf.Tensor]:
        out = tf.numpy_function(plan_np, [step], [dtype for dtype, _ in fields.values()],
                                stateful=False)
        ex = dict(zip(fields, out))
        for name, (_, shape) in fields.items():
            ex[name].set_shape([batch, *shape])
        return ex

    def finish(b: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {**{k: b[k] for k in (*per_example, "mixup_perm")},
                "mixup_lambda": b["mixup_lambda"][0], "step": b["step"][0],
                "error": _first_error(b["error"])}

    ds = tf.data.Dataset.range(int(start_step), np.iinfo(np.int64).max)
    ds = ds.map(plan_tf).unbatch()
    ds = ds.map(load, num_parallel_calls=_num_calls(setup), deterministic=True)
    ds = ds.batch(batch, drop_remainder=True).map(finish)
    return ds.prefetch(AUTOTUNE).with_options(_options())


# ---- evaluation ---------------------------------------------------------------------------------
def eval_items(split: Split) -> tuple[tf.data.Dataset, Callable[[tf.Tensor], tuple[tf.Tensor,
                                                                                 tf.Tensor]]]:
    """(items, fetch): `split` in order as (item, int32 label) pairs, and what turns an item
    into (uint8 image, error message or ""). A large tfds split is streamed, not indexed."""
    labels = np.asarray(split.labels).astype(np.int32)
    if isinstance(split, TfdsSplit) and split.encoded is None:  # large: stream it in order
        import tensorflow_datasets as tfds

        ds = split.builder.as_dataset(split=split.split_name, shuffle_files=False,
                                      decoders={"image": tfds.decode.SkipDecoding()})
        return (tf.data.Dataset.zip((ds.map(lambda ex: ex["image"]),
                                     tf.data.Dataset.from_tensor_slices(labels))),
                _without_error(_decode_bytes))
    source = _source(split, None, "evaluation")
    return (tf.data.Dataset.zip((tf.data.Dataset.range(len(split)),
                                 tf.data.Dataset.from_tensor_slices(labels))), source.fetch)


def eval_dataset(setup: RunSetup, batch_size: int) -> tf.data.Dataset:
    """One in-order pass over `setup.eval` in batches of exactly `batch_size`.

    Elements: `image` float32 [b, crop, crop, 3], `label` int32 [b], `mask` float32 [b]; the last
    batch is padded with zero images, label 0 and mask 0. Build it once and iterate it at every
    evaluation.
    """
    if batch_size < 1:
        raise DataError(f"The evaluation batch size must be positive, got {batch_size}.")
    crop, n = setup.crop, len(setup.eval)
    ds, fetch = eval_items(setup.eval)

    def load(item: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
        image, error = fetch(item)
        return {"image": _eval_image(image, crop), "label": label,
                "mask": tf.constant(1.0, tf.float32), "error": error}

    ds = ds.map(load, num_parallel_calls=_num_calls(setup), deterministic=True)
    return padded_batches(ds, n, batch_size, {"image": [crop, crop, 3]})


def padded_batches(ds: tf.data.Dataset, n: int, batch_size: int,
                   images: dict[str, list[int]]) -> tf.data.Dataset:
    """The n loaded eval examples of `ds` in batches of exactly `batch_size`, the last padded
    with examples of zero `images` (name: shape), label 0 and mask 0; each batch's first error."""
    pad = -n % batch_size
    if pad:
        blank = {**{k: tf.zeros(shape, tf.float32) for k, shape in images.items()},
                 "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0, tf.float32),
                 "error": tf.constant("")}
        ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(pad))
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda b: {**b, "error": _first_error(b["error"])})
    return ds.prefetch(AUTOTUNE).with_options(_options())


# ---- iteration with readable errors -----------------------------------------------------------
def batches(ds: tf.data.Dataset, numpy: bool = True) -> Iterator[dict[str, Any]]:
    """Iterate `ds` (as numpy arrays, or tf tensors with numpy=False) without its `error`; a
    batch holding an image file that did not decode raises that file's `DataError` instead."""
    for batch in ds:
        batch = dict(batch)
        error = batch.pop("error", None)
        if error is not None and (message := error.numpy().decode("utf-8", "replace")):
            raise DataError(message)
        yield tf.nest.map_structure(lambda t: t.numpy(), batch) if numpy else batch


def stepped_batches(ds: tf.data.Dataset) -> Iterator[tuple[int, dict[str, Any]]]:
    """(step, batch) for a training stream's numpy batches (see `batches`)."""
    for batch in batches(ds):
        yield int(batch.pop("step")), batch


# ---- numpy in, numpy out (cross-framework parity tests) ------------------------------------------
def preprocess_eval(images_uint8: np.ndarray, crop: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, crop, crop, 3], the evaluation ops of `eval_dataset`."""
    images = _rgb_uint8(images_uint8)
    ds = tf.data.Dataset.from_tensor_slices(images).map(lambda x: _eval_image(x, crop))
    return np.stack([x.numpy() for x in ds]) if len(images) else np.zeros(
        (0, crop, crop, 3), np.float32)


def preprocess_train(images_uint8: np.ndarray, resize: int, crop: int, offsets: np.ndarray,
                     flips: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, crop, crop, 3], the training ops of `train_dataset`
    (offsets int [N, 2] (top, left) inside the resized image, flips bool [N])."""
    images = _rgb_uint8(images_uint8)
    offsets = np.asarray(offsets, np.int32).reshape(len(images), 2)
    flips = np.asarray(flips, bool).reshape(len(images))
    if len(images) and (offsets.min() < 0 or offsets.max() > resize - crop):
        raise DataError(f"Crop offsets must lie in [0, {resize - crop}] for resize {resize} and "
                        f"crop {crop}.")
    ds = tf.data.Dataset.from_tensor_slices((images, offsets, flips)).map(
        lambda x, o, f: _train_image(x, resize, crop, o, f))
    return np.stack([x.numpy() for x in ds]) if len(images) else np.zeros(
        (0, crop, crop, 3), np.float32)
