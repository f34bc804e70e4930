"""The tf.data pipeline bit_jax and bit_tf2 share (bit_tfdata.pipeline): offline and fast."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from bit_common import checkpoint, cli, loop  # noqa: E402
from bit_common.datasets import get_dataset  # noqa: E402
from bit_common.errors import DataError  # noqa: E402
from bit_common.registry import parse_arch  # noqa: E402
from bit_tf2.train import FRAMEWORK  # noqa: E402
from bit_tfdata import pipeline as data  # noqa: E402

PARAMS = checkpoint.random_params(parse_arch("R50x1"), 2, seed=0)  # a setup needs weights


def make_setup(dataset: str, *flags: str, batch: int = 16, classes: int = 10) -> loop.RunSetup:
    """The run's set-up as bit_tf2's CLI makes it; the pipeline needs no weights, so `classes`
    only sizes a shared random head."""
    args = cli.build_parser("tf2").parse_args(
        ["--name", "t", "--model", "BiT-M-R50x1", "--logdir", "unused", "--dataset", dataset,
         "--batch", str(batch), "--workers", "2", "--resolution", "40", "32", *flags])
    params = {**PARAMS, checkpoint.HEAD_KERNEL: np.zeros((1, 1, 2048, classes), np.float32),
              checkpoint.HEAD_BIAS: np.zeros(classes, np.float32)}
    return loop.make_setup(args, FRAMEWORK, params=params)


def with_mixup(setup: loop.RunSetup, alpha: float) -> loop.RunSetup:
    return dataclasses.replace(setup, plan=dataclasses.replace(setup.plan, mixup_alpha=alpha))


def take(ds: tf.data.Dataset, n: int) -> list[dict[str, np.ndarray]]:
    out = []
    for i, batch in enumerate(data.batches(ds)):
        if i == n:
            break
        out.append(batch)
    return out


def reference_train(images: np.ndarray, resize: int, crop: int, offsets, flips) -> np.ndarray:
    """The documented recipe, written out independently with numpy crop/flip."""
    x = tf.image.resize(tf.cast(images, tf.float32), (resize, resize), method="bilinear",
                        antialias=True).numpy()
    out = []
    for img, (top, left), flip in zip(x, offsets, flips):
        c = img[top:top + crop, left:left + crop]
        out.append(c[:, ::-1] if flip else c)
    return np.stack(out) / np.float32(127.5) - np.float32(1.0)


@pytest.fixture(scope="module")
def digits_setup():
    return with_mixup(make_setup("digits"), 0.1)


# ---- digits: the training stream ------------------------------------------------------------
def test_train_element_shapes_dtypes_range(digits_setup):
    ds = data.train_dataset(digits_setup, 0)
    spec = ds.element_spec
    assert spec["image"].shape == (16, 32, 32, 3) and spec["image"].dtype == tf.float32
    assert spec["label"].shape == (16,) and spec["label"].dtype == tf.int32
    assert spec["mixup_lambda"].shape == () and spec["mixup_lambda"].dtype == tf.float32
    assert spec["mixup_perm"].shape == (16,) and spec["mixup_perm"].dtype == tf.int32
    assert spec["step"].shape == () and spec["step"].dtype == tf.int64
    batches = take(ds, 2)
    for s, b in enumerate(batches):
        assert b["step"] == s
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
        assert b["image"].min() < -0.99 and b["image"].max() > 0.5  # really the full range
        bp = digits_setup.plan.batch_plan(s)
        assert np.isclose(b["mixup_lambda"], bp.mixup_lambda) and b["mixup_lambda"] < 1.0
        np.testing.assert_array_equal(b["mixup_perm"], bp.mixup_perm)


def test_stream_is_a_pure_function_of_the_step(digits_setup):
    from_zero = take(data.train_dataset(digits_setup, 0), 6)[3:]
    resumed = take(data.train_dataset(digits_setup, 3), 3)
    for a, b in zip(from_zero, resumed):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert [int(b["step"]) for b in resumed] == [3, 4, 5]


def test_batches_cross_epoch_boundaries():
    setup = make_setup("digits", "--examples_per_class", "1")  # 10 examples, batch 16
    for s, b in enumerate(take(data.train_dataset(setup, 0), 3)):
        want = setup.train.labels[setup.train_indices[setup.plan.indices(s)]]
        np.testing.assert_array_equal(b["label"], want)


def test_few_shot_indices_honoured():
    setup = make_setup("digits", "--examples_per_class", "5")
    assert len(setup.train_indices) == 50
    for s, b in enumerate(take(data.train_dataset(setup, 0), 4)):
        idx = setup.train_indices[setup.plan.indices(s)]
        np.testing.assert_array_equal(b["label"], setup.train.labels[idx])
        bp = setup.plan.batch_plan(s)
        want = reference_train(setup.train.images[idx], 40, 32, bp.offsets, bp.flips)
        np.testing.assert_allclose(b["image"], want, atol=1e-6)


def test_crops_and_flips_honoured(digits_setup):
    plan = digits_setup.plan
    (b,) = take(data.train_dataset(digits_setup, 7), 1)
    bp = plan.batch_plan(7)
    assert bp.flips.any() and not bp.flips.all() and len(np.unique(bp.offsets)) > 1
    images = digits_setup.train.images[digits_setup.train_indices[bp.indices]]
    want = reference_train(images, plan.resize, plan.crop, bp.offsets, bp.flips)
    np.testing.assert_allclose(b["image"], want, atol=1e-6)
    # The numpy convenience runs the very same ops as the dataset.
    same = data.preprocess_train(images, plan.resize, plan.crop, bp.offsets, bp.flips)
    np.testing.assert_array_equal(b["image"], same)


def test_no_augment_equals_eval_preprocessing():
    setup = make_setup("digits", "--no-augment")
    (b,) = take(data.train_dataset(setup, 2), 1)
    bp = setup.plan.batch_plan(2)
    assert b["mixup_lambda"] == 1.0 and not bp.flips.any()
    np.testing.assert_array_equal(b["mixup_perm"], np.arange(16))
    images = setup.train.images[setup.train_indices[bp.indices]]
    np.testing.assert_array_equal(b["image"], data.preprocess_eval(images, 32))


def test_shards_keep_mixup_partners_in_their_slice(digits_setup):
    (b,) = take(data.train_dataset(digits_setup, 0, shards=4), 1)
    perm = b["mixup_perm"].reshape(4, 4)
    for s in range(4):
        assert sorted(perm[s]) == list(range(4 * s, 4 * s + 4))
    with pytest.raises(DataError, match="cannot be split"):
        data.train_dataset(digits_setup, 0, shards=3)


# ---- evaluation ---------------------------------------------------------------------------------
def test_eval_covers_every_example_once_with_mask(digits_setup):
    split = digits_setup.eval
    assert len(split) == 360
    batches = list(data.batches(data.eval_dataset(digits_setup, 50)))
    assert len(batches) == 8  # 7 full + 1 padded to 50
    for b in batches:
        assert b["image"].shape == (50, 32, 32, 3) and b["label"].dtype == np.int32
        assert b["mask"].dtype == np.float32
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 360 and (mask[:360] == 1).all() and (mask[360:] == 0).all()
    labels = np.concatenate([b["label"] for b in batches])[:360]
    np.testing.assert_array_equal(labels, split.labels)
    images = np.concatenate([b["image"] for b in batches])
    np.testing.assert_array_equal(images[:360], data.preprocess_eval(split.images, 32))
    assert (images[360:] == 0).all()


def test_preprocess_grayscale_and_range():
    gray = np.random.default_rng(0).integers(0, 256, (2, 9, 7), dtype=np.uint8)
    out = data.preprocess_eval(gray, 5)
    rgb = data.preprocess_eval(np.repeat(gray[..., None], 3, -1), 5)
    assert out.shape == (2, 5, 5, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, rgb)
    const = data.preprocess_eval(np.full((1, 4, 4, 3), 255, np.uint8), 8)
    np.testing.assert_allclose(const, 1.0, atol=1e-6)
    with pytest.raises(DataError, match="Crop offsets"):
        data.preprocess_train(np.zeros((1, 4, 4, 3), np.uint8), 10, 8, [[0, 3]], [False])


# ---- imagefolder ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train/ and val/ with two classes of small PNG (RGB and grayscale) and JPEG files."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("val", 3)):
        for c, name in enumerate(("cat", "dog")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                h, w = 20 + 3 * i, 30 - 2 * i
                if i % 3 == 0:
                    img = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
                    (d / f"{i}.png").write_bytes(tf.io.encode_png(img).numpy())
                elif i % 3 == 1:
                    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                    (d / f"{i}.png").write_bytes(tf.io.encode_png(img).numpy())
                else:
                    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                    (d / f"{i}.jpg").write_bytes(tf.io.encode_jpeg(img).numpy())
            (d / "notes.txt").write_text("not an image")
    return root


def _decode(path: str) -> np.ndarray:
    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False).numpy()


def test_imagefolder_train_and_eval(image_folder):
    setup = make_setup("imagefolder", "--datadir", str(image_folder), "--resolution", "24", "16",
                       batch=8, classes=2)
    assert setup.train.class_names == ["cat", "dog"] and len(setup.train) == 12
    assert not any(p.endswith(".txt") for p in setup.train.paths)  # skipped by the scan
    for s, b in enumerate(take(data.train_dataset(setup, 0), 2)):
        bp = setup.plan.batch_plan(s)
        idx = setup.train_indices[bp.indices]
        np.testing.assert_array_equal(b["label"], setup.train.labels[idx])
        want = np.concatenate([data.preprocess_train(_decode(setup.train.paths[i])[None], 24, 16,
                                                     bp.offsets[j:j + 1], bp.flips[j:j + 1])
                               for j, i in enumerate(idx)])
        np.testing.assert_array_equal(b["image"], want)
    split = setup.eval
    batches = list(data.batches(data.eval_dataset(setup, 4)))
    assert len(batches) == 2 and np.concatenate([b["mask"] for b in batches]).sum() == 6
    got = np.concatenate([b["image"] for b in batches])[:6]
    want = np.concatenate([data.preprocess_eval(_decode(p)[None], 16) for p in split.paths])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:6], split.labels)


def test_an_image_that_does_not_decode_is_a_data_error_naming_it(tmp_path):
    root = tmp_path / "bad"
    for split in ("train", "val"):
        d = root / split / "only"
        d.mkdir(parents=True)
        (d / "good.png").write_bytes(tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy())
    jpeg = tf.io.encode_jpeg(np.full((16, 16, 3), 7, np.uint8)).numpy()
    bad = root / "train" / "only" / "cut.jpg"
    bad.write_bytes(jpeg[:len(jpeg) // 2])  # its header is whole: only decoding finds it
    assert data.image_problem(str(bad)).startswith("InvalidArgumentError: ")
    assert data.image_problem(str(root / "val" / "only" / "good.png")) is None
    setup = make_setup("imagefolder", "--datadir", str(root), "--resolution", "10", "8", batch=2,
                       classes=1)
    ds = data.train_dataset(setup, 0)
    with pytest.raises(DataError) as e:
        take(ds, 2)
    assert str(e.value).startswith(f"Cannot decode image {bad} (InvalidArgumentError: ")
    assert "{{" not in str(e.value) and "--skip_bad_images" in str(e.value)
    # Iterated directly, the dataset raises nothing (TensorFlow would print the py_function's
    # traceback): the batch carries the message.
    first = next(iter(ds))
    assert str(bad) in first["error"].numpy().decode()
    (bad.parent / "cut.jpg").rename(bad.parent / "cut.jpg.bak")
    setup = make_setup("imagefolder", "--datadir", str(root), "--resolution", "10", "8", batch=2,
                       classes=1)
    assert len(take(data.train_dataset(setup, 0), 2)) == 2 and len(take(
        data.eval_dataset(setup, 2), 1)) == 1


def config(datadir) -> loop.RunConfig:
    return loop.RunConfig(batch=4, batch_split=1, batch_eval=4, workers=1, precision="fp32",
                          datadir=str(datadir))


def test_imagefolder_needs_datadir_folders(tmp_path):
    with pytest.raises(DataError, match="train"):
        data.load_splits(config(tmp_path), get_dataset("imagefolder"))


def test_imagenet_from_folders(image_folder):
    train, evaluation = data.load_splits(config(image_folder), get_dataset("imagenet2012"))
    assert train.paths is not None and len(train) == 12 and len(evaluation) == 6


# ---- tfds, offline through tfds' mock data -----------------------------------------------------
def test_tfds_cifar10_mocked(tmp_path, monkeypatch):
    flags = ("cifar10", "--datadir", str(tmp_path))
    with tfds.testing.mock_data(num_examples=40):
        setup = make_setup(*flags, batch=8)
        train = setup.train
        assert isinstance(train, data.TfdsSplit) and len(train) == 40
        assert train.images is None and train.paths is None and train.encoded is not None
        assert train.labels.dtype == np.int64 and train.labels.max() < 10
        assert len(train.class_names) == 10
        stream = take(data.train_dataset(setup, 0), 3)
        decoded = np.stack([tf.io.decode_image(b).numpy() for b in train.encoded])
        for s, b in enumerate(stream):
            bp = setup.plan.batch_plan(s)
            idx = setup.train_indices[bp.indices]
            np.testing.assert_array_equal(b["label"], train.labels[idx])
            want = data.preprocess_train(decoded[idx], 40, 32, bp.offsets, bp.flips)
            np.testing.assert_array_equal(b["image"], want)
        batches = list(data.batches(data.eval_dataset(setup, 16)))
        assert np.concatenate([b["mask"] for b in batches]).sum() == 40
        # A split too large for memory: ArrayRecord random access (mocked) and in-order streaming.
        monkeypatch.setattr(data, "IN_MEMORY_BYTES", -1)
        big_setup = make_setup(*flags, batch=8)
        big = big_setup.train
        assert big.encoded is None and big_setup.eval.encoded is None
        np.testing.assert_array_equal(big.labels, train.labels)
        (b,) = take(data.train_dataset(big_setup, 0), 1)
        assert b["image"].shape == (8, 32, 32, 3)
        np.testing.assert_array_equal(b["label"], big.labels[big_setup.plan.indices(0)])
        streamed = list(data.batches(data.eval_dataset(big_setup, 16)))
        assert np.concatenate([b["mask"] for b in streamed]).sum() == 40


def test_tfds_large_tfrecord_split_gathers_only_the_few_shot_subset(tmp_path, monkeypatch):
    """No ArrayRecord files: the encoded images of just the needed examples are read in one
    pass; a subset too large for memory is a DataError that says what to do."""
    flags = ("cifar10", "--datadir", str(tmp_path))

    def no_random_access(*a, **k):
        raise NotImplementedError("prepared as tfrecord")

    with tfds.testing.mock_data(num_examples=60):
        small = make_setup(*flags, batch=4).train
        monkeypatch.setattr(data, "IN_MEMORY_BYTES", -1)
        big = make_setup(*flags, batch=4)
        few = make_setup(*flags, "--examples_per_class", "1", batch=4)
        for setup in (big, few):
            monkeypatch.setattr(setup.train.builder, "as_data_source", no_random_access)
        with pytest.raises(DataError, match="array_record"):
            data.train_dataset(big, 0)
        monkeypatch.setattr(data, "IN_MEMORY_BYTES", 4 << 30)
        decoded = np.stack([tf.io.decode_image(b).numpy() for b in small.encoded])
        for s, b in enumerate(take(data.train_dataset(few, 0), 3)):
            bp = few.plan.batch_plan(s)
            idx = few.train_indices[bp.indices]
            np.testing.assert_array_equal(b["label"], small.labels[idx])
            np.testing.assert_array_equal(
                b["image"], data.preprocess_train(decoded[idx], 40, 32, bp.offsets, bp.flips))
