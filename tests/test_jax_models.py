"""bit_jax.models: the flax ResNet-v2 against timm, the contract, and checkpoint round trips."""

from __future__ import annotations

import numpy as np
import pytest

from bit_common import checkpoint, contract
from bit_common.errors import BiTError, CheckpointError
from bit_common.registry import parse_arch
from conftest import pooled_pre_logits, random_images

pytest.importorskip("jax")
pytest.importorskip("flax")

from bit_jax import models  # noqa: E402


@pytest.fixture(scope="module")
def model(r50_npz):
    return models.load_npz(r50_npz)


@pytest.fixture(scope="module")
def x64():
    return random_images(2, 64, 64, seed=1)


def test_param_paths_are_the_released_keys(model, r50_params):
    from flax import traverse_util

    assert models.param_path("resnet/block1/unit03/b/group_norm/gamma") == \
        "block1/unit03/b/group_norm/scale"
    flat = traverse_util.flatten_dict(model.params, sep="/")
    want = {models.param_path(k): v.shape for k, v in r50_params.items()}
    assert {k: tuple(v.shape) for k, v in flat.items()} == want
    assert "block1/unit01/a/proj/standardized_conv2d/kernel" in flat
    assert "head/conv2d/kernel" in flat and "group_norm/scale" in flat


def test_predict_matches_timm(model, r50_npz, x64):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    ref = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10)
    ref.load_pretrained(str(r50_npz))
    ref.eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(x64.transpose(0, 3, 1, 2).copy())).numpy()
    got = models.predict(model, x64)
    assert got.dtype == np.float32 and got.shape == (2, 10)
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()


def test_predict_compiles_once_per_padded_batch_size(model):
    """Seven batch sizes of one image size compile the forward pass for 1, 2, 4 and 8 rows only."""
    fn = model.jitted("logits")
    before = fn._cache_size()
    x = random_images(7, 32, 32, seed=5)
    for n in range(1, 8):
        models.predict(model, x[:n])
    assert fn._cache_size() - before <= 4


def test_embed_shape_and_head(model, x64):
    feats = models.embed(model, x64)
    assert feats.dtype == np.float32 and feats.shape == (2, 2048)
    assert np.all(feats >= 0)  # relu before the pooling
    params = models.to_params(model)
    logits = feats @ params[checkpoint.HEAD_KERNEL][0, 0] + params[checkpoint.HEAD_BIAS]
    np.testing.assert_allclose(models.predict(model, x64), logits, atol=1e-4)


def test_features_shapes_padding_and_what_embed_pools(model, r50_params):
    """block1..block4 as float32 NHWC of the contract's shapes; 3 images run as one padded
    program of 4, which 4 images reuse with the same rows; block4 is what `embed` normalizes and
    pools; the stage shapes of odd and 224 px inputs are the contract's (traced, not run)."""
    import jax

    x = random_images(4, 64, 64, seed=8)
    fn = model.jitted("features")
    before = fn._cache_size()
    feats = models.features(model, x[:3])
    assert list(feats) == list(contract.STAGES)
    assert {k: v.shape for k, v in feats.items()} == {
        "block1": (3, 16, 16, 256), "block2": (3, 8, 8, 512), "block3": (3, 4, 4, 1024),
        "block4": (3, 2, 2, 2048)}
    assert all(type(v) is np.ndarray and v.dtype == np.float32 for v in feats.values())
    for key, v in models.features(model, x).items():
        np.testing.assert_allclose(v[:3], feats[key], rtol=0, atol=1e-5 * np.abs(v).max())
    assert fn._cache_size() - before == 1
    np.testing.assert_allclose(models.embed(model, x[:3]),
                               pooled_pre_logits(feats["block4"], r50_params), rtol=0, atol=1e-4)
    for h, w in ((33, 47), (224, 224)):
        traced = jax.eval_shape(fn, model.params, jax.ShapeDtypeStruct((1, h, w, 3), np.float32))
        assert {k: v.shape for k, v in traced.items()} == {
            k: (1, *s) for k, s in contract.feature_shapes(model.arch, h, w).items()}
    assert traced["block4"].shape == (1, 7, 7, 2048)
    assert models.features(model, x[:0])["block1"].shape == (0, 16, 16, 256)


def test_zero_head_and_odd_size(r50_npz):
    m = models.load_npz(r50_npz, num_classes=3)
    assert m.num_classes == 3 and m.arch == parse_arch("R50x1")
    y = models.predict(m, random_images(1, 33, 47))
    assert y.shape == (1, 3) and np.all(y == 0)


def test_save_load_round_trip(model, r50_npz, x64, tmp_path):
    out = tmp_path / "saved.npz"
    models.save_npz(model, out)
    with np.load(out) as saved, np.load(r50_npz) as orig:
        assert sorted(saved.files) == sorted(orig.files)
        for k in orig.files:
            assert saved[k].shape == orig[k].shape and saved[k].dtype == np.float32
            np.testing.assert_array_equal(saved[k], orig[k])
    again = models.load_npz(out)
    np.testing.assert_array_equal(models.predict(again, x64), models.predict(model, x64))


def test_from_params_to_params(r50_params):
    arch = parse_arch("R50x1")
    m = models.from_params(arch, r50_params)
    back = models.to_params(m)
    assert back.keys() == r50_params.keys()
    assert all(np.array_equal(back[k], r50_params[k]) for k in back)


def test_bad_checkpoints(r50_npz, r50_params, tmp_path):
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(r50_npz.read_bytes()[: 1 << 20])
    with pytest.raises(CheckpointError, match="damaged or truncated .npz archive"):
        models.load_npz(truncated)
    missing = dict(r50_params)
    del missing["resnet/block2/unit03/b/group_norm/beta"]
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(CheckpointError, match="missing key"):
        models.load_npz(tmp_path / "missing.npz")
    wrong = dict(r50_params)
    wrong["resnet/block3/unit01/c/standardized_conv2d/kernel"] = np.zeros((1, 1, 256, 512),
                                                                          np.float32)
    np.savez(tmp_path / "wrong.npz", **wrong)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        models.load_npz(tmp_path / "wrong.npz")
    with pytest.raises(CheckpointError, match="does not exist"):
        models.load_npz(tmp_path / "nothing.npz")


def test_bad_images(model):
    with pytest.raises(BiTError, match="NHWC"):
        models.predict(model, np.zeros((2, 3, 32, 32), np.float32))


def test_importing_models_does_not_import_tensorflow():
    import subprocess
    import sys

    code = ("import sys, bit_jax, bit_jax.models; "
            "print(any(m == 'tensorflow' or m.startswith('keras') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
