"""The three train CLIs, run as a user runs them, agree: flags, few-shot subset, learning rates,
losses, weights after a step, and the metrics schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bit_common import checkpoint, cli, trainable
from bit_common.runlog import read_metrics
from parity_tests.frameworks import FRAMEWORKS

ROOT = Path(__file__).resolve().parent.parent


def _command(module: str, flags: tuple[str, ...]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", module, *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)


def train(framework: str, *flags: str) -> subprocess.CompletedProcess:
    """One CLI run to its end; it must succeed."""
    return train_together({framework: flags})[framework]


def train_together(runs: dict[str, tuple[str, ...]], module: str = "bit_{}.train"
                   ) -> dict[str, subprocess.CompletedProcess]:
    """The CLI of each framework with its flags, all at once: a short run is mostly start-up and
    compiling, which keeps one core busy, so the three side by side take little longer than
    one. Each must succeed. `module` ({} the key of `runs`) is what `python -m` runs."""
    procs = {fw: _command(module.format(fw), tuple(flags)) for fw, flags in runs.items()}
    done = {}
    for fw, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        done[fw] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    for fw, proc in done.items():
        assert proc.returncode == 0, f"{fw}: {proc.stderr[-3000:]}"
    return done


def test_help_is_the_same_in_all_three():
    def words(text: str) -> list[str]:  # the usage line wraps by the program name's length
        return text.split()

    reference = words(cli.build_parser("<framework>").format_help())
    for fw in FRAMEWORKS:
        out = train(fw, "--help").stdout
        assert words(out.replace(f"bit_{fw}.train", "bit_<framework>.train")) == reference


def common_flags(logdir: Path, weights: Path, name: str, steps: int, *extra: str,
                 base_lr: float = 0.3) -> list[str]:
    return ["--name", name, "--model", "BiT-M-R50x1", "--logdir", str(logdir),
            "--bit_pretrained_dir", str(weights), "--dataset", "digits",
            "--examples_per_class", "2", "--examples_per_class_seed", "3", "--batch", "8",
            "--resolution", "40", "32", "--no-augment", "--base_lr", str(base_lr), "--workers", "1",
            "--batch_eval", "120", "--steps", str(steps), *extra]


# Every layer trained on whole batches, then `--train block3` (the root, block1 and block2
# frozen) with each batch of 8 as 4 accumulated micro-batches.
VARIANTS = {"all": ("--train", "all"), "block3": ("--train", "block3", "--batch_split", "4")}


@pytest.fixture(scope="module", params=list(VARIANTS))
def three_steps(request, tmp_path_factory, r50_npz):
    """Each CLI trains 3 steps from the same checkpoint on the same few-shot digits.

    Step 1 has lr 0 (warm-up) and the head starts at zero, so step 3 is the first to move the
    backbone.
    """
    logdir = tmp_path_factory.mktemp(f"parity_runs_{request.param}")
    train_together({fw: common_flags(logdir, r50_npz.parent, fw, 3, *VARIANTS[request.param])
                    for fw in FRAMEWORKS})
    return logdir


def _state(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "checkpoint.npz") as f:
        return {k: f[k] for k in f.files if k.startswith(("resnet/", "momentum/"))}


def test_same_few_shot_subset_and_learning_rates(three_steps):
    configs = {fw: json.loads((three_steps / fw / "config.json").read_text()) for fw in FRAMEWORKS}
    subsets = {fw: c["few_shot_indices"] for fw, c in configs.items()}
    assert len(subsets["pytorch"]) == 20 and subsets["pytorch"] == subsets["jax"] == subsets["tf2"]
    lrs = {fw: [r["lr"] for r in read_metrics(three_steps / fw / "metrics.jsonl")
                if r["type"] == "train"] for fw in FRAMEWORKS}
    assert lrs["pytorch"] == lrs["jax"] == lrs["tf2"] and len(lrs["pytorch"]) == 3


def test_same_metrics_schema(three_steps):
    schemas = {fw: sorted({(r["type"], tuple(sorted(r))) for r in
                           read_metrics(three_steps / fw / "metrics.jsonl")}) for fw in FRAMEWORKS}
    assert schemas["pytorch"] == schemas["jax"] == schemas["tf2"]
    assert {t for t, _ in schemas["pytorch"]} == {"train", "eval"}


def _worst_relative(states: dict, keys: list[str]) -> tuple[float, str]:
    """Largest ||a - b|| / ||b|| over `keys` and over every pair of frameworks."""
    worst, where = 0.0, ""
    for key in keys:
        for a, b in (("jax", "pytorch"), ("tf2", "pytorch"), ("jax", "tf2")):
            ref = max(float(np.linalg.norm(states[b][key])), 1e-12)
            rel = float(np.linalg.norm(states[a][key] - states[b][key])) / ref
            if rel > worst:
                worst, where = rel, f"{key} ({a} vs {b})"
    return worst, where


def test_same_weights_and_loss_after_training_steps(three_steps, r50_params, report):
    states = {fw: _state(three_steps / fw) for fw in FRAMEWORKS}
    trains = {json.loads((three_steps / fw / "config.json").read_text())["train"]
              for fw in FRAMEWORKS}
    assert len(trains) == 1
    trained = trains.pop()
    # The same frozen set in all three, --train's: bit-identical to the file, momentum zero.
    frozen = {k for k in r50_params if not trainable.is_trained(k, trained)}
    for fw, state in states.items():
        assert {k for k in r50_params if "/head/" not in k
                and np.array_equal(state[k], r50_params[k])} == frozen, fw
        assert not any(state["momentum/" + k].any() for k in frozen), fw
    first = trainable.first_trained_block(trained)
    key = f"resnet/block{first}/unit01/a/standardized_conv2d/kernel"  # the first trained block
    moved = float(np.abs(states["pytorch"][key] - r50_params[key]).max())
    body = [k for k in states["pytorch"] if k.startswith("resnet/") and "/head/" not in k]
    head = [checkpoint.HEAD_KERNEL, checkpoint.HEAD_BIAS]
    momenta = [k for k in states["pytorch"] if k.startswith("momentum/")]
    (b, b_at), (h, h_at), (m, m_at) = (_worst_relative(states, keys)
                                       for keys in (body, head, momenta))
    report(f"3 CLI steps, --train {trained}, max relative L2 |Δ|: body weights {b:.1e} "
           f"({b_at}), head {h:.1e} ({h_at}), momentum {m:.1e} ({m_at}); body moved by up to "
           f"{moved:.1e}")
    assert moved > 1e-6  # the steps really changed the backbone
    assert b <= 1e-5
    # The zero-initialised head is nothing but its updates, which inherit the float32 difference
    # of the three implementations' embeddings (~2e-5 relative between every pair, so no
    # framework is the odd one out); the momentum holds raw gradients, noisier still.
    assert h <= 1e-4
    assert m <= 5e-2
    losses = {fw: [r["loss"] for r in read_metrics(three_steps / fw / "metrics.jsonl")
                   if r["type"] == "train"] for fw in FRAMEWORKS}
    d = max(abs(a - b) for fw in ("jax", "tf2") for a, b in zip(losses[fw], losses["pytorch"]))
    report(f"3 CLI steps, --train {trained}: max |Δ| loss {d:.2e}")
    assert d <= 1e-4


@pytest.mark.slow
def test_loss_curves_agree_over_ten_steps(tmp_path, r50_npz, report):
    """10 steps at the rule's learning rate, stopped after 5 and resumed.

    The digits have flat backgrounds, so the root max pool sees exact ties, which each framework
    breaks its own way when routing gradients. At the rule's base_lr the curves stay within
    1e-3; at 10x it (0.03) they agree to 1e-5 for 7 steps, then the 20-image few-shot fit
    amplifies the difference ~10x per step (2.6e-2 by step 10, all three pairs alike).
    """
    for steps in (5, 10):
        train_together({fw: common_flags(tmp_path, r50_npz.parent, fw, steps, base_lr=0.003)
                        for fw in FRAMEWORKS})
    curves = {fw: [r["loss"] for r in read_metrics(tmp_path / fw / "metrics.jsonl")
                   if r["type"] == "train"] for fw in FRAMEWORKS}
    assert all(len(c) == 10 for c in curves.values())
    assert curves["pytorch"][-1] < curves["pytorch"][0] - 0.05  # it really learns
    d = max(abs(a - b) for fw in ("jax", "tf2") for a, b in zip(curves[fw], curves["pytorch"]))
    report(f"10 CLI steps (resumed at 5): max |Δ| loss {d:.2e}")
    assert d <= 1e-3


# ---- VTAB-1k: one task of tfds' mock data, fine-tuned and evaluated only ------------------------
VTAB_TASK = "cifar100"  # 32x32 images: mocked and decoded quickly
VTAB_MOCK_EXAMPLES = 48  # in each split (train800val200 and test)
VTAB_EVALUATED = f"vtab/BiT-M-R50x1-run0-{VTAB_TASK}"


def _vtab_flags(logdir: Path, weights: Path, name: str, model: str, steps: int) -> list[str]:
    """Random crops and flips on (cifar100 allows both), so the batches follow the shared plan;
    a 10-step schedule, so that steps 2 and 3 move the head (warm-up 2 steps), at a rate that
    keeps the logits small (at 0.3 the evaluation's loss is 22 and its top-5 ranks near ties)."""
    return ["--name", name, "--model", model, "--logdir", str(logdir),
            "--bit_pretrained_dir", str(weights), "--dataset", f"vtab/{VTAB_TASK}",
            "--batch", "8", "--resolution", "40", "32", "--base_lr", "0.01", "--workers", "0",
            "--batch_eval", "48", "--schedule_steps", "10", "--steps", str(steps)]


@pytest.fixture(scope="module")
def vtab_runs(tmp_path_factory, r50_npz):
    """Each CLI trains 3 steps of vtab/cifar100 from `r50_npz`, and, side by side, evaluates a
    100-class checkpoint with its own head (--steps 0), all on the same mock data."""
    from bit_common import vtab

    logdir, weights = tmp_path_factory.mktemp("vtab_runs"), tmp_path_factory.mktemp("vtab_w")
    (weights / r50_npz.name).symlink_to(r50_npz)
    checkpoint.write_random_checkpoint(weights / f"{VTAB_EVALUATED}.npz", "R50x1",
                                       vtab.get_task(VTAB_TASK).num_classes, seed=1)
    runs = {}
    for fw in FRAMEWORKS:
        runs[fw] = (fw, str(VTAB_MOCK_EXAMPLES), str(logdir / f"{fw}-first-batch.npz"),
                    *_vtab_flags(logdir, weights, f"{fw}-train", "BiT-M-R50x1", 3))
        runs[f"{fw}-eval"] = (fw, str(VTAB_MOCK_EXAMPLES), "",
                              *_vtab_flags(logdir, weights, f"{fw}-eval", VTAB_EVALUATED, 0))
    train_together(runs, module="parity_tests.mocked_vtab_cli")
    return logdir


def _evals(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "eval"]


@pytest.mark.slow  # six CLIs side by side: about 5 minutes on 2 cores
def test_vtab_task_same_first_batch_in_the_three_clis(vtab_runs, report):
    batches = {fw: dict(np.load(vtab_runs / f"{fw}-first-batch.npz")) for fw in FRAMEWORKS}
    ref = batches["pytorch"]
    assert ref["image"].shape == (8, 32, 32, 3) and int(ref["step"]) == 0
    assert len(set(ref["label"].tolist())) > 1  # the mock's labels, not one constant
    worst = 0.0
    for fw in ("jax", "tf2"):
        np.testing.assert_array_equal(batches[fw]["label"], ref["label"])
        # The shared pipelines' float32 resize arithmetic (test_parity_pipelines.py's tolerance).
        np.testing.assert_allclose(batches[fw]["image"], ref["image"], atol=2e-4)
        worst = max(worst, float(np.abs(batches[fw]["image"] - ref["image"]).max()))
    report(f"vtab/{VTAB_TASK} first CLI batch: labels equal, max |Δ| pixel {worst:.1e}")


@pytest.mark.slow  # six CLIs side by side: about 5 minutes on 2 cores
def test_vtab_task_same_training_and_eval_top1_in_the_three_clis(vtab_runs, report):
    configs = {fw: json.loads((vtab_runs / f"{fw}-train" / "config.json").read_text())
               for fw in FRAMEWORKS}
    assert {(c["num_classes"], c["num_train_examples"], c["crop"]) for c in configs.values()} \
        == {(100, VTAB_MOCK_EXAMPLES, 32)}
    states = {fw: _state(vtab_runs / f"{fw}-train") for fw in FRAMEWORKS}
    head = [checkpoint.HEAD_KERNEL, checkpoint.HEAD_BIAS]
    h, h_at = _worst_relative(states, head + ["momentum/" + k for k in head])
    evals = {fw: _evals(vtab_runs / f"{fw}-train") for fw in FRAMEWORKS}
    assert all([e["step"] for e in ev] == [3] for ev in evals.values())
    losses = {fw: [r["loss"] for r in read_metrics(vtab_runs / f"{fw}-train" / "metrics.jsonl")
                   if r["type"] == "train"] for fw in FRAMEWORKS}
    d = max(abs(a - b) for fw in ("jax", "tf2") for a, b in zip(losses[fw], losses["pytorch"]))
    e = max(abs(evals[fw][0]["loss"] / evals["pytorch"][0]["loss"] - 1) for fw in ("jax", "tf2"))
    report(f"vtab/{VTAB_TASK}, 3 CLI steps: head and its momentum max relative L2 |Δ| {h:.1e} "
           f"({h_at}), max |Δ| loss {d:.1e}; eval top-1 {evals['pytorch'][0]['top1']:.3f}, "
           f"eval loss relative |Δ| {e:.1e}")
    assert losses["pytorch"][2] != losses["pytorch"][0]  # the head moved before step 3
    assert h <= 1e-4 and d <= 1e-4 and e <= 1e-4  # as the digits runs above
    assert evals["pytorch"][0]["top1"] == evals["jax"][0]["top1"] == evals["tf2"][0]["top1"]


@pytest.mark.slow  # six CLIs side by side: about 5 minutes on 2 cores
def test_vtab_steps_0_scores_the_checkpoints_own_head_alike_in_the_three_clis(vtab_runs, report):
    import math

    evals = {fw: _evals(vtab_runs / f"{fw}-eval") for fw in FRAMEWORKS}
    assert all([e["step"] for e in ev] == [0] for ev in evals.values())
    ref = evals["pytorch"][0]
    assert abs(ref["loss"] - math.log(100)) > 0.01  # the file's own head, not a zero one
    for fw in ("jax", "tf2"):
        assert (evals[fw][0]["top1"], evals[fw][0]["top5"]) == (ref["top1"], ref["top5"]), fw
        assert evals[fw][0]["loss"] == pytest.approx(ref["loss"], rel=1e-5), fw
    d = max(abs(evals[fw][0]["loss"] - ref["loss"]) for fw in ("jax", "tf2"))
    report(f"vtab/{VTAB_TASK} --steps 0: top-1 {ref['top1']:.3f} in all three, max |Δ| loss "
           f"{d:.1e}")
    for fw in FRAMEWORKS:
        run_dir = vtab_runs / f"{fw}-eval"
        assert json.loads((run_dir / "config.json").read_text())["model"] == VTAB_EVALUATED
        assert not (run_dir / "checkpoint.npz").exists() and not (run_dir / "model.npz").exists()
