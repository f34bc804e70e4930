"""bit_pytorch.models: the ResNet-v2 against timm, the contract, and bad checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bit_common import checkpoint, contract
from bit_common.errors import CheckpointError
from bit_common.registry import parse_arch
from bit_pytorch import models
from conftest import pooled_pre_logits


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(r50_npz):
    return models.load_npz(r50_npz)


def test_state_dict_names_are_the_released_keys(model, r50_params):
    assert models.param_name("resnet/block2/unit01/a/proj/standardized_conv2d/kernel") == \
        "body.block2.unit01.downsample.weight"
    assert models.param_name("resnet/block1/unit03/b/group_norm/gamma") == \
        "body.block1.unit03.gn2.weight"
    assert models.to_state_dict({checkpoint.HEAD_KERNEL: np.zeros((1, 1, 2048, 5))})[
        "head.conv.weight"].shape == (5, 2048, 1, 1)
    want = {models.param_name(k): v.shape for k, v in r50_params.items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(got) == set(want)
    for k, shape in want.items():  # OIHW here, HWIO in the file
        assert got[k] == (tuple(shape[i] for i in (3, 2, 0, 1)) if len(shape) == 4 else shape)


def test_weight_standardization_formula(model):
    conv = model.body.block2.unit01.conv2
    w = conv.weight.detach().double()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    ref = (w - mean) / torch.sqrt(var + 1e-10)
    got = conv.standardized_weight().detach().double()
    assert (got - ref).abs().max().item() < 1e-5


def test_predict_matches_timm(model, r50_npz, images):
    timm = pytest.importorskip("timm")
    ref = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10)
    ref.load_pretrained(str(r50_npz))
    ref.eval()
    for shape in ((2, 64, 64), (1, 33, 47)):
        x = images(*shape, seed=1)
        with torch.no_grad():
            want = ref(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
        got = models.predict(model, x)
        assert got.dtype == np.float32 and got.shape == want.shape
        diff = np.abs(got - want).max()
        print(f"predict vs timm {shape}: max |d| = {diff:.2e}")
        assert diff <= 1e-4


def test_embed_shape_and_head(model, r50_params, images):
    x = images(2, 64, 64, seed=2)
    feats = models.embed(model, x)
    assert feats.shape == (2, 2048) and feats.dtype == np.float32
    w = r50_params[checkpoint.HEAD_KERNEL][0, 0]
    b = r50_params[checkpoint.HEAD_BIAS]
    np.testing.assert_allclose(feats @ w + b, models.predict(model, x), atol=1e-5)


def test_features_are_timms_stage_taps_and_what_embed_pools(model, r50_npz, r50_params,
                                                           images):
    """block1..block4 as float32 NHWC of the contract's shapes (odd and 224 px inputs); the
    values of timm's `features_only` ResNetV2 (its out_indices 1-4), and block4 is what `embed`
    normalizes and pools; batching and channels_last change nothing."""
    timm = pytest.importorskip("timm")
    from timm.models import FeatureListNet

    x = images(2, 33, 47, seed=8)
    feats = models.features(model, x)
    assert list(feats) == list(contract.STAGES)
    assert {k: v.shape for k, v in feats.items()} == {
        "block1": (2, 9, 12, 256), "block2": (2, 5, 6, 512), "block3": (2, 3, 3, 1024),
        "block4": (2, 2, 2, 2048)}
    assert all(v.dtype == np.float32 for v in feats.values())
    ref = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10)
    ref.load_pretrained(str(r50_npz))
    # What timm's create_model(..., features_only=True) wraps the model in.
    taps = FeatureListNet(ref, out_indices=(1, 2, 3, 4), flatten_sequential=True).eval()
    with torch.no_grad():
        want = taps(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    for (key, got), w in zip(feats.items(), want):
        w = w.permute(0, 2, 3, 1).numpy()
        diff = np.abs(got - w).max() / np.abs(w).max()
        print(f"features {key} vs timm: max |d| / max |x| = {diff:.1e}")
        assert diff <= 1e-4
    np.testing.assert_allclose(models.embed(model, x),
                               pooled_pre_logits(feats["block4"], r50_params), rtol=0, atol=1e-4)
    for key, v in models.features(model, x, batch_size=1).items():
        np.testing.assert_allclose(v, feats[key], rtol=0, atol=1e-4 * np.abs(v).max())
    cl = models.load_npz(r50_npz).to(memory_format=torch.channels_last)
    for key, v in models.features(cl, x).items():
        np.testing.assert_allclose(v, feats[key], rtol=0, atol=1e-4 * np.abs(v).max())
    big = models.features(model, images(1, 224, 224, seed=9))
    assert {k: v.shape for k, v in big.items()} == {
        "block1": (1, 56, 56, 256), "block2": (1, 28, 28, 512), "block3": (1, 14, 14, 1024),
        "block4": (1, 7, 7, 2048)}
    assert models.features(model, x[:0])["block3"].shape == (0, 3, 3, 1024)


def test_channels_last(model, r50_npz, images):
    x = images(2, 64, 64, seed=3)
    cl = models.load_npz(r50_npz).to(memory_format=torch.channels_last)
    assert models.memory_format(cl) == torch.channels_last
    assert np.abs(models.predict(cl, x) - models.predict(model, x)).max() <= 1e-4
    with torch.no_grad():  # a channels_last input into the model works too
        t = torch.from_numpy(x).permute(0, 3, 1, 2)
        assert t.is_contiguous(memory_format=torch.channels_last)
        np.testing.assert_allclose(cl(t).numpy(), models.predict(model, x), atol=1e-4)


def test_save_load_roundtrip(model, r50_npz, tmp_path, images):
    out = tmp_path / "saved.npz"
    models.save_npz(model, out)
    with np.load(out) as saved, np.load(r50_npz) as orig:
        want = checkpoint.expected_shapes(parse_arch("R50x1"), 10)
        assert {k: saved[k].shape for k in saved.files} == want
        for k in orig.files:
            np.testing.assert_array_equal(saved[k], orig[k])
    x = images(2, 64, 64, seed=4)
    np.testing.assert_array_equal(models.predict(models.load_npz(out), x),
                                  models.predict(model, x))
    params = models.to_params(model)
    again = models.from_params(parse_arch("R50x1"), params)
    np.testing.assert_array_equal(models.predict(again, x), models.predict(model, x))


def test_new_head_is_zero(r50_npz, images):
    m = models.load_npz(r50_npz, num_classes=5)
    logits = models.predict(m, images(2, 32, 32))
    assert logits.shape == (2, 5)
    assert not logits.any()


def test_bad_checkpoints_raise_checkpoint_error(r50_params, r50_npz, tmp_path):
    wrong = dict(r50_params)
    key = "resnet/block2/unit01/b/standardized_conv2d/kernel"
    wrong[key] = np.zeros((3, 3, 128, 64), np.float32)
    np.savez(tmp_path / "wrong.npz", **wrong)
    with pytest.raises(CheckpointError, match="shape"):
        models.load_npz(tmp_path / "wrong.npz")

    missing = {k: v for k, v in r50_params.items() if "block4/unit03/c" not in k}
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(CheckpointError, match="missing"):
        models.load_npz(tmp_path / "missing.npz")

    data = r50_npz.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        models.load_npz(tmp_path / "truncated.npz")

    with pytest.raises(CheckpointError):
        models.from_params(parse_arch("R101x1"), r50_params)


@pytest.mark.slow
def test_deeper_architecture_matches_timm(tmp_path, images):
    timm = pytest.importorskip("timm")
    path = checkpoint.write_random_checkpoint(tmp_path / "r101.npz", "R101x1", 7, seed=5)
    m = models.load_npz(path)
    assert m.arch.name == "R101x1"
    ref = timm.create_model("resnetv2_101x1_bit", pretrained=False, num_classes=7)
    ref.load_pretrained(str(path))
    ref.eval()
    x = images(2, 97, 97, seed=6)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    diff = np.abs(models.predict(m, x) - want).max()
    print(f"R101x1 predict vs timm: max |d| = {diff:.2e}")
    assert diff <= 1e-4
