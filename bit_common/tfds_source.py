"""A VTAB-1k task's two splits read from tensorflow-datasets, once for every framework.

PyTorch and the tf.data pipeline (bit_jax, bit_tf2) both call `load_vtab_splits`, so they train
on the same examples in the same order with the same decoded pixels: one in-order pass of
`tfds.as_numpy` over each split string with the image left encoded, the label derived from the
whole example (`VtabTask.label`: clevr's objects, dsprites' latents, ...), and every image
decoded by the one decoder here (Pillow; PNG exactly as tfds decodes it) and shaped as the task
feeds it (`VtabTask.image`: grayscale repeated, dsprites' 0/1 scaled). The training split (1000
images) is decoded into memory at once; the evaluation split (up to ~74k images) keeps its
encoded bytes in memory, up to `IN_MEMORY_BYTES` (beyond: a DataError), and both pipelines
decode each image with `VtabSplit.image` when they need it.

A task's dataset is never downloaded at run time: one that is not prepared is a DataError
saying how to prepare it. TensorFlow and tensorflow_datasets are imported inside the functions,
so importing this module changes nothing.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from bit_common.datasets import Split
from bit_common.errors import DataError
from bit_common.vtab import VtabTask

IN_MEMORY_BYTES = int(os.environ.get("BIT_TFDS_IN_MEMORY_BYTES", 4 << 30))


@dataclass
class VtabSplit(Split):
    """A split of a VTAB-1k task: labels, and the images decoded (`images`) or still encoded."""

    task: VtabTask | None = field(default=None, repr=False)
    encoded: np.ndarray | None = field(default=None, repr=False)  # object [N] of PNG/JPEG bytes

    def image(self, i: int) -> np.ndarray:
        """Image `i` as uint8 [H, W, 3], as the task feeds it."""
        if self.images is not None:
            return self.images[i]
        return decode(self.task, self.encoded[i])


def decode(task: VtabTask, data: bytes) -> np.ndarray:
    """One encoded tfds image of `task` as uint8 [H, W, 3] (`VtabTask.image`)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.mode == "1":  # 1-bit: keep 0/1 (convert("L") would give 0/255)
            pixels = np.array(img, np.uint8)
        else:
            pixels = np.array(img if img.mode in ("L", "RGB") else img.convert("RGB"))
    return task.image({task.image_key: pixels})


def decoded(split: VtabSplit) -> VtabSplit:
    """`split` with every image decoded into memory: stacked [N, H, W, 3] when all have one
    size, else an object array of [H, W, 3]."""
    images = [split.image(i) for i in range(len(split))]
    if len({im.shape for im in images}) == 1:
        stacked = np.stack(images)
    else:
        stacked = np.empty(len(images), object)
        for i, image in enumerate(images):  # (a slice assignment would try to broadcast)
            stacked[i] = image
    return replace(split, images=stacked, encoded=None)


def _build_name(builder: Any) -> str:
    """`name/config:version`, as `tfds build` takes it."""
    config = getattr(builder, "builder_config", None)
    return builder.name + (f"/{config.name}" if config is not None else "") + \
        f":{builder.version}"


def not_prepared_message(task: VtabTask, builder: Any) -> str:
    """How to prepare the tfds dataset of `task`, which this project never downloads itself."""
    name = _build_name(builder)
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    how = (f"download its files by hand into a folder <manual> (see https://www.tensorflow.org/"
           f"datasets/catalog/{builder.name}), then run `tfds build {name} --manual_dir "
           f"<manual> --data_dir <datadir>`" if manual else
           f"run `tfds build {name} --data_dir <datadir>` on a machine with network access")
    return (f"VTAB-1k task {task.name} reads tfds dataset {name}, which is not prepared in "
            f"{builder.data_dir}. To prepare it, {how}; then pass --datadir <datadir> (without "
            f"--datadir, tfds' default folder ~/tensorflow_datasets is used).")


def open_builder(task: VtabTask, datadir: str | None) -> Any:
    """The tfds builder of `task` (its pinned name and version) in `datadir` or tfds' default."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(task.tfds_name, data_dir=datadir)
    except Exception as e:
        raise DataError(f"tensorflow-datasets cannot open {task.tfds_name!r} (VTAB-1k task "
                        f"{task.name}) in {datadir or 'its default folder'} "
                        f"({type(e).__name__}: {e}).") from None


def read_split(task: VtabTask, builder: Any, split: str, what: str) -> VtabSplit:
    """Labels and encoded images of one split string of `task`, in tfds' order (one pass)."""
    import tensorflow_datasets as tfds

    try:
        ds = builder.as_dataset(split=split, shuffle_files=False,
                                decoders={task.image_key: tfds.decode.SkipDecoding()})
    except Exception as e:
        if not builder.is_prepared():
            raise DataError(not_prepared_message(task, builder)) from None
        raise DataError(f"Cannot read split {split!r} of tfds dataset {task.tfds_name!r} "
                        f"({type(e).__name__}: {e}).") from None
    labels, encoded, total = [], [], 0
    for example in tfds.as_numpy(ds):
        labels.append(task.label(example))
        encoded.append(example[task.image_key])
        total += len(encoded[-1])
        if total > IN_MEMORY_BYTES:
            raise DataError(
                f"The {what} split {split!r} of VTAB-1k task {task.name} holds more than "
                f"{IN_MEMORY_BYTES / 2**30:.1f} GiB of encoded images, which are kept in "
                f"memory. Raise the limit with the environment variable "
                f"BIT_TFDS_IN_MEMORY_BYTES on a machine with the memory.")
    if not labels:
        raise DataError(f"Split {split!r} of tfds dataset {task.tfds_name!r} is empty.")
    blobs = np.empty(len(encoded), object)
    blobs[:] = encoded
    return VtabSplit(np.asarray(labels, np.int64), None, None,
                     [str(i) for i in range(task.num_classes)], task=task, encoded=blobs)


def load_vtab_splits(task: VtabTask, datadir: str | None) -> tuple[VtabSplit, VtabSplit]:
    """(train800val200 decoded, test encoded) of `task`, from tfds in `datadir` (None: tfds'
    default folder)."""
    builder = open_builder(task, datadir)
    return (decoded(read_split(task, builder, task.split("train800val200"), "training")),
            read_split(task, builder, task.split("test"), "evaluation"))
