"""bit_common without any framework: registry, hyper-rule, few-shot, plan, CLI, datasets."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bit_common import checkpoint, cli, hyperrule, precision, registry, trainable
from bit_common.datasets import (get_dataset, header_problem, image_hw, load_digits,
                                 pillow_image_problem, scan_image_folder, verify_images)
from bit_common.errors import BiTError, DataError
from bit_common.fewshot import sample_few_shot
from bit_common.plan import InputPlan

FRAMEWORK_MODULES = ("torch", "jax", "tensorflow", "flax", "keras", "optax", "sklearn")


def test_importing_bit_common_imports_no_framework():
    code = ("import sys, pkgutil, importlib, bit_common\n"
            "for m in pkgutil.iter_modules(bit_common.__path__):\n"
            "    importlib.import_module('bit_common.' + m.name)\n"
            f"print(sorted(m for m in {FRAMEWORK_MODULES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- registry ---------------------------------------------------------------------------
def test_registry_has_every_released_file():
    models = registry.all_models()
    kinds = [m.kind for m in models.values()]
    assert kinds.count("upstream") == 12
    assert kinds.count("ilsvrc2012") == 6
    assert kinds.count("vtab") == 285
    assert kinds.count("distill") == 4
    m = registry.get_model("BiT-M-R152x4")
    assert (m.arch.depth, m.arch.width, m.num_classes) == (152, 4, 21843)
    assert m.url == "https://storage.googleapis.com/bit_models/BiT-M-R152x4.npz"
    v = registry.get_model("vtab/BiT-M-R101x3-run2-clevr-count")
    assert (v.arch.name, v.num_classes) == ("R101x3", 8)
    assert v.url.endswith("/bit_models/vtab/BiT-M-R101x3-run2-clevr-count.npz")
    assert registry.get_model("distill/R152x2_T_384").arch.name == "R152x2"
    assert registry.get_model("BiT-M-R50x3-ILSVRC2012").num_classes == 1000


def test_unknown_model_suggests_close_names():
    with pytest.raises(BiTError, match=r"Unknown model 'BiT-M-R50x2'.*BiT-M-R50x1"):
        registry.get_model("BiT-M-R50x2")


# ---- BiT-HyperRule ----------------------------------------------------------------------
@pytest.mark.parametrize("step, lr", [(0, 0.0), (50, 0.0015), (100, 0.003), (200, 0.003),
                                      (201, 0.0003), (301, 3e-5), (401, 3e-6), (500, None)])
def test_lr_worked_examples(step, lr):
    got = hyperrule.get_lr(step, 1000, 0.003)
    assert got == lr if lr is None else got == pytest.approx(lr, rel=1e-12)


@pytest.mark.parametrize("n, schedule, mixup", [
    (19_999, (100, 200, 300, 400, 500), 0.0),
    (20_000, (500, 3000, 6000, 9000, 10_000), 0.1),
    (499_999, (500, 3000, 6000, 9000, 10_000), 0.1),
    (500_000, (500, 6000, 12_000, 18_000, 20_000), 0.1),
])
def test_schedule_and_mixup_by_dataset_size(n, schedule, mixup):
    assert hyperrule.get_schedule(n) == schedule
    assert hyperrule.get_mixup(n) == mixup
    assert hyperrule.get_lr(schedule[-1] - 1, n) is not None
    assert hyperrule.get_lr(schedule[-1], n) is None


SCHEDULE_SIZES = (1000, 20_000, 500_000)  # one dataset size per schedule of the rule


@pytest.mark.parametrize("n, steps, schedule", [
    (1000, 120, (24, 48, 72, 96, 120)),
    (1000, 500, (100, 200, 300, 400, 500)),  # the rule's own length changes nothing
    (1000, 1000, (200, 400, 600, 800, 1000)),
    (20_000, 120, (6, 36, 72, 108, 120)),
    (500_000, 2000, (50, 600, 1200, 1800, 2000)),
    (1000, 8, (2, 3, 5, 6, 8)),               # 1.6, 3.2, 4.8, 6.4 rounded half up
    (500_000, 20, (1, 6, 12, 18, 20)),        # 0.5 rounded half up
    (500_000, 10, (1, 3, 6, 8, 10)),          # 0.25 -> 0 would drop the warm-up, 9 the /1000
    (20_000, 6, (1, 2, 3, 4, 6)),             # 0.3, 1.8, 3.6, 5.4: pushed apart
])
def test_scaled_schedule_worked_examples(n, steps, schedule):
    assert hyperrule.get_schedule(n, steps) == schedule
    assert hyperrule.total_steps(n, steps) == steps


@pytest.mark.parametrize("n", SCHEDULE_SIZES)
def test_scaled_schedule_keeps_the_rules_fractions_and_never_merges_points(n):
    rule = hyperrule.get_schedule(n)
    for steps in range(hyperrule.MIN_SCHEDULE_STEPS, 2001):
        points = hyperrule.get_schedule(n, steps)
        assert points[-1] == steps and points[0] >= 1
        assert all(a < b for a, b in zip(points, points[1:])), (steps, points)
        if steps >= 40:  # long enough that rounding alone keeps the points apart
            assert all(abs(p - r * steps / rule[-1]) <= 0.5 for p, r in zip(points, rule))


@pytest.mark.parametrize("n", SCHEDULE_SIZES)
@pytest.mark.parametrize("steps", [6, 7, 9, 24, 120, 777])
def test_scaled_lr_warms_up_then_only_decays_and_ends(n, steps):
    warmup, *decays, end = hyperrule.get_schedule(n, steps)
    lrs = [hyperrule.get_lr(s, n, 0.1, steps) for s in range(end)]
    assert hyperrule.get_lr(end, n, 0.1, steps) is None
    assert lrs[:warmup] == sorted(lrs[:warmup]) and max(lrs) == lrs[warmup] == 0.1
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    # Each decay divides by 10 from the step after it: the last step runs at 1/1000 of the peak.
    assert [lrs[d + 1] / lrs[d] for d in decays] == pytest.approx([0.1] * 3)
    assert lrs[-1] == pytest.approx(0.1 / 1000)


def test_resolution_by_image_area():
    assert hyperrule.get_resolution((32, 32)) == (160, 128)
    assert hyperrule.get_resolution((95, 96)) == (160, 128)
    assert hyperrule.get_resolution((96, 96)) == (512, 480)
    assert hyperrule.get_resolution(get_dataset("oxford_iiit_pet").image_hw) == (512, 480)
    assert hyperrule.get_resolution(get_dataset("cifar100").image_hw) == (160, 128)


# ---- few-shot -----------------------------------------------------------------------------
def test_few_shot_takes_k_of_every_class_deterministically():
    labels = np.random.default_rng(1).integers(0, 7, 1000)
    a = sample_few_shot(labels, 5, seed=3)
    assert np.array_equal(a, sample_few_shot(labels.copy(), 5, seed=3))
    assert not np.array_equal(a, sample_few_shot(labels, 5, seed=4))
    assert np.array_equal(np.bincount(labels[a]), [5] * 7)
    assert len(set(a.tolist())) == 35 and np.all(np.diff(a) > 0)


def test_few_shot_is_uniform_within_a_class():
    labels = np.zeros(10, np.int64)
    picks = np.concatenate([sample_few_shot(labels, 1, seed=s) for s in range(2000)])
    counts = np.bincount(picks, minlength=10)
    assert counts.min() > 140 and counts.max() < 260  # 200 expected each


def test_few_shot_error_names_the_class_and_its_count():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 10)
    with pytest.raises(DataError, match=r"class 1 has \(2\)"):
        sample_few_shot(labels, 5)
    with pytest.raises(DataError, match="at least 1"):
        sample_few_shot(labels, 0)


# ---- the input plan -----------------------------------------------------------------------
def test_plan_sees_every_example_once_per_epoch_and_is_a_function_of_step():
    plan = InputPlan(num_examples=10, batch=4, resize=40, crop=32, seed=7)
    stream = np.concatenate([plan.indices(s) for s in range(5)])  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    again = InputPlan(num_examples=10, batch=4, resize=40, crop=32, seed=7).batch_plan(3)
    first = plan.batch_plan(3)
    assert np.array_equal(first.indices, again.indices)
    assert np.array_equal(first.offsets, again.offsets)
    assert first.offsets.min() >= 0 and first.offsets.max() <= 8
    flips = np.concatenate([plan.batch_plan(s).flips for s in range(200)])
    assert 0.4 < flips.mean() < 0.6


def test_plan_mixup_and_no_augment():
    plan = InputPlan(100, 8, 160, 128, mixup_alpha=0.1, shards=2)
    bp = plan.batch_plan(0)
    assert 0.0 < bp.mixup_lambda < 1.0
    assert sorted(bp.mixup_perm[:4]) == [0, 1, 2, 3] and sorted(bp.mixup_perm[4:]) == [4, 5, 6, 7]
    off = InputPlan(100, 8, 160, 128, mixup_alpha=0.1, augment=False)
    bp = off.batch_plan(0)
    assert bp.mixup_lambda == 1.0 and not bp.flips.any() and not bp.offsets.any()
    assert off.train_size == (128, 128)
    assert np.array_equal(bp.indices, plan.indices(0))  # data order does not depend on augment


# ---- CLI --------------------------------------------------------------------------------
def parse(*extra: str):
    return cli.build_parser("pytorch").parse_args(
        ["--name", "r", "--model", "BiT-M-R50x1", "--logdir", "/tmp/x", "--dataset", "digits",
         *extra])


def test_cli_defaults_are_the_originals():
    a = parse()
    assert (a.batch, a.batch_split, a.base_lr, a.examples_per_class, a.examples_per_class_seed,
            a.eval_every, a.workers, a.save, a.bit_pretrained_dir, a.batch_eval) == (
        512, 1, 0.003, None, 0, None, 8, True, ".", 32)
    assert parse("--no-save").save is False
    assert parse("--resolution", "40", "32").resolution == [40, 32]


@pytest.mark.parametrize("flags, message", [
    (("--batch", "10", "--batch_split", "4"), "not divisible by --batch_split 4"),
    (("--resolution", "32", "40"), "no larger than the resize"),
    (("--steps", "-1",), r"--steps must be at least 0, got -1 \(0: evaluation only\)"),
    (("--save_every", "0",), "--save_every must be at least 1, got 0"),
    (("--schedule_steps", "5",), "--schedule_steps must be at least 6, got 5"),
    (("--schedule_steps", "0",), "--schedule_steps must be at least 6, got 0"),
])
def test_cli_rejects_inconsistent_flags(flags, message):
    with pytest.raises(BiTError, match=message):
        cli.check_args(parse(*flags))


def test_cli_train_choices(capsys):
    assert parse().train == "all" and parse("--train", "block3").train == "block3"
    with pytest.raises(SystemExit) as e:
        parse("--train", "block9")
    assert e.value.code == 2 and "invalid choice: 'block9'" in capsys.readouterr().err


# ---- --train ------------------------------------------------------------------------------
def test_trained_parameters_of_r50x1():
    """Each --train value on the real R50x1 names: the head alone, or blockK..block4 with the
    final norm and the head; the root only with `all`."""
    keys = list(checkpoint.expected_shapes(registry.parse_arch("R50x1"), 10))
    trained = {t: set(trainable.trained_keys(keys, t)) for t in trainable.TRAIN_CHOICES}
    assert trained["all"] == set(keys)
    assert trained["head"] == {checkpoint.HEAD_KERNEL, checkpoint.HEAD_BIAS}
    top = trained["head"] | {"resnet/group_norm/gamma", "resnet/group_norm/beta"}
    units = registry.parse_arch("R50x1").units  # (3, 4, 6, 3)
    for b in range(1, 5):
        block = {k for k in keys if k.startswith(f"resnet/block{b}/")}
        assert len(block) == 9 * units[b - 1] + 1  # 3 norms (2 each), 3 kernels, 1 projection
        later = {k for k in keys if any(k.startswith(f"resnet/block{c}/") for c in range(b, 5))}
        assert trained[f"block{b}"] == later | top
    assert set(keys) - trained["block1"] == {checkpoint.ROOT_KERNEL}
    assert [len(trained[t]) for t in trainable.TRAIN_CHOICES] == [153, 2, 152, 124, 87, 32]
    assert trainable.is_trained("resnet/block3/unit01/a/proj/standardized_conv2d/kernel", "block3")
    assert not trainable.is_trained("resnet/block2/unit04/c/group_norm/beta", "block3")
    assert "root, block1, block2 frozen" in trainable.describe("block3")
    with pytest.raises(ValueError, match="canonical"):
        trainable.is_trained("body.block1.unit01.conv1.weight", "block2")
    with pytest.raises(ValueError, match="block9"):
        trainable.is_trained(checkpoint.HEAD_BIAS, "block9")


# ---- datasets -----------------------------------------------------------------------------
def test_unknown_dataset_suggests_close_names():
    with pytest.raises(BiTError, match="cifar10"):
        get_dataset("cifar")


def test_digits_is_a_fixed_real_split():
    train, test = load_digits("train"), load_digits("test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape == (1437, 8, 8, 3) and train.images.dtype == np.uint8
    assert train.images.max() == 255 and set(np.unique(test.labels)) == set(range(10))
    assert np.array_equal(load_digits("train").labels, train.labels)


def _write_image(path, hw=(12, 20), fmt="PNG"):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((*hw, 3), np.uint8)).save(path, format=fmt)


def test_image_folder_scan(tmp_path, capsys):
    for cls in ("dog", "cat"):
        for i in range(2):
            _write_image(tmp_path / "train" / cls / f"{i}.png")
    _write_image(tmp_path / "train" / "cat" / "x.jpg", hw=(30, 40), fmt="JPEG")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    import io
    warn = io.StringIO()
    split = scan_image_folder(tmp_path, "train", warn=warn)
    assert split.class_names == ["cat", "dog"]
    assert split.labels.tolist() == [0, 0, 0, 1, 1] and len(split.paths) == 5
    assert "notes.txt" in warn.getvalue()
    assert image_hw(tmp_path / "train" / "cat" / "x.jpg") == (30, 40)
    assert image_hw(tmp_path / "train" / "dog" / "0.png") == (12, 20)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        scan_image_folder(tmp_path, "train")
    _write_image(tmp_path / "train" / "a" / "0.png")
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no readable images"):
        scan_image_folder(tmp_path, "train")
    _write_image(tmp_path / "val" / "a" / "0.png")
    with pytest.raises(DataError, match="same class folders"):
        scan_image_folder(tmp_path, "val", class_names=["a", "b"])


def _jpeg_bytes(hw=(40, 40), seed=0) -> bytes:
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*hw, 3), np.uint8)).save(
        buf, format="JPEG")
    return buf.getvalue()


def test_image_headers_are_checked_when_the_folder_is_listed(tmp_path):
    good = _jpeg_bytes()
    cases = {"good.jpg": good, "random.jpg": b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(2000),
             "cut.jpg": good[:100], "zero.png": None, "ok.png": None}
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    _write_image(tmp_path / "ok.png", fmt="PNG")
    zero = bytearray((tmp_path / "ok.png").read_bytes())
    zero[16:20] = b"\0\0\0\0"  # IHDR width 0
    (tmp_path / "zero.png").write_bytes(bytes(zero))
    problems = {name: header_problem(tmp_path / name) for name in cases}
    assert problems["good.jpg"] is None and problems["ok.png"] is None
    assert "runs past the end of the file" in problems["random.jpg"]
    assert "runs past the end of the file" in problems["cut.jpg"]
    assert "zero width or height" in problems["zero.png"]
    # A JPEG cut inside its compressed data passes the header check; only decoding finds it.
    (tmp_path / "half.jpg").write_bytes(good[:len(good) // 2])
    assert header_problem(tmp_path / "half.jpg") is None
    assert "truncated" in pillow_image_problem(str(tmp_path / "half.jpg"))


def _folder_with(tmp_path, broken: dict[str, bytes]):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            for i in range(2):
                (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
                (tmp_path / split / cls / f"{i}.jpg").write_bytes(_jpeg_bytes(seed=i))
    for rel, data in broken.items():
        (tmp_path / rel).write_bytes(data)
    return tmp_path


def test_an_image_with_a_broken_header_stops_the_listing_or_is_skipped(tmp_path):
    import io
    bad = b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(500)
    root = _folder_with(tmp_path, {"train/a/bad.jpg": bad, "train/b/bad2.jpg": bad})
    with pytest.raises(DataError) as e:
        scan_image_folder(root, "train")
    message = str(e.value)
    assert message.startswith(f"Cannot decode image {root / 'train/a/bad.jpg'} (corrupt")
    assert "--skip_bad_images" in message and "1 more images" in message
    warn = io.StringIO()
    split = scan_image_folder(root, "train", warn=warn, skip_bad=True)
    assert len(split.paths) == 4 and not any("bad" in p for p in split.paths)
    assert "leaving out" in warn.getvalue() and "left out 2 image(s)" in warn.getvalue()
    for f in (root / "train" / "b").glob("[01].jpg"):
        f.write_bytes(bad)  # class b: only files that do not decode
    with pytest.raises(DataError, match=r"Class folder .*train/b holds no readable images"):
        scan_image_folder(root, "train", warn=io.StringIO(), skip_bad=True)


def test_verify_images_decodes_everything_and_skips_or_names_what_fails(tmp_path):
    import io
    half = _jpeg_bytes()[:800]
    root = _folder_with(tmp_path, {"train/b/half.jpg": half})
    split = scan_image_folder(root, "train")  # the header is fine: listed
    assert len(split.paths) == 5
    with pytest.raises(DataError, match=r"Cannot decode image .*half\.jpg \(OSError: image file is "
                                        r"truncated"):
        verify_images(split, pillow_image_problem, skip=False, what="training")
    warn = io.StringIO()
    kept = verify_images(split, pillow_image_problem, skip=True, what="training", warn=warn)
    assert kept.paths == [p for p in split.paths if "half" not in p]
    assert kept.labels.tolist() == [0, 0, 1, 1] and "left out 1 image(s)" in warn.getvalue()
    for f in (root / "train" / "b").glob("[01].jpg"):
        f.write_bytes(half)  # now no image of class b decodes
    with pytest.raises(DataError, match="No image of class 'b'"):
        verify_images(scan_image_folder(root, "train"), pillow_image_problem, skip=True,
                      what="training", warn=io.StringIO())


def readme_cli_block() -> str:
    from pathlib import Path
    text = (Path(__file__).parent.parent / "README.md").read_text()
    start = text.index("```\nusage: python -m bit_<framework>.train") + 4
    return text[start:text.index("```", start)].rstrip()


def test_readme_cli_reference_matches_the_parser():
    assert readme_cli_block() == cli.build_parser("<framework>").format_help().rstrip()


def test_forward_flops_of_r50_match_the_known_4_1_gmacs():
    from bit_common.flops import forward_flops, train_flops
    r50 = registry.parse_arch("R50x1")
    assert forward_flops(r50, 224, 224) / 2 == pytest.approx(4.09e9, rel=0.01)
    assert train_flops(r50, 128, 128) == 3 * forward_flops(r50, 128, 128)
    assert forward_flops(registry.parse_arch("R50x3"), 224, 224) > 8 * forward_flops(r50, 224, 224)


def test_folder_or_digits_source_shared_by_both_pipelines(tmp_path):
    from bit_common.datasets import load_folder_or_digits
    folder = get_dataset("imagefolder")
    for split in ("train", "val"):
        for cls in ("b", "a"):
            _write_image(tmp_path / split / cls / "0.png")
    val = load_folder_or_digits(folder, str(tmp_path), train=False)
    assert val.class_names == ["a", "b"] and val.labels.tolist() == [0, 1]
    (tmp_path / "train" / "c").mkdir()
    _write_image(tmp_path / "train" / "c" / "0.png")
    with pytest.raises(DataError, match="same class folders"):  # val lacks train's class c
        load_folder_or_digits(folder, str(tmp_path), train=False)
    with pytest.raises(DataError, match="needs --datadir"):
        load_folder_or_digits(folder, None, train=True)
    assert len(load_folder_or_digits(get_dataset("digits"), None, train=False)) == 360


# ---- --precision ------------------------------------------------------------------------------
def test_mixed_precision_needs_an_accelerator():
    precision.require_accelerator("fp32", "PyTorch", accelerator=False)  # float32 runs anywhere
    precision.require_accelerator("bf16", "PyTorch", accelerator=True)
    with pytest.raises(BiTError) as e:
        precision.require_accelerator("fp16", "TensorFlow", accelerator=False)
    message = str(e.value)
    assert "--precision fp16 needs a GPU" in message and "TensorFlow" in message
    assert "--precision fp32" in message  # the fix
    assert [p for p in precision.PRECISIONS if precision.needs_loss_scaling(p)] == ["fp16"]


def test_loss_scale_state_round_trips_and_defaults():
    state = precision.loss_scale_state(2.0 ** 12, 37)
    assert precision.read_loss_scale(state) == (2.0 ** 12, 37)
    assert state[precision.LOSS_SCALE].dtype == np.float32
    # A checkpoint written by an fp32 or bf16 run starts fp16 at the schedule's beginning.
    assert precision.read_loss_scale({}) == (precision.LOSS_SCALE_INIT, 0)


def test_contract_batches_pad_short_chunks_to_powers_of_two():
    from bit_common import contract

    seen = []

    def fn(x):
        seen.append(len(x))
        return x.reshape(len(x), -1)[:, :2] * 2

    x = np.arange(11 * 2 * 2 * 3, dtype=np.float32).reshape(11, 2, 2, 3)
    out = contract.run_in_batches(fn, x, 2, batch_size=4, pad=True)
    assert seen == [4, 4, 4]  # 4, 4 and 3 rows run as 4
    np.testing.assert_array_equal(out, x.reshape(11, -1)[:, :2] * 2)
    seen.clear()
    contract.run_in_batches(fn, x[:5], 2, batch_size=64, pad=True)
    contract.run_in_batches(fn, x[:3], 2, batch_size=64)
    assert seen == [8, 3]  # padded to a power of two; unpadded without `pad`
    assert [contract.padded_size(n, 64) for n in (1, 2, 3, 5, 64, 70)] == [1, 2, 4, 8, 64, 64]


def test_contract_batches_dicts_and_gives_the_stage_shapes():
    """`run_dict_in_batches` pads, slices and concatenates every key as `run_in_batches` does its
    one array, gives `shapes` for no images; `feature_shapes` are the README's for 224 px."""
    from bit_common import contract

    seen = []

    def fn(x):
        seen.append(len(x))
        return {"sum": x.sum(axis=(1, 2)), "map": x[:, ::2, ::2, :1] + 1}

    x = np.random.default_rng(0).standard_normal((5, 4, 6, 3)).astype(np.float32)
    out = contract.run_dict_in_batches(fn, x, lambda h, w: {}, batch_size=2, pad=True)
    assert seen == [2, 2, 1]
    np.testing.assert_allclose(out["sum"], x.sum(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(out["map"], x[:, ::2, ::2, :1] + 1)
    seen.clear()
    out = contract.run_dict_in_batches(fn, x[:3], lambda h, w: {}, batch_size=64, pad=True)
    assert seen == [4] and out["map"].shape == (3, 2, 3, 1)  # the padded row is cut off
    empty = contract.run_dict_in_batches(fn, x[:0], lambda h, w: {"map": (h // 2, w // 2, 1)})
    assert {k: v.shape for k, v in empty.items()} == {"map": (0, 2, 3, 1)} and seen == [4]
    with pytest.raises(BiTError, match="Images must be float32 NHWC"):
        contract.run_dict_in_batches(fn, x[0], lambda h, w: {})

    arch = registry.parse_arch("R50x3")
    assert contract.feature_shapes(arch, 224, 224) == {
        "block1": (56, 56, 768), "block2": (28, 28, 1536), "block3": (14, 14, 3072),
        "block4": (7, 7, 6144)}
    assert list(contract.feature_shapes(arch, 33, 47)) == list(contract.STAGES)
    assert [s[:2] for s in contract.feature_shapes(arch, 33, 47).values()] == [
        (9, 12), (5, 6), (3, 3), (2, 2)]
