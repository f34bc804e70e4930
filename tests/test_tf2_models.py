"""bit_tf2.models: the ResNet-v2 against timm, the .npz round trip, SavedModel export, errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bit_common import checkpoint, contract
from bit_common.errors import CheckpointError
from bit_common.registry import parse_arch
from conftest import pooled_pre_logits, random_images

tf = pytest.importorskip("tensorflow")
models = pytest.importorskip("bit_tf2.models")
ops = pytest.importorskip("bit_tf2.ops")


def _run_python(code: str, cwd: Path, timeout: int = 300) -> str:
    """Run `code` in a fresh interpreter (torch/triton must not share a process with TF: importing
    triton after TensorFlow crashes); returns stdout, fails the test with stderr otherwise."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def model(r50_npz):
    return models.load_npz(r50_npz)


@pytest.fixture(scope="module")
def inputs():
    return random_images(2, 64, 64, seed=1)


def test_predict_matches_timm(model, inputs, r50_npz, tmp_path):
    if importlib.util.find_spec("timm") is None:  # never import it here (see _run_python)
        pytest.skip("timm is not installed")
    np.save(tmp_path / "x.npy", inputs)
    _run_python(f"""
        import numpy as np, timm, torch
        m = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10)
        m.load_pretrained({str(r50_npz)!r})
        m.eval()
        x = torch.from_numpy(np.load("x.npy").transpose(0, 3, 1, 2))
        with torch.no_grad():
            np.save("y.npy", m(x).numpy())
    """, cwd=tmp_path)
    ref = np.load(tmp_path / "y.npy")
    got = models.predict(model, inputs)
    assert got.dtype == np.float32 and got.shape == (2, 10)
    assert np.abs(ref).max() > 0.1  # informative logits, not a trivially zero head
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


def test_embed_and_odd_sizes(model):
    x = random_images(3, 33, 47, seed=2)
    feats = models.embed(model, x)
    assert feats.shape == (3, 2048) and feats.dtype == np.float32
    assert (feats >= 0).all()  # mean of a relu
    # The head is a dense layer on the pre-logits.
    p = models.to_params(model)
    w = p[checkpoint.HEAD_KERNEL][0, 0]
    np.testing.assert_allclose(models.predict(model, x), feats @ w + p[checkpoint.HEAD_BIAS],
                               rtol=1e-5, atol=1e-5)
    # Batching does not change the result.
    np.testing.assert_allclose(models.predict(model, x, batch_size=1), models.predict(model, x),
                               rtol=0, atol=1e-4)


def test_features_trace_once_per_image_size_and_are_what_embed_pools(model):
    """block1..block4 as float32 NHWC of the contract's shapes for odd-sized images, one trace
    for batches of 1 to 3 with the same rows; block4 is what `embed` normalizes and pools."""
    x = random_images(3, 33, 47, seed=2)
    feats = models.features(model, x)
    assert list(feats) == list(contract.STAGES)
    assert {k: v.shape for k, v in feats.items()} == {
        "block1": (3, 9, 12, 256), "block2": (3, 5, 6, 512), "block3": (3, 3, 3, 1024),
        "block4": (3, 2, 2, 2048)}
    assert all(type(v) is np.ndarray and v.dtype == np.float32 for v in feats.values())
    for n in (1, 2):
        for key, v in models.features(model, x[:n]).items():
            np.testing.assert_allclose(v, feats[key][:n], rtol=0, atol=1e-4 * np.abs(v).max())
    assert models._compiled(model, "features", 33, 47).experimental_get_tracing_count() == 1
    np.testing.assert_allclose(models.embed(model, x),
                               pooled_pre_logits(feats["block4"], models.to_params(model)),
                               rtol=0, atol=1e-4)
    assert models.features(model, x[:0])["block4"].shape == (0, 2, 2, 2048)


def test_predict_traces_once_per_image_size(model):
    """Batches of 1 to 7 images of one size, twice over, reuse one trace (the batch left open),
    with no retracing warning and the same logits."""
    import logging

    x = random_images(7, 32, 48, seed=5)
    whole = models.predict(model, x)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    tf.get_logger().addHandler(handler)
    try:
        for n in [*range(1, 8), *range(1, 8)]:
            np.testing.assert_allclose(models.predict(model, x[:n]), whole[:n], rtol=0,
                                       atol=1e-4)
    finally:
        tf.get_logger().removeHandler(handler)
    assert models._compiled(model, "logits", 32, 48).experimental_get_tracing_count() == 1
    assert not [r for r in records if "retracing" in r.getMessage()]


def test_group_norm_relu_is_bits(model):
    """relu(group norm) with 32 groups, eps 1e-5, biased variance; its hand-written gradient
    equals autodiff of the float64 formula."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 5, 7, 64)) * 3 + 1).astype(np.float32)
    gamma, beta = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(
        np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer = models.GroupNormReLU()
    layer.build(x.shape)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)

    def reference(x, gamma, beta):  # the textbook formula, autodiff in float64
        g = tf.reshape(x, (2, 5, 7, 32, 2))
        mean, var = tf.nn.moments(g, axes=[1, 2, 4], keepdims=True)
        return tf.nn.relu(tf.reshape((g - mean) / tf.sqrt(var + 1e-5), x.shape) * gamma + beta)

    ref_in = [tf.constant(v, tf.float64) for v in (x, gamma, beta)]
    with tf.GradientTape() as tape:
        tape.watch(ref_in)
        want = reference(*ref_in)
    want_grads = tape.gradient(want, ref_in, output_gradients=tf.constant(dy, tf.float64))
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        got = layer(xt)
    got_grads = tape.gradient(got, [xt, layer.gamma, layer.beta], output_gradients=dy)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-4, atol=1e-4)


def test_kernel_standardization_and_gradient():
    """WS over (H, W, I) with eps 1e-10 (a fused batch norm on CPU): values and gradient."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((3, 3, 16, 8)) * 0.05 + 0.01).astype(np.float32)
    dy = rng.standard_normal(w.shape).astype(np.float32)
    w64 = tf.constant(w, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(w64)
        mean, var = tf.nn.moments(w64, axes=[0, 1, 2], keepdims=True)
        want = (w64 - mean) / tf.sqrt(var + 1e-10)
    want_grad = tape.gradient(want, w64, output_gradients=tf.constant(dy, tf.float64))
    wt = tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch(wt)
        got = ops.standardize_kernel(wt)
    got_grad = tape.gradient(got, wt, output_gradients=dy)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_grad.numpy(), want_grad.numpy(), rtol=1e-4,
                               atol=1e-4 * np.abs(want_grad.numpy()).max())


def test_standardized_conv_is_bits():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 6, 6, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4, 8)).astype(np.float32)
    layer = models.StandardizedConv2D(8, 3, 2)
    layer.build(x.shape)
    layer.kernel.assign(w)
    ws = (w - w.mean(axis=(0, 1, 2))) / np.sqrt(w.var(axis=(0, 1, 2)) + 1e-10)
    want = tf.nn.conv2d(x, ws, 2, "VALID").numpy()
    np.testing.assert_allclose(layer(x).numpy(), want, rtol=1e-5, atol=1e-5)
    assert [v.name for v in layer.trainable_variables] == ["kernel"]


@pytest.mark.parametrize("shape", [(2, 13, 11, 16), (2, 8, 8, 24), (1, 1, 3, 8)])
def test_winograd_conv_matches_direct_conv(shape):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal(shape, dtype=np.float32))
    w = tf.constant(rng.standard_normal((3, 3, shape[-1], 12), dtype=np.float32))
    probe = tf.constant(rng.standard_normal((*shape[:3], 12), dtype=np.float32))

    def value_and_grads(fn):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = fn(x, w)
            loss = tf.reduce_sum(y * probe)
        return [y, *tape.gradient(loss, [x, w])]

    want = value_and_grads(lambda x, w: tf.nn.conv2d(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]),
                                                     w, 1, "VALID"))
    # Traced with the batch left open too: the transforms then reshape with -1 for it.
    open_batch = tf.function(ops.conv3x3_winograd, input_signature=[
        tf.TensorSpec([None, *shape[1:]]), tf.TensorSpec(w.shape)])
    for fn in (ops.conv3x3_winograd, open_batch):
        for g, t in zip(value_and_grads(fn), want):
            assert float(tf.reduce_max(tf.abs(g - t))) <= 1e-5 * float(tf.reduce_max(tf.abs(t)))


def test_standardized_conv_takes_winograd_for_float32_3x3(monkeypatch):
    """Stride-1 3x3 layers of known image size use Winograd on CPU, with the batch known or not;
    BIT_TF2_WINOGRAD=0, a stride, a 1x1 kernel or an unknown image size keep the direct op, and
    the paths agree."""
    x = np.random.default_rng(0).standard_normal((2, 9, 9, 8)).astype(np.float32)
    calls = []
    winograd_conv = ops.conv3x3_winograd
    monkeypatch.setattr(ops, "conv3x3_winograd",
                        lambda *a: calls.append(a) or winograd_conv(*a))

    def run(k=3, stride=1, open_dims=()):
        """The layer's output (through a trace with `open_dims` of the input unknown) and
        whether it took the Winograd path."""
        calls.clear()
        layer = models.StandardizedConv2D(16, k, stride, padding=k // 2)
        layer.build(x.shape)
        layer.kernel.assign(np.linspace(-1, 1, layer.kernel.shape.num_elements(),
                                        dtype=np.float32).reshape(layer.kernel.shape))
        if open_dims:
            spec = tf.TensorSpec([None if i in open_dims else d for i, d in enumerate(x.shape)])
            return tf.function(layer, input_signature=[spec])(x).numpy(), bool(calls)
        return layer(x).numpy(), bool(calls)

    monkeypatch.delenv(ops.WINOGRAD_ENV, raising=False)
    y_wino, used = run()
    assert used
    assert not run(stride=2)[1] and not run(k=1)[1] and not run(open_dims=(1, 2))[1]
    y_open_batch, used = run(open_dims=(0,))
    assert used
    np.testing.assert_allclose(y_open_batch, y_wino, rtol=1e-6, atol=1e-6)
    monkeypatch.setenv(ops.WINOGRAD_ENV, "0")
    y_direct, used = run()
    assert not used
    np.testing.assert_allclose(y_wino, y_direct, rtol=1e-5, atol=1e-5)


def test_zero_head(r50_npz):
    m = models.load_npz(r50_npz, num_classes=5)
    assert m.num_classes == 5
    np.testing.assert_array_equal(models.predict(m, random_images(2, 32, 32)),
                                  np.zeros((2, 5), np.float32))
    assert len(m.trainable_variables) == len(m.variables_by_key)
    assert m.variables_by_key["resnet/block1/unit03/b/group_norm/gamma"] is m.units[2].gn_b.gamma


def test_save_load_round_trip(model, r50_npz, r50_params, inputs, tmp_path):
    path = tmp_path / "saved.npz"
    models.save_npz(model, path)
    arch = parse_arch("R50x1")
    with np.load(path) as f:
        saved = {k: f[k] for k in f.files}
    want = checkpoint.expected_shapes(arch, 10)
    assert list(saved) == list(want)
    assert {k: v.shape for k, v in saved.items()} == want
    assert all(v.dtype == np.float32 for v in saved.values())
    for k, v in r50_params.items():
        np.testing.assert_array_equal(saved[k], v)
    again = models.load_npz(path)
    np.testing.assert_array_equal(models.predict(again, inputs), models.predict(model, inputs))


def test_checkpoint_errors(r50_npz, r50_params, tmp_path):
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(Path(r50_npz).read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="damaged or truncated .npz archive"):
        models.load_npz(truncated)
    bad = dict(r50_params)
    key = "resnet/block2/unit02/b/standardized_conv2d/kernel"
    bad[key] = np.zeros((3, 3, 128, 64), np.float32)
    np.savez(tmp_path / "mismatch.npz", **bad)
    with pytest.raises(CheckpointError, match="block2/unit02/b"):
        models.load_npz(tmp_path / "mismatch.npz")
    missing = {k: v for k, v in r50_params.items() if "block3/unit04/c" not in k}
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(CheckpointError, match="missing"):
        models.load_npz(tmp_path / "missing.npz")
    with pytest.raises(CheckpointError, match="does not exist"):
        models.load_npz(tmp_path / "nope.npz")
    with pytest.raises(CheckpointError):
        models.from_params(parse_arch("R101x1"), r50_params)


def test_export_reloads_without_bit_tf2(model, inputs, tmp_path, monkeypatch):
    out = models.export(model, tmp_path / "saved_model")
    np.save(tmp_path / "x.npy", inputs)
    # A fresh interpreter outside the repository: only TensorFlow, never this package.
    stdout = _run_python(f"""
        import sys
        import numpy as np, tensorflow as tf
        loaded = tf.saved_model.load({str(out)!r})
        x = np.load("x.npy")
        y = loaded.signatures["serving_default"](images=tf.constant(x))["logits"].numpy()
        y2 = loaded.serve(tf.constant(x[:1, :40, :50]))["logits"].numpy()
        f = loaded.signatures["embed"](images=tf.constant(x))["pre_logits"].numpy()
        np.save("y.npy", y); np.save("y2.npy", y2); np.save("f.npy", f)
        print(sorted(m for m in sys.modules if m.startswith("bit_")))
    """, cwd=tmp_path)
    assert stdout.strip() == "[]"
    # The export's signatures take any image size, so its 3x3 layers are the direct op (Winograd
    # needs known shapes): compare with the same computation here, freshly traced.
    monkeypatch.setenv(ops.WINOGRAD_ENV, "0")
    direct = tf.function(lambda x, features: model(x, features=features))
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), direct(inputs, False), rtol=0,
                               atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "y2.npy"), direct(inputs[:1, :40, :50], False),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), direct(inputs, True), rtol=0,
                               atol=1e-5)


def test_mixed_bfloat16_builds_and_trains(r50_npz):
    """Under a mixed policy the model builds and gives float32 outputs and float32 gradients
    for every variable (GroupNormReLU, the kernels and the head read their float32 variables
    inside the model's autocast scope). bfloat16 rounding moves this random network's
    pre-logits by about 23% (JAX's bfloat16 path alike), so the values are only sanity-checked
    here; the op's own bfloat16 accuracy is tested below."""
    x = tf.constant(random_images(2, 32, 32))
    want = models.embed(models.load_npz(r50_npz), x.numpy())
    keras = tf.keras
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        m = models.load_npz(r50_npz)
        feats = m(x, features=True)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(m(x)))
        grads = tape.gradient(loss, list(m.variables_by_key.values()))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert feats.dtype == tf.float32
    rel = np.linalg.norm(feats.numpy() - want) / np.linalg.norm(want)
    print(f"bf16 vs fp32 pre-logits: relative L2 {rel:.1e}")
    assert rel < 0.5
    assert all(g is not None and g.dtype == tf.float32 for g in grads)
    assert all(np.isfinite(g.numpy()).all() for g in grads)


def test_group_norm_relu_in_bfloat16():
    """bfloat16 in, bfloat16 out and input gradient, float32 statistics and gamma/beta
    gradients: within bfloat16 rounding of the float32 op."""
    rng = np.random.default_rng(0)
    # Inputs that bfloat16 holds exactly, so both runs see the same ReLU mask.
    x, dy = (tf.cast(tf.cast(t, tf.bfloat16), tf.float32).numpy() for t in (
        (rng.standard_normal((2, 4, 4, 64)) * 2 + 1).astype(np.float32),
        rng.standard_normal((2, 4, 4, 64)).astype(np.float32)))
    gamma, beta = (tf.constant(rng.standard_normal(64).astype(np.float32)) for _ in range(2))
    out = {}
    for dtype in (tf.float32, tf.bfloat16):
        xt = tf.cast(x, dtype)
        with tf.GradientTape() as tape:
            tape.watch([xt, gamma, beta])
            y = ops.group_norm_relu(xt, gamma, beta)
        grads = tape.gradient(y, [xt, gamma, beta], output_gradients=tf.cast(dy, dtype))
        assert y.dtype == dtype and grads[0].dtype == dtype
        assert grads[1].dtype == grads[2].dtype == tf.float32
        out[dtype] = [t.numpy().astype(np.float32) for t in (y, *grads)]
    for got, want in zip(out[tf.bfloat16], out[tf.float32]):
        np.testing.assert_allclose(got, want, rtol=0, atol=3e-2 * np.abs(want).max())
