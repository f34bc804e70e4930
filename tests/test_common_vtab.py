"""bit_common.vtab: the 19 VTAB-1k tasks (labels, splits, groups, names) on hand-made examples."""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import numpy as np
import pytest

from bit_common import registry, vtab
from bit_common.errors import BiTError, DataError

# The tasks of the released fine-tuned files, in VTAB's order (natural, specialized, structured).
RELEASED = ("caltech101", "cifar100", "dtd", "oxford_flowers102", "oxford_iiit_pet", "sun397",
            "svhn", "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
            "clevr-count", "clevr-distance", "dmlab", "kitti-distance", "dsprites-xpos",
            "dsprites-orientation", "smallnorb-azimuth", "smallnorb-elevation")


def label(task: str, example: dict) -> int:
    return vtab.get_task(task).label(example)


# ---- names and groups -------------------------------------------------------------------
def test_tasks_are_those_of_the_released_checkpoints():
    assert tuple(vtab.TASKS) == RELEASED
    released = {}
    for name, info in registry.all_models().items():
        if info.kind == "vtab":
            task = re.fullmatch(r"vtab/BiT-M-R\d+x\d-run[012]-(.+)", name).group(1)
            released.setdefault(task, set()).add(info.num_classes)
    assert set(released) == set(RELEASED)
    assert {t: {vtab.TASKS[t].num_classes} for t in RELEASED} == released
    with pytest.raises(dataclasses.FrozenInstanceError):
        vtab.TASKS["dtd"].num_classes = 3


def test_groups_have_7_natural_4_specialized_8_structured_tasks():
    by_group = {g: [n for n, t in vtab.TASKS.items() if t.group == g] for g in vtab.GROUPS}
    assert by_group == {"natural": list(RELEASED[:7]), "specialized": list(RELEASED[7:11]),
                        "structured": list(RELEASED[11:])}


# ---- labels -----------------------------------------------------------------------------
def clevr(z: list[float]) -> dict:
    """A CLEVR example with one object per depth in `z` (pixel_coords x, y, z)."""
    return {"image": np.zeros((4, 4, 3), np.uint8),
            "objects": {"size": np.zeros(len(z), np.int64),
                        "pixel_coords": np.array([[50.0, 60.0, d] for d in z], np.float32)}}


@pytest.mark.parametrize("objects, expected", [(3, 0), (5, 2), (10, 7)])
def test_clevr_count_is_the_number_of_objects_minus_3(objects, expected):
    assert label("clevr-count", clevr([10.0] * objects)) == expected


@pytest.mark.parametrize("objects", [2, 11])
def test_clevr_count_outside_3_to_10_objects_is_an_error(objects):
    with pytest.raises(DataError, match=r"clevr-count: this example gives label -?\d+, outside "
                                        r"0\.\.7"):
        label("clevr-count", clevr([10.0] * objects))


# Bins (0, 8], (8, 8.5], (8.5, 9], (9, 9.5], (9.5, 10], (10, 100]: an edge belongs to the bin below.
@pytest.mark.parametrize("depth, expected", [
    (7.0, 0), (8.0, 0), (np.nextafter(np.float32(8.0), np.float32(9.0)), 1), (8.5, 1), (8.75, 2),
    (9.0, 2), (9.25, 3), (9.5, 3), (10.0, 4), (np.nextafter(np.float32(10.0), np.float32(11.0)), 5),
    (99.0, 5)])
def test_clevr_distance_bins_at_the_edges(depth, expected):
    assert label("clevr-distance", clevr([depth])) == expected


def test_clevr_distance_takes_the_closest_object():
    assert label("clevr-distance", clevr([12.0, 8.25, 9.7])) == 1
    for depth in (0.0, 150.0):  # outside task_adaptation's bins: no class
        with pytest.raises(DataError, match="clevr-distance: this example gives label"):
            label("clevr-distance", clevr([depth]))
    with pytest.raises(DataError, match=r"clevr-distance cannot derive a label .*clevr:3"):
        label("clevr-distance", clevr([]))


def kitti(objects: list[tuple[int, float]]) -> dict:
    """A KITTI example with objects of (type, depth): 0-2 Car/Van/Truck, 3 Pedestrian, 5 Cyclist."""
    return {"objects": {"type": np.array([t for t, _ in objects], np.int64),
                        "location": np.array([[1.0, 1.5, z] for _, z in objects],
                                             np.float32).reshape(-1, 3)}}


# Bins (-100, 8], (8, 20], (20, 999] and 3 for no car, van or truck.
@pytest.mark.parametrize("objects, expected", [
    ([(0, 8.0)], 0), ([(1, 8.5)], 1), ([(2, 20.0)], 1), ([(0, 20.5)], 2), ([(0, 999.0)], 2),
    ([(3, 30.0), (0, 4.0), (1, 15.0)], 0), ([(3, 2.0), (0, 30.0), (1, 15.0)], 1),
    ([(3, 5.0), (5, 4.0)], 3), ([], 3)])
def test_kitti_distance_bins_the_closest_vehicle(objects, expected):
    assert label("kitti-distance", kitti(objects)) == expected


def test_dsprites_x_position_in_16_bins_of_two_positions():
    # value_x_position 0, 0.5 and 1 are label_x_position 0, between 15 and 16, and 31.
    for position, expected in [(0, 0), (1, 0), (2, 1), (15, 7), (16, 8), (30, 15), (31, 15)]:
        assert label("dsprites-xpos", {"label_x_position": position}) == expected
    classes = [label("dsprites-xpos", {"label_x_position": k}) for k in range(32)]
    assert np.bincount(classes).tolist() == [2] * 16


def test_dsprites_orientation_in_16_bins_of_40_angles():
    for angle, expected in [(0, 0), (2, 0), (3, 1), (5, 2), (37, 14), (38, 15), (39, 15)]:
        assert label("dsprites-orientation", {"label_orientation": angle}) == expected
    classes = [label("dsprites-orientation", {"label_orientation": k}) for k in range(40)]
    assert np.bincount(classes).tolist() == [3, 2] * 8  # floor(k / 2.5)
    with pytest.raises(DataError, match="outside 0..15"):
        label("dsprites-orientation", {"label_orientation": 40})


def test_smallnorb_azimuth_and_elevation_read_their_own_key():
    example = {"label_azimuth": 17, "label_elevation": 3, "label_category": 4}
    assert label("smallnorb-azimuth", example) == 17
    assert label("smallnorb-elevation", example) == 3
    with pytest.raises(DataError, match="outside 0..17"):
        label("smallnorb-azimuth", {"label_azimuth": 18})
    with pytest.raises(DataError, match="outside 0..8"):
        label("smallnorb-elevation", {"label_elevation": 9})


@pytest.mark.parametrize("task", [n for n, t in vtab.TASKS.items() if t.group != "structured"]
                         + ["dmlab"])
def test_the_other_tasks_take_the_dataset_label(task):
    top = vtab.TASKS[task].num_classes - 1
    assert label(task, {"label": np.int64(top), "image": np.zeros((2, 2, 3), np.uint8)}) == top
    with pytest.raises(DataError, match=rf"{task}: this example gives label {top + 1}"):
        label(task, {"label": top + 1})


def test_an_example_of_another_dataset_is_an_error_naming_the_builder():
    with pytest.raises(DataError, match=r"clevr-count cannot derive .*KeyError.*'objects'.*clevr:"):
        label("clevr-count", {"label": 1})
    with pytest.raises(DataError, match=r"kitti-distance cannot derive .*kitti:3\.1\.0"):
        label("kitti-distance", clevr([9.0]))


def test_images_come_out_as_uint8_rgb():
    sprite = np.array([[0, 1], [1, 0]], np.uint8)[..., None]
    img = vtab.TASKS["dsprites-xpos"].image({"image": sprite})
    assert img.dtype == np.uint8 and img.shape == (2, 2, 3)
    assert (img == sprite * 255).all()
    norb = np.array([[3, 200], [0, 17]], np.uint8)[..., None]
    assert (vtab.TASKS["smallnorb-azimuth"].image({"image": norb}) == norb).all()
    rgb = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert (vtab.TASKS["cifar100"].image({"image": rgb}) == rgb).all()
    with pytest.raises(DataError, match=r"cifar100: image of shape \(2, 2, 2\)"):
        vtab.TASKS["cifar100"].image({"image": rgb[..., :2]})
    with pytest.raises(DataError, match="dtd: the example has no 'image' image"):
        vtab.TASKS["dtd"].image({"label": 0})


# ---- splits -----------------------------------------------------------------------------
_SLICE = re.compile(r"([a-z]+)(?:\[(\d*):(\d*)\])?")


def ranges(spec: str, sizes: dict[str, int]) -> list[tuple[str, int, int]]:
    """(split, start, stop) of each `+` part of a tfds split string of absolute slices."""
    out = []
    for part in spec.split("+"):
        split, start, stop = _SLICE.fullmatch(part).groups()
        start, stop = int(start or 0), int(stop or sizes[split])
        assert 0 <= start < stop <= sizes[split], (spec, sizes)
        out.append((split, start, stop))
    return out


@pytest.mark.parametrize("name", RELEASED)
def test_splits_take_800_and_200_examples_apart_from_test(name):
    task = vtab.TASKS[name]
    train, val, test = (ranges(task.split(s), task.split_sizes)
                        for s in ("train800", "val200", "test"))
    assert task.split("train800") == "train[:800]"
    assert sum(b - a for _, a, b in train) == 800
    assert sum(b - a for _, a, b in val) == 200
    both = task.split("train800val200")
    assert both == f"{task.split('train800')}+{task.split('val200')}"
    assert ranges(both, task.split_sizes) == train + val
    parts = train + val + test
    for i, (split, a, b) in enumerate(parts):  # no example in two of them
        for other, c, d in parts[i + 1:]:
            assert split != other or b <= c or d <= a, (name, parts)


# What task_adaptation's "train" takes of tfds' train (its "val" follows): val200 starts there.
TRAIN_PERCENT = {"caltech101": 90, "cifar100": 90, "oxford_iiit_pet": 80, "svhn": 90,
                 "eurosat": 60, "resisc45": 60, "clevr-count": 90, "clevr-distance": 90,
                 "dsprites-xpos": 80, "dsprites-orientation": 80}
VAL_PERCENT = {"eurosat": 20, "resisc45": 20, "dsprites-xpos": 10, "dsprites-orientation": 10}


@pytest.mark.parametrize("name", RELEASED)
def test_slice_boundaries_are_task_adaptations_arithmetic(name):
    task = vtab.TASKS[name]
    if name in TRAIN_PERCENT:
        n = task.split_sizes["train"]
        start = TRAIN_PERCENT[name] * n // 100
        assert task.val200 == f"train[{start}:{start + 200}]"
        if name in VAL_PERCENT:  # test is the rest of the one train split
            assert task.test == f"train[{start + VAL_PERCENT[name] * n // 100}:]"
    elif name.startswith("smallnorb"):  # val is test[:50%], test is test[50%:]
        assert (task.val200, task.test) == ("test[:200]", f"test[{task.split_sizes['test'] // 2}:]")
    else:
        assert task.val200 == "validation[:200]" and "validation" in task.split_sizes


def test_tfds_reads_the_split_strings_as_we_do():
    splits = pytest.importorskip("tensorflow_datasets.core.splits")  # optional: no tf import

    def absolute(spec, sizes):
        infos = {k: SimpleNamespace(num_examples=v) for k, v in sizes.items()}
        return [(i.splitname, i.from_ or 0, sizes[i.splitname] if i.to is None else i.to)
                for i in splits.ReadInstruction.from_spec(spec).to_absolute(infos)]

    for task in vtab.TASKS.values():
        for name in vtab.SPLITS:
            spec = task.split(name)
            assert absolute(spec, task.split_sizes) == ranges(spec, task.split_sizes), spec
    norb = vtab.TASKS["smallnorb-azimuth"]  # task_adaptation writes its test split in percent
    assert absolute("test[50%:]", norb.split_sizes) == absolute(norb.test, norb.split_sizes)


# ---- look-ups and summaries -------------------------------------------------------------
def test_unknown_task_lists_all_19_and_the_closest():
    with pytest.raises(DataError, match=r"Unknown VTAB-1k task 'clevr_count'\. Did you mean: "
                                        r"clevr-count") as e:
        vtab.get_task("clevr_count")
    assert isinstance(e.value, BiTError)
    assert all(name in str(e.value) for name in RELEASED)
    with pytest.raises(DataError, match="Did you mean: kitti-distance"):
        vtab.get_task("kitti")
    with pytest.raises(DataError, match="dtd has splits train800, val200, train800val200, test, "
                                        "not 'val'"):
        vtab.TASKS["dtd"].split("val")


def test_group_means_weigh_every_task_the_same_and_need_whole_groups():
    top1 = {name: float(i) for i, name in enumerate(RELEASED)}
    assert vtab.group_means(top1) == {"natural": 3.0, "specialized": 8.5, "structured": 14.5,
                                      "mean": 9.0}
    uneven = {n: {"natural": 1.0, "specialized": 0.0, "structured": 0.5}[t.group]
              for n, t in vtab.TASKS.items()}
    assert vtab.group_means(uneven)["mean"] == pytest.approx(11 / 19)  # not 0.5 (of the groups)
    del top1["dmlab"]
    assert vtab.group_means(top1) == {"natural": 3.0, "specialized": 8.5}
    assert vtab.group_means({}) == {}
    with pytest.raises(DataError, match="Unknown VTAB-1k task 'imagenet'"):
        vtab.group_means({"imagenet": 80.0})
