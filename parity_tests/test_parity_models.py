"""One .npz into PyTorch, JAX and TF2 (and timm, an independent implementation): same outputs.

Written against the contract only: models.load_npz / predict / embed / features / save_npz.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bit_common import checkpoint, contract
from bit_common.registry import parse_arch
from conftest import random_images
from parity_tests.frameworks import FRAMEWORKS, framework_models, timm_logits

TOL = 1e-4  # float32: three summation orders of a 50-layer network
FAST_SHAPES = [(4, 64, 64), (1, 33, 47)]
SLOW_SHAPES = [(1, 97, 97), (4, 128, 128)]


@pytest.fixture(scope="module")
def loaded(r50_npz):
    return {fw: framework_models(fw).load_npz(r50_npz) for fw in FRAMEWORKS}


def _max_diff(outputs: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(outputs[a] - outputs[b]).max())
               for a, b in itertools.combinations(outputs, 2))


def check_agreement(loaded, r50_npz, shape, report):
    x = random_images(*shape, seed=sum(shape))
    logits = {fw: framework_models(fw).predict(m, x) for fw, m in loaded.items()}
    feats = {fw: framework_models(fw).embed(m, x) for fw, m in loaded.items()}
    logits["timm"] = timm_logits(r50_npz, x)
    for fw in FRAMEWORKS:
        assert logits[fw].shape == (shape[0], 10) and logits[fw].dtype == np.float32
        assert feats[fw].shape == (shape[0], 2048) and feats[fw].dtype == np.float32
    d_logits, d_feats = _max_diff(logits), _max_diff(feats)
    report(f"R50x1 {shape}: max |Δ| logits {d_logits:.2e}, embeddings {d_feats:.2e}")
    assert d_logits <= TOL and d_feats <= TOL
    assert np.abs(logits["timm"]).max() > 0.1  # the comparison is not between zeros


@pytest.mark.parametrize("shape", FAST_SHAPES)
def test_logits_and_embeddings_agree(loaded, r50_npz, shape, report):
    check_agreement(loaded, r50_npz, shape, report)


def test_stage_features_agree(loaded, report):
    """`features` of one .npz: the same keys and shapes (an odd size, where the convolutions'
    padding decides the sizes) and the same values in the three frameworks, to TOL of each
    stage's scale (the residual stream of this random network grows to about 100)."""
    x = random_images(2, 33, 47, seed=9)
    feats = {fw: framework_models(fw).features(m, x) for fw, m in loaded.items()}
    want = {k: (2, *s) for k, s in contract.feature_shapes(parse_arch("R50x1"), 33, 47).items()}
    for fw, stages in feats.items():
        assert list(stages) == list(contract.STAGES)
        assert {k: v.shape for k, v in stages.items()} == want, fw
        assert all(v.dtype == np.float32 for v in stages.values())
    for key in contract.STAGES:
        outputs = {fw: stages[key] for fw, stages in feats.items()}
        scale = max(float(np.abs(v).max()) for v in outputs.values())
        d = _max_diff(outputs)
        report(f"R50x1 (2, 33, 47) {key}: max |Δ| {d:.2e} of max |x| {scale:.1f}")
        assert d <= TOL * scale
        assert scale > 1  # the comparison is not between zeros


@pytest.mark.slow
@pytest.mark.parametrize("shape", SLOW_SHAPES)
def test_logits_agree_on_larger_and_odd_inputs(loaded, r50_npz, shape, report):
    check_agreement(loaded, r50_npz, shape, report)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["R101x1", "R50x3"])
def test_deeper_and_wider_architectures_agree(arch, tmp_path, report):
    path = checkpoint.write_random_checkpoint(tmp_path / f"{arch}.npz", parse_arch(arch), 5,
                                              seed=1)
    x = random_images(2, 64, 64, seed=5)
    logits = {fw: framework_models(fw).predict(framework_models(fw).load_npz(path), x)
              for fw in FRAMEWORKS}
    d = _max_diff(logits)
    report(f"{arch} (2, 64, 64): max |Δ| logits {d:.2e}")
    assert d <= TOL


def test_saved_files_have_the_released_layout_and_cross_load(loaded, r50_npz, r50_params,
                                                             tmp_path, report):
    want = checkpoint.expected_shapes(parse_arch("R50x1"), 10)
    x = random_images(4, 64, 64, seed=1)
    for fw, model in loaded.items():
        path = tmp_path / f"{fw}.npz"
        framework_models(fw).save_npz(model, path)
        with np.load(path) as f:
            assert sorted(f.files) == sorted(want)
            assert all(f[k].shape == want[k] and f[k].dtype == np.float32 for k in f.files)
            assert all(np.array_equal(f[k], r50_params[k]) for k in f.files)
    # Each framework loads the file another one wrote (a cycle; all 9 pairs in the slow test).
    ref = framework_models("pytorch").predict(loaded["pytorch"], x)
    for writer, reader in (("pytorch", "jax"), ("jax", "tf2"), ("tf2", "pytorch")):
        m = framework_models(reader)
        got = m.predict(m.load_npz(tmp_path / f"{writer}.npz"), x)
        report(f"round trip {writer} -> {reader}: max |Δ| {np.abs(got - ref).max():.2e}")
        assert np.abs(got - ref).max() <= TOL


@pytest.mark.slow
def test_all_nine_round_trips(loaded, tmp_path, report):
    x = random_images(4, 64, 64, seed=2)
    for fw, model in loaded.items():
        framework_models(fw).save_npz(model, tmp_path / f"{fw}.npz")
    ref = framework_models("pytorch").predict(loaded["pytorch"], x)
    worst = 0.0
    for writer, reader in itertools.product(FRAMEWORKS, FRAMEWORKS):
        m = framework_models(reader)
        got = m.predict(m.load_npz(tmp_path / f"{writer}.npz"), x)
        worst = max(worst, float(np.abs(got - ref).max()))
    report(f"9 round trips: max |Δ| {worst:.2e}")
    assert worst <= TOL


def test_same_batching_and_the_same_error_for_bad_images(loaded):
    """`predict(m, images, batch_size)` runs chunks of at most batch_size in every framework (the
    result does not depend on it), and a wrong shape is the same BiTError in all three, for
    `predict` and `features` alike."""
    from bit_common.errors import BiTError

    x = random_images(4, 64, 64, seed=7)  # the size the tests above compiled for
    for fw, m in loaded.items():
        models = framework_models(fw)
        whole = models.predict(m, x)
        np.testing.assert_allclose(models.predict(m, x, batch_size=2), whole, rtol=0, atol=TOL)
        assert models.embed(m, x[:0]).shape == (0, 2048)
        assert models.features(m, x[:0])["block2"].shape == (0, 8, 8, 512)
        for fn in (models.predict, models.features):
            for bad in (x[0], x[..., :1]):
                with pytest.raises(BiTError, match=r"Images must be float32 NHWC with 3 channels"):
                    fn(m, bad)
            with pytest.raises(BiTError, match="batch_size must be at least 1"):
                fn(m, x, batch_size=0)
