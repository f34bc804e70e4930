"""`--dataset vtab/<task>`: the VTAB-1k data path of the three frameworks, offline.

tfds' `mock_data` stands in for the prepared datasets behind the real builders (names, versions
and split strings of bit_common.vtab): random examples from each builder's own feature spec
(`MockPolicy.USE_CODE`, no metadata files), and for clevr hand-made scenes, since random object
lists would give counts outside 3..10.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
torch = pytest.importorskip("torch")

from bit_common import checkpoint, cli, loop, tfds_source, vtab  # noqa: E402
from bit_common.datasets import get_dataset  # noqa: E402
from bit_common.errors import BiTError, DataError  # noqa: E402
from bit_common.plan import InputPlan  # noqa: E402
from bit_common.registry import parse_arch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
N = 1000  # VTAB-1k's train800val200
CLEVR_TEST = 50
TASKS = ("cifar100", "clevr-count", "dsprites-orientation")
TOL = 2e-4  # parity_tests/test_parity_pipelines.py: the pipelines' float32 resize arithmetic
PARAMS = checkpoint.random_params(parse_arch("R50x1"), 2, seed=0)


# ---- mocked tfds datasets ---------------------------------------------------------------------
CLEVR_SPLITS: list[str] = []  # the split strings the clevr builder was asked for


def _clevr_scene(i: int) -> dict:
    """3 + i % 8 objects (label i % 8); the first image is large (the rule's 512/480), the
    others of three small sizes (kept as an object array)."""
    rng = np.random.default_rng(i)
    k = 3 + i % 8
    hw = (100, 100) if i == 0 else (20 + i % 3, 30)
    return {"image": rng.integers(0, 256, hw + (3,), dtype=np.uint8),
            "objects": {"size": rng.integers(0, 2, k), "pixel_coords":
                        rng.uniform(0, 20, (k, 3)).astype(np.float32)}}


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


def _clevr_as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    """The scenes as tfds' clevr gives them: the image encoded (PNG) where it is not decoded."""
    CLEVR_SPLITS.append(str(split))
    n = CLEVR_TEST if "validation" in str(split) else N
    encoded = bool(decoders and "image" in decoders)

    def scenes():
        for i in range(n):
            scene = _clevr_scene(i)
            yield {**scene, "image": _png(scene["image"])} if encoded else scene
    image = tf.TensorSpec([], tf.string) if encoded else tf.TensorSpec([None, None, 3], tf.uint8)
    return tf.data.Dataset.from_generator(
        scenes, output_signature={"image": image, "objects": {
            "size": tf.TensorSpec([None], tf.int64),
            "pixel_coords": tf.TensorSpec([None, 3], tf.float32)}})


def mocked(task: str):
    if task == "clevr-count":
        return tfds.testing.mock_data(as_dataset_fn=_clevr_as_dataset)
    return tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_CODE)


def expected(task: str, split: str = "train800val200") -> tuple[np.ndarray, np.ndarray]:
    """Labels and first image of a mocked split, worked out here independently (the images as
    tfds itself decodes them)."""
    if task == "clevr-count":
        first = _clevr_scene(0)["image"]
        return np.arange(N if split == "train800val200" else CLEVR_TEST) % 8, first
    t = vtab.get_task(task)
    with mocked(task):
        examples = list(tfds.as_numpy(tfds.builder(t.tfds_name).as_dataset(
            split=t.split(split), shuffle_files=False)))
    if task == "cifar100":
        return np.array([ex["label"] for ex in examples]), examples[0]["image"]
    # dsprites: orientation index 0..39 in 16 classes of 2.5; 0/1 pixels scaled by 255.
    labels = np.array([2 * int(ex["label_orientation"]) // 5 for ex in examples])
    return labels, np.repeat(examples[0]["image"], 3, axis=-1) * np.uint8(255)


def framework(name: str) -> loop.Framework:
    import importlib
    return importlib.import_module(f"bit_{name}.train").FRAMEWORK


def make_setup(task: str, fw: str, *flags: str) -> loop.RunSetup:
    args = cli.build_parser(fw).parse_args(
        ["--name", "t", "--model", "BiT-M-R50x1", "--logdir", "unused", "--dataset",
         f"vtab/{task}", "--batch", "16", "--workers", "0", *flags])
    classes = vtab.get_task(task).num_classes
    params = {**PARAMS, checkpoint.HEAD_KERNEL: np.zeros((1, 1, 2048, classes), np.float32),
              checkpoint.HEAD_BIAS: np.zeros(classes, np.float32)}
    with mocked(task):
        return loop.make_setup(args, framework(fw), params=params)


@pytest.fixture(scope="module")
def setups():
    """(task, framework) -> its set-up at --resolution 40 32, made once."""
    cache: dict[tuple[str, str], loop.RunSetup] = {}

    def get(task: str, fw: str) -> loop.RunSetup:
        if (task, fw) not in cache:
            cache[task, fw] = make_setup(task, fw, "--resolution", "40", "32")
        return cache[task, fw]
    return get


# ---- the registry and the plan ------------------------------------------------------------------
def test_vtab_datasets_train_on_train800val200_and_evaluate_on_test():
    for name, task in vtab.TASKS.items():
        info = get_dataset(f"vtab/{name}")
        assert (info.num_classes, info.tfds_name, info.vtab) == (task.num_classes,
                                                                 task.tfds_name, task)
        assert info.train_split == f"{task.train800}+{task.val200}"
        assert info.eval_split == task.test and info.image_hw is None
        assert (info.flip_keeps_label, info.crop_keeps_label) == (task.flip_keeps_label,
                                                                  task.crop_keeps_label)
    assert get_dataset("vtab/clevr-count").train_split == "train[:800]+train[63000:63200]"


def test_every_task_names_a_builder_and_version_the_installed_tfds_has(tmp_path):
    """Building the builder object reads no data; a version tfds dropped fails here."""
    for task in vtab.TASKS.values():
        builder = tfds.builder(task.tfds_name, data_dir=str(tmp_path))
        assert task.image_key in builder.info.features, task.name


def test_unknown_vtab_task_suggests_the_closest_and_lists_all():
    with pytest.raises(DataError, match="Did you mean: clevr-count") as e:
        get_dataset("vtab/clevr-cnt")
    assert all(name in str(e.value) for name in vtab.TASKS)
    with pytest.raises(BiTError, match="vtab/<task>"):
        get_dataset("vtab-dtd")


def test_plan_leaves_out_only_the_augmentation_a_task_forbids():
    full = InputPlan(100, 64, 40, 32, seed=3)
    no_flip = InputPlan(100, 64, 40, 32, seed=3, random_flip=False)
    no_crop = InputPlan(100, 64, 40, 32, seed=3, random_crop=False)
    a, b, c = (p.batch_plan(5) for p in (full, no_flip, no_crop))
    assert a.flips.any() and a.offsets.any() and full.train_size == (40, 32)
    assert not b.flips.any() and np.array_equal(b.offsets, a.offsets)
    assert not c.offsets.any() and np.array_equal(c.flips, a.flips)
    assert no_crop.train_size == (32, 32) and no_flip.train_size == (40, 32)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.indices, c.indices)


# ---- the splits each framework loads ------------------------------------------------------------
@pytest.mark.parametrize("fw", ["pytorch", "jax", "tf2"])
@pytest.mark.parametrize("task", TASKS)
def test_setup_reads_the_task_through_its_real_builder(setups, task, fw):
    setup = setups(task, fw)
    t = vtab.get_task(task)
    labels, first = expected(task)
    assert len(setup.train) == N and setup.num_classes == t.num_classes
    np.testing.assert_array_equal(setup.train.labels, labels)
    np.testing.assert_array_equal(setup.train.images[0], first)
    labels, first = expected(task, "test")
    np.testing.assert_array_equal(setup.eval.labels, labels)  # kept encoded, decoded on demand
    assert setup.eval.images is None and setup.eval.encoded.dtype == object
    np.testing.assert_array_equal(setup.eval.image(0), first)
    assert (setup.plan.random_flip, setup.plan.random_crop) == (t.flip_keeps_label,
                                                                t.crop_keeps_label)
    flips = np.concatenate([setup.plan.batch_plan(s).flips for s in range(4)])
    assert flips.any() == t.flip_keeps_label
    assert setup.plan.train_size == ((40, 32) if t.crop_keeps_label else (32, 32))


def test_clevr_reads_the_task_split_strings_and_keeps_images_of_any_size(setups):
    CLEVR_SPLITS.clear()
    setup = make_setup("clevr-count", "pytorch")  # the rule's resolution, from the first image
    assert CLEVR_SPLITS == ["train[:800]+train[63000:63200]", "validation"]
    assert setup.train.images.dtype == object and setup.train.images[1].shape == (21, 30, 3)
    assert (setup.resize, setup.crop) == (512, 480)  # 100x100: not under 96x96
    assert setup.end_step == 500  # BiT-HyperRule for 1000 examples
    again = pickle.loads(pickle.dumps(setup.eval))  # as DataLoader workers receive it
    np.testing.assert_array_equal(again.image(7), setup.eval.image(7))


@pytest.mark.parametrize("task", TASKS)
def test_pytorch_and_tfdata_train_on_the_same_first_batch(setups, task):
    from bit_pytorch import data as torch_data
    from bit_tfdata import pipeline

    pt, tfd = setups(task, "pytorch"), setups(task, "tf2")
    batch = next(torch_data.train_batches(pt.train, pt.train_indices, pt.plan, 0, 1,
                                          range(pt.plan.batch), workers=0))
    ref = next(pipeline.batches(pipeline.train_dataset(tfd, 0)))
    np.testing.assert_array_equal(batch.labels.numpy(), ref["label"])
    np.testing.assert_allclose(batch.images.permute(0, 2, 3, 1).numpy(), ref["image"], atol=TOL)
    evals = next(pipeline.batches(pipeline.eval_dataset(tfd, 8)))
    images, labels = next(torch_data.eval_batches(pt.eval, pt.crop, 8, range(8), workers=0))
    np.testing.assert_array_equal(labels.numpy(), evals["label"])
    np.testing.assert_allclose(images.permute(0, 2, 3, 1).numpy(), evals["image"], atol=TOL)


def test_an_evaluation_split_too_large_for_memory_is_a_data_error(monkeypatch):
    monkeypatch.setattr(tfds_source, "IN_MEMORY_BYTES", 20_000)  # cifar100: ~3 kB a PNG
    with mocked("cifar100"), pytest.raises(DataError, match="BIT_TFDS_IN_MEMORY_BYTES"):
        tfds_source.load_vtab_splits(vtab.get_task("cifar100"), None)


# ---- datasets that are not prepared ---------------------------------------------------------
@pytest.mark.parametrize("task,manual", [("dtd", False), ("diabetic_retinopathy", True)])
def test_unprepared_dataset_says_how_to_prepare_it(tmp_path, task, manual):
    with pytest.raises(DataError, match="is not prepared") as e:
        tfds_source.load_vtab_splits(vtab.get_task(task), str(tmp_path))
    message = str(e.value)
    name = task if task == "dtd" else "diabetic_retinopathy_detection/btgraham-300"
    assert f"`tfds build {name}:" in message and "--datadir" in message
    assert ("--manual_dir" in message) == manual
    assert list(tmp_path.iterdir()) == []


def _cli(module: str, tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, "--name", "v", "--model", "BiT-M-R50x1", "--logdir",
         str(tmp_path / "logs"), *argv], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_cli_bad_vtab_input_is_one_message_and_exit_2(tmp_path, r50_npz):
    proc = _cli("bit_tf2.train", tmp_path, "--dataset", "vtab/clevr-cnt")
    assert proc.returncode == 2 and proc.stderr.startswith(
        "error: Unknown VTAB-1k task 'clevr-cnt'. Did you mean: clevr-count,")
    assert all(name in proc.stderr for name in vtab.TASKS) and len(proc.stderr.splitlines()) == 1
    empty = tmp_path / "tfds"
    empty.mkdir()
    proc = _cli("bit_pytorch.train", tmp_path, "--dataset", "vtab/dtd", "--datadir", str(empty),
                "--bit_pretrained_dir", str(r50_npz.parent))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: VTAB-1k task dtd reads tfds dataset")
    assert "tfds build dtd:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "logs" / "v").exists() and list(empty.iterdir()) == []  # no run folder
