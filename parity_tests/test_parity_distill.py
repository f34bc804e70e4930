"""The three distill CLIs, run as a user runs them, agree: the same augmented pairs, learning
rates, KL losses, student and Adam state after the same steps, and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bit_common import checkpoint, distill
from bit_common.registry import parse_arch
from bit_common.runlog import read_metrics
from parity_tests.frameworks import FRAMEWORKS
from parity_tests.test_parity_cli import _worst_relative, train_together

STEPS = 3


def distill_flags(logdir: Path, teacher: Path, name: str, *extra: str) -> list[str]:
    """A random 10-way R50x1 teacher into a R50x1 from scratch on digits: the student at 32 px,
    the teacher at 48 px from the same crop boxes, inception crops, flips and mixup on."""
    return ["--name", name, "--teacher", str(teacher), "--student", "R50x1",
            "--logdir", str(logdir), "--dataset", "digits", "--batch", "8",
            "--resolution", "32", "--teacher_resolution", "48", "--warmup_steps", "1",
            "--schedule_steps", "20", "--steps", str(STEPS), "--base_lr", "0.01",
            "--workers", "1", "--batch_eval", "120", *extra]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, r50_npz):
    logdir = tmp_path_factory.mktemp("parity_distill")
    train_together({fw: distill_flags(logdir, r50_npz, fw) for fw in FRAMEWORKS},
                   module="bit_{}.distill")
    return logdir


def _state(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "checkpoint.npz") as f:
        return {k: f[k] for k in f.files if k.startswith(("resnet/", "adam/"))}


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == kind]


def test_same_learning_rates_losses_and_schema(distilled, report):
    trains = {fw: _records(distilled / fw, "train") for fw in FRAMEWORKS}
    lrs = {fw: [r["lr"] for r in t] for fw, t in trains.items()}
    assert lrs["pytorch"] == lrs["jax"] == lrs["tf2"] and len(lrs["pytorch"]) == STEPS
    assert lrs["pytorch"][0] == 0.0 and lrs["pytorch"][1] == pytest.approx(0.01)
    losses = {fw: [r["loss"] for r in t] for fw, t in trains.items()}
    d = max(abs(a - b) for fw in ("jax", "tf2") for a, b in zip(losses[fw], losses["pytorch"]))
    report(f"{STEPS} distill CLI steps: KL losses {losses['pytorch']}, max |Δ| {d:.2e}")
    assert d <= 1e-4 * max(1.0, max(losses["pytorch"]))
    schemas = {fw: sorted({(r["type"], tuple(sorted(r)))
                           for r in read_metrics(distilled / fw / "metrics.jsonl")})
               for fw in FRAMEWORKS}
    assert schemas["pytorch"] == schemas["jax"] == schemas["tf2"]
    configs = {fw: json.loads((distilled / fw / "config.json").read_text()) for fw in FRAMEWORKS}
    assert {c["command"] for c in configs.values()} == {"distill"}


def test_same_student_and_adam_state_after_the_steps(distilled, report):
    states = {fw: _state(distilled / fw) for fw in FRAMEWORKS}
    assert all(int(s[distill.ADAM_COUNT]) == STEPS for s in states.values())
    start = distill.initial_params(parse_arch("R50x1"), 10, seed=0)  # --student R50x1, --seed 0
    body = [k for k in start if "/head/" not in k]
    head = [checkpoint.HEAD_KERNEL, checkpoint.HEAD_BIAS]
    moved = max(float(np.abs(states["pytorch"][k] - start[k]).max()) for k in body)
    mu = [distill.ADAM_MU + k for k in start]
    nu = [distill.ADAM_NU + k for k in start]
    (b, b_at), (h, h_at), (m, m_at), (v, v_at) = (_worst_relative(states, keys)
                                                  for keys in (body, head, mu, nu))
    report(f"{STEPS} distill CLI steps, max relative L2 |Δ|: body {b:.1e} ({b_at}), head "
           f"{h:.1e} ({h_at}), Adam mu {m:.1e} ({m_at}), nu {v:.1e} ({v_at}); body moved by up "
           f"to {moved:.1e}")
    assert moved > 1e-4  # the steps really trained the body (the head was zero at step 1)
    assert b <= 1e-4 and h <= 1e-3
    assert m <= 5e-2 and v <= 5e-2


def test_same_evaluation(distilled, report):
    evals = {fw: _records(distilled / fw, "eval")[-1] for fw in FRAMEWORKS}
    keys = ("top1", "top5", "agree_top1", "agree_top5", "teacher_top1")
    worst = max(abs(evals[fw][k] - evals["pytorch"][k]) for fw in ("jax", "tf2") for k in keys)
    kl = max(abs(evals[fw]["kl"] - evals["pytorch"]["kl"]) for fw in ("jax", "tf2"))
    report(f"distill eval on 360 digits: max |Δ| of top-1/top-5/agreement {worst:.4f}, "
           f"KL {kl:.2e} (pytorch: {evals['pytorch']})")
    assert evals["pytorch"]["teacher_top1"] == evals["jax"]["teacher_top1"] \
        == evals["tf2"]["teacher_top1"]
    assert worst <= 2 / 360  # at most two of the 360 argmaxes may fall the other way
    assert kl <= 1e-3 * max(1.0, evals["pytorch"]["kl"])
