"""The tf.data input of distillation, shared by bit_jax and bit_tf2 (bit_common.distill).

Every choice comes from `setup.plan.batch_plan(step)` (a `DistillPlan`): the examples, the uniforms
of each inception crop, the flips and the mixup pairing. The crop box needs the decoded image's
size, so it is computed per example by `DistillBatchPlan.boxes` itself (in a numpy function):
the same integers bit_pytorch computes. The one box is then resized for each model:

    uint8 [H, W, 3] -> crop [top:top+h, left:left+w] -> float32 -> tf.image.resize((r, r),
    bilinear, antialias=True) -> flip where planned -> x / 127.5 - 1

once to the student's resolution and once to the teacher's. Mixup is applied by the step (to
both images, with the batch's `mixup_lambda` and `mixup_perm`). Evaluation crops the central
87.5 % box of every image (`central_boxes`) and resizes it for each model the same way.
"""

from __future__ import annotations


import numpy as np
import tensorflow as tf

from bit_common.distill import DistillBatchPlan, DistillSetup, central_boxes
from bit_common.errors import DataError
from bit_common.plan import sharded
from bit_tfdata.pipeline import _num_calls, _source, eval_items, padded_batches, step_stream


def _crop_resize(image: tf.Tensor, box: tf.Tensor, size: int, flip: tf.Tensor | bool = False
                 ) -> tf.Tensor:
    """One box of a uint8 image, resized to (size, size), flipped where asked, in [-1, 1]."""
    x = tf.slice(image, tf.stack([box[0], box[1], 0]), tf.stack([box[2], box[3], 3]))
    x = tf.image.resize(tf.cast(x, tf.float32), (size, size), method="bilinear", antialias=True)
    x = tf.cond(tf.convert_to_tensor(flip), lambda: tf.reverse(x, axis=[1]), lambda: x)
    return x / 127.5 - 1.0


def _box(hw: tf.Tensor, draws: tf.Tensor, augment: bool) -> tf.Tensor:
    """int32 [4] box of one image from its (height, width) and its plan's 4 uniforms."""
    def box_np(hw: np.ndarray, draws: np.ndarray) -> np.ndarray:
        plan = DistillBatchPlan(0, np.zeros(1, np.int64), draws[None], np.zeros(1, bool), 1.0,
                                np.zeros(1, np.int64), augment)
        return plan.boxes(hw[None])[0]

    box = tf.numpy_function(box_np, [hw, draws], tf.int32, stateful=False)
    box.set_shape([4])
    return box


def train_dataset(setup: DistillSetup, start_step: int, shards: int = 1) -> tf.data.Dataset:
    """Infinite stream of global batches for steps start_step, start_step + 1, ...

    Each element: `student` float32 [B, r, r, 3] and `teacher` float32 [B, rt, rt, 3] (the same
    crops, in [-1, 1]), `mixup_lambda` float32 [], `mixup_perm` int32 [B], `step` int64 [],
    `error` (see `bit_tfdata.pipeline.batches`); B = setup.config.batch. `shards` > 1 keeps the
    mixup partners inside each of that many data-parallel slices of the batch.
    """
    plan = sharded(setup.plan, shards)
    batch, augment = plan.batch, plan.augment
    r, rt = setup.resolution, setup.teacher_resolution
    source = _source(setup.train, None, "training")

    def plan_np(step: np.ndarray):
        bp = plan.batch_plan(int(step))
        return (np.full(batch, step, np.int64), source.positions(bp.indices),
                bp.crop_draws.astype(np.float64), bp.flips.astype(bool),
                np.full(batch, bp.mixup_lambda, np.float32), bp.mixup_perm.astype(np.int32))

    def load(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image, error = source.fetch(ex.pop("pos"))
        box = _box(tf.shape(image)[:2], ex.pop("draws"), augment)
        flip = ex.pop("flip")
        return {"student": _crop_resize(image, box, r, flip),
                "teacher": _crop_resize(image, box, rt, flip), "error": error, **ex}

    fields = {"step": (tf.int64, ()), "pos": (tf.int64, ()), "draws": (tf.float64, (4,)),
              "flip": (tf.bool, ()), "mixup_lambda": (tf.float32, ()),
              "mixup_perm": (tf.int32, ())}
    return step_stream(setup, start_step, batch, (plan_np, fields), load, ("student", "teacher"))


def eval_dataset(setup: DistillSetup, batch_size: int) -> tf.data.Dataset:
    """One in-order pass over `setup.eval` in batches of exactly `batch_size`: `student`
    [b, r, r, 3] and `teacher` [b, rt, rt, 3] (the central box of each image), `label` int32 [b],
    `mask` float32 [b]; the last batch is padded with zero images, label 0 and mask 0."""
    if batch_size < 1:
        raise DataError(f"The evaluation batch size must be positive, got {batch_size}.")
    r, rt, n = setup.resolution, setup.teacher_resolution, len(setup.eval)
    ds, fetch = eval_items(setup.eval)

    def central(hw: np.ndarray) -> np.ndarray:
        return central_boxes(hw[None])[0]

    def load(item: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
        image, error = fetch(item)
        box = tf.numpy_function(central, [tf.shape(image)[:2]], tf.int32, stateful=False)
        box.set_shape([4])
        return {"student": _crop_resize(image, box, r), "teacher": _crop_resize(image, box, rt),
                "label": label, "mask": tf.constant(1.0, tf.float32), "error": error}

    ds = ds.map(load, num_parallel_calls=_num_calls(setup), deterministic=True)
    return padded_batches(ds, n, batch_size, {"student": [r, r, 3], "teacher": [rt, rt, 3]})


def preprocess(images_uint8: np.ndarray, boxes: np.ndarray, size: int,
               flips: np.ndarray | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3] and int [N, 4] boxes -> float32 [N, size, size, 3], the ops of both
    datasets (for the cross-framework tests)."""
    images = np.asarray(images_uint8, np.uint8)
    boxes = np.asarray(boxes, np.int32).reshape(len(images), 4)
    flips = np.zeros(len(images), bool) if flips is None else np.asarray(flips, bool)
    out = [_crop_resize(tf.constant(x), tf.constant(b), size, tf.constant(f)).numpy()
           for x, b, f in zip(images, boxes, flips)]
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.float32)
