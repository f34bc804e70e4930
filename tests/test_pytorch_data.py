"""bit_pytorch.data: preprocessing arithmetic, the plan-driven batches, image folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bit_common.datasets import get_dataset, load_digits
from bit_common.errors import DataError
from bit_common.loop import RunConfig
from bit_common.plan import InputPlan
from bit_pytorch import data


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_preprocess_train_crop_flip_scale():
    img = _image(20, 20)
    x = data.train_image(img, 20, 12, top=3, left=5, flip=False)  # no resize needed
    want = img[3:15, 5:17].astype(np.float32).transpose(2, 0, 1) / 127.5 - 1
    np.testing.assert_allclose(x.numpy(), want, atol=1e-6)
    flipped = data.train_image(img, 20, 12, top=3, left=5, flip=True)
    np.testing.assert_array_equal(flipped.numpy(), x.numpy()[:, :, ::-1])
    assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1


@pytest.mark.parametrize("src,dst", [((64, 48), 24), ((8, 8), 40), ((33, 47), 32)])
def test_resize_is_antialiased_bilinear_like_pil(src, dst):
    """torchvision's antialiased bilinear on floats follows PIL's (a triangle filter scaled by
    the down-sampling factor); PIL's float mode is an independent implementation."""
    from PIL import Image

    img = _image(*src, seed=1)
    got = data.resize(img, dst).numpy()
    want = np.stack([np.asarray(Image.fromarray(img[..., c].astype(np.float32), mode="F")
                                .resize((dst, dst), Image.BILINEAR)) for c in range(3)])
    assert np.abs(got - want).max() < 0.02  # of 255: float rounding in two implementations


@pytest.mark.parametrize("src,dst", [((37, 50), 64), ((64, 48), 24), ((5, 9), 7)])
def test_resize_is_torchvisions_resize(src, dst):
    from torchvision.transforms.v2 import functional as TF

    img = _image(*src, seed=2)
    want = TF.resize(torch.from_numpy(img).permute(2, 0, 1).float().contiguous(), [dst, dst],
                     antialias=True)
    torch.testing.assert_close(data.resize(img, dst), want, rtol=0, atol=0)


def test_eval_resizes_straight_to_the_crop():
    img = _image(8, 8)
    x = data.eval_image(img, 32)
    assert x.shape == (3, 32, 32)
    np.testing.assert_allclose(x.numpy(), data.resize(img, 32).numpy() / 127.5 - 1, atol=1e-6)


def test_numpy_conveniences_match_the_per_image_ops():
    imgs = np.stack([_image(9, 9, seed=s) for s in range(3)])
    ev = data.preprocess_eval(imgs, 16)
    assert ev.shape == (3, 16, 16, 3) and ev.dtype == np.float32
    np.testing.assert_array_equal(ev[1], data.eval_image(imgs[1], 16).permute(1, 2, 0).numpy())
    offsets, flips = np.array([[0, 1], [2, 2], [1, 0]]), np.array([True, False, True])
    tr = data.preprocess_train(imgs, 12, 10, offsets, flips)
    np.testing.assert_array_equal(
        tr[2], data.train_image(imgs[2], 12, 10, 1, 0, True).permute(1, 2, 0).numpy())
    with pytest.raises(DataError):
        data.preprocess_train(imgs, 12, 10, offsets + 2, flips)


def test_train_batches_follow_the_plan():
    split = load_digits("train")
    indices = np.arange(0, len(split), 3)  # a subset, as few-shot gives
    plan = InputPlan(len(indices), 6, 12, 10, seed=3)
    batches = data.train_batches(split, indices, plan, 5, 7, range(6), workers=0)
    for step in (5, 6):
        b = next(batches)
        bp = plan.batch_plan(step)
        assert b.step == step and b.images.shape == (6, 3, 10, 10)
        rows = indices[bp.indices]
        np.testing.assert_array_equal(b.labels.numpy(), split.labels[rows])
        for r in range(6):
            top, left = bp.offsets[r]
            want = data.train_image(split.images[rows[r]], 12, 10, top, left, bp.flips[r])
            torch.testing.assert_close(b.images[r], want, rtol=0, atol=0)
    assert next(batches, None) is None


def test_process_slices_and_mixup_partners():
    split = load_digits("train")
    plan = InputPlan(len(split), 8, 12, 10, seed=0, mixup_alpha=0.1, shards=2)
    full = next(data.train_batches(split, np.arange(len(split)), plan, 0, 1, range(8), 0))
    half = next(data.train_batches(split, np.arange(len(split)), plan, 0, 1, range(4, 8), 0))
    torch.testing.assert_close(half.images, full.images[4:], rtol=0, atol=0)
    np.testing.assert_array_equal(half.mixup_perm.numpy() + 4, full.mixup_perm.numpy()[4:])
    assert 0 < half.mixup_lambda < 1 and half.mixup_lambda == full.mixup_lambda


def test_workers_give_the_same_batches():
    split = load_digits("train")
    plan = InputPlan(len(split), 4, 12, 10, seed=1)
    a = list(data.train_batches(split, np.arange(len(split)), plan, 0, 3, range(4), 0))
    b = list(data.train_batches(split, np.arange(len(split)), plan, 0, 3, range(4), 2))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.images, y.images, rtol=0, atol=0)


def test_eval_batches_cover_every_example_once():
    split = load_digits("test")
    seen = []
    for rank in range(3):
        rows = data.shard_rows(len(split), rank, 3)
        for images, labels in data.eval_batches(split, 16, 7, rows, workers=0):
            assert images.shape[1:] == (3, 16, 16) and len(images) <= 7
            seen.append(labels.numpy())
    np.testing.assert_array_equal(np.concatenate(seen), split.labels)


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("val", 2)):
        for c, name in enumerate(("cat", "dog")):
            d = tmp_path / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_image(10 + i, 12, seed=c * 10 + i)).save(d / f"{i}.png")
    return tmp_path


def config(datadir) -> RunConfig:
    return RunConfig(batch=4, batch_split=1, batch_eval=4, workers=0, precision="fp32",
                     datadir=None if datadir is None else str(datadir))


def test_image_folder(image_folder):
    train, val = data.load_splits(config(image_folder), get_dataset("imagefolder"))
    assert train.class_names == ["cat", "dog"] and train.images is None
    np.testing.assert_array_equal(train.labels, [0, 0, 0, 1, 1, 1])
    assert len(val) == 4 and val.class_names == train.class_names
    np.testing.assert_array_equal(data.decode(train.paths[4]), _image(11, 12, seed=11))
    images, labels = next(data.eval_batches(val, 8, 4, range(4), workers=0))
    assert images.shape == (4, 3, 8, 8)
    np.testing.assert_array_equal(labels.numpy(), [0, 0, 1, 1])


def test_unreadable_image_is_a_data_error_naming_it(image_folder):
    bad = image_folder / "val" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # a PNG header, then nothing
    _, val = data.load_splits(config(image_folder), get_dataset("imagefolder"))
    assert data.image_problem(str(bad)).startswith("UnidentifiedImageError: ")
    for workers in (0, 1):
        with pytest.raises(DataError) as e:
            list(data.eval_batches(val, 8, 4, range(4), workers=workers))
        assert str(e.value).startswith(f"Cannot decode image {bad} (UnidentifiedImageError: ")
        assert "--skip_bad_images" in str(e.value)


def test_folder_datasets_need_datadir():
    with pytest.raises(Exception, match="--datadir"):
        data.load_splits(config(None), get_dataset("imagenet2012"))
