"""The torchvision pipeline (bit_pytorch) and the tf.data pipeline (bit_jax, bit_tf2) give the
same tensors from the same uint8 images.

Tolerance: 2e-4 in the [-1, 1] range, i.e. 0.026 of one grey level. Both resize bilinearly with
antialiasing and half-pixel centres in float32, but accumulate the filter taps in different
orders. Most cases agree to 1e-5 or exactly; the worst case seen, 375x500 -> 480x480 (one side
enlarged, the other shrunk with the antialiasing filter), differs by 1.1e-4.
Crops and flips are not sampled by either pipeline: both apply the (seed, step) plan of
bit_common, so the training augmentation is the same in distribution and per example.
"""

from __future__ import annotations

import numpy as np
import pytest

from bit_common import checkpoint
from bit_common.plan import InputPlan
from bit_common.registry import parse_arch
from conftest import run_setup

TOL = 2e-4
SIZES = [((8, 8), 32), ((32, 32), 128), ((375, 500), 128), ((375, 500), 480), ((224, 224), 480),
         ((97, 61), 64)]


def images(hw: tuple[int, int], n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *hw, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pipelines():
    from bit_pytorch import data as torch_data
    from bit_tfdata import pipeline as tf_data
    return torch_data, tf_data


@pytest.mark.parametrize("hw, crop", SIZES)
def test_eval_preprocessing_agrees(pipelines, hw, crop, report):
    torch_data, tf_data = pipelines
    x = images(hw)
    a, b = torch_data.preprocess_eval(x, crop), tf_data.preprocess_eval(x, crop)
    assert a.shape == b.shape == (3, crop, crop, 3) and a.dtype == b.dtype == np.float32
    d = float(np.abs(a - b).max())
    report(f"eval preprocessing {hw} -> {crop}: max |Δ| {d:.1e}")
    assert d <= TOL and -1.0 <= a.min() and a.max() <= 1.0


@pytest.mark.parametrize("hw, crop", SIZES)
def test_train_preprocessing_agrees(pipelines, hw, crop, report):
    torch_data, tf_data = pipelines
    resize = crop + crop // 4
    plan = InputPlan(num_examples=3, batch=3, resize=resize, crop=crop, seed=sum(hw))
    bp = plan.batch_plan(0)
    x = images(hw, seed=1)
    a = torch_data.preprocess_train(x, resize, crop, bp.offsets, bp.flips)
    b = tf_data.preprocess_train(x, resize, crop, bp.offsets, bp.flips)
    d = float(np.abs(a - b).max())
    report(f"train preprocessing {hw} -> {resize}/{crop}: max |Δ| {d:.1e}")
    assert d <= TOL


def test_flip_and_crop_mean_the_same_thing(pipelines):
    torch_data, tf_data = pipelines
    x = images((40, 40), n=1, seed=2)
    base = tf_data.preprocess_train(x, 40, 32, np.array([[0, 0]]), np.array([False]))
    for data in (torch_data, tf_data):
        flipped = data.preprocess_train(x, 40, 32, np.array([[0, 8]]), np.array([True]))
        shifted = data.preprocess_train(x, 40, 32, np.array([[3, 0]]), np.array([False]))
        full = data.preprocess_eval(x, 40)
        np.testing.assert_allclose(flipped[0], full[0, :32, 8:40][:, ::-1], atol=TOL)
        np.testing.assert_allclose(shifted[0, :29], base[0, 3:], atol=TOL)


def test_training_streams_are_the_same_batches(pipelines):
    """The two pipelines, fed the same split and plan, yield the same labels and images."""
    torch_data, tf_data = pipelines
    setup = run_setup("tf2", "--examples_per_class", "14", "--batch", "8", "--seed", "4",
                      "--resolution", "40", "32", "--workers", "1",
                      params=checkpoint.random_params(parse_arch("R50x1"), 10))
    train, indices, plan = setup.train, setup.train_indices, setup.plan
    torch_stream = torch_data.train_batches(train, indices, plan, 5, 8, range(0, 8), workers=0)
    tf_stream = tf_data.batches(tf_data.train_dataset(setup, 5))
    for step, (a, b) in zip(range(5, 8), zip(torch_stream, tf_stream)):
        assert b["step"] == step == a.step
        assert np.array_equal(a.labels.numpy(), b["label"])
        assert np.array_equal(b["label"], train.labels[indices[plan.indices(step)]])
        got = a.images.numpy()
        got = got.transpose(0, 2, 3, 1) if got.shape[1] == 3 else got
        assert np.abs(got - b["image"]).max() <= TOL
