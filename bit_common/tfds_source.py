"""A VTAB-1k task's two splits read from tensorflow-datasets, once for every framework.

PyTorch and the tf.data pipeline (bit_jax, bit_tf2) both call `load_vtab_splits`, so they train
on the same examples in the same order with the same decoded pixels: one in-order pass of
`tfds.as_numpy` over each split string, the label derived from the whole example
(`VtabTask.label`: clevr's objects, dsprites' latents, ...) and the image as the task feeds it
(`VtabTask.image`: grayscale repeated, dsprites' 0/1 scaled), held in memory as uint8. The
training split is 1000 images; an evaluation split whose decoded images exceed
`IN_MEMORY_BYTES` is a DataError (streaming it is not implemented).

A task's dataset is never downloaded at run time: one that is not prepared is a DataError
saying how to prepare it. TensorFlow and tensorflow_datasets are imported inside the functions,
so importing this module changes nothing.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from bit_common.datasets import Split
from bit_common.errors import DataError
from bit_common.vtab import VtabTask

IN_MEMORY_BYTES = int(os.environ.get("BIT_TFDS_IN_MEMORY_BYTES", 4 << 30))


def _build_name(builder: Any) -> str:
    """`name/config:version`, as `tfds build` takes it."""
    config = getattr(builder, "builder_config", None)
    return builder.name + (f"/{config.name}" if config is not None else "") + \
        f":{builder.version}"


def not_prepared_message(task: VtabTask, builder: Any) -> str:
    """How to prepare the tfds dataset of `task`, which this project never downloads itself."""
    name = _build_name(builder)
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    how = (f"download its files by hand first (see https://www.tensorflow.org/datasets/catalog/"
           f"{builder.name}), then run `tfds build {name} --manual_dir <that folder> "
           f"--data_dir <folder>`" if manual else
           f"run `tfds build {name} --data_dir <folder>` on a machine with network access")
    return (f"VTAB-1k task {task.name} reads tfds dataset {name}, which is not prepared in "
            f"{builder.data_dir}. To prepare it, {how}; then pass that folder as --datadir "
            f"(without --datadir, tfds' default folder ~/tensorflow_datasets is used).")


def open_builder(task: VtabTask, datadir: str | None) -> Any:
    """The tfds builder of `task` (its pinned name and version) in `datadir` or tfds' default."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(task.tfds_name, data_dir=datadir)
    except Exception as e:
        raise DataError(f"tensorflow-datasets cannot open {task.tfds_name!r} (VTAB-1k task "
                        f"{task.name}) in {datadir or 'its default folder'} "
                        f"({type(e).__name__}: {e}).") from None


def read_split(task: VtabTask, builder: Any, split: str, what: str) -> Split:
    """Labels and uint8 images of one split string of `task`, in tfds' order: stacked [N, H, W, 3]
    when all images have one size, else an object array of [H, W, 3]."""
    import tensorflow_datasets as tfds

    try:
        ds = builder.as_dataset(split=split, shuffle_files=False)
    except Exception as e:
        if not builder.is_prepared():
            raise DataError(not_prepared_message(task, builder)) from None
        raise DataError(f"Cannot read split {split!r} of tfds dataset {task.tfds_name!r} "
                        f"({type(e).__name__}: {e}).") from None
    labels, images, total = [], [], 0
    for example in tfds.as_numpy(ds):
        labels.append(task.label(example))
        images.append(task.image(example))
        total += images[-1].nbytes
        if total > IN_MEMORY_BYTES:
            raise DataError(
                f"The {what} split {split!r} of VTAB-1k task {task.name} holds more than "
                f"{IN_MEMORY_BYTES / 2**30:.1f} GiB of decoded images, which are read into "
                f"memory. Raise the limit with the environment variable "
                f"BIT_TFDS_IN_MEMORY_BYTES on a machine with the memory.")
    if not labels:
        raise DataError(f"Split {split!r} of tfds dataset {task.tfds_name!r} is empty.")
    if len({im.shape for im in images}) == 1:
        stacked = np.stack(images)
    else:
        stacked = np.empty(len(images), object)
        for i, image in enumerate(images):  # (a slice assignment would try to broadcast)
            stacked[i] = image
    return Split(np.asarray(labels, np.int64), stacked, None,
                 [str(i) for i in range(task.num_classes)])


def load_vtab_splits(task: VtabTask, datadir: str | None) -> tuple[Split, Split]:
    """(train800val200, test) of `task`, read from tfds in `datadir` (None: tfds' default)."""
    builder = open_builder(task, datadir)
    return (read_split(task, builder, task.split("train800val200"), "training"),
            read_split(task, builder, task.split("test"), "evaluation"))
