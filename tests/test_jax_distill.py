"""bit_jax.distiller and `python -m bit_jax.distill`: the jitted distillation step (T²·KL of the
mixed images, clipping, AdamW masked to the kernels), batch_split, state, the CLI and resume.

Everything runs R50x1 teacher and student at 24 / 16 px on batches of 8 digits. The step's
hyperparameters are traced, so every Distiller of this file (the CLI runs included, in-process)
shares one compiled step per --batch_split, and one evaluation step. On two shared CPU cores
the default tests take 75-110 s (compiling the step 50 s, the reference logits' forward passes
15-35 s); the slow ones (the step of --batch_split 2, the evaluation step and the CLI runs, two
devices in a subprocess) about 80 s and 180 s more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bit_common import checkpoint, distill
from bit_common.errors import BiTError
from bit_common.registry import parse_arch
from bit_common.runlog import read_metrics
from conftest import UPDATE_TOLERANCE, checkpoint_difference, update_difference

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("optax")

from bit_jax import backend, distiller, models  # noqa: E402
from bit_jax.distill import main  # noqa: E402
from bit_jax.train import FRAMEWORK  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARCH = parse_arch("R50x1")
B, R, RT = 8, 16, 24
B1, B2, EPS = distill.ADAM_B1, distill.ADAM_B2, distill.ADAM_EPS
# The step tests: T 2, decay 10x the update's scale on the kernels (0.3 / 0.03), a clip that
# binds (asserted below).
STEP_FLAGS = ("--temperature", "2", "--weight_decay", "0.3", "--base_lr", "0.03",
              "--clip_norm", "0.01")


@pytest.fixture(scope="module")
def teacher_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("distill_weights") / "teacher.npz"
    return checkpoint.write_random_checkpoint(path, ARCH, num_classes=10, seed=1)


def _args(teacher_npz, *flags: str) -> list[str]:
    return ["--teacher", str(teacher_npz), "--student", "R50x1", "--dataset", "digits",
            "--batch", str(B), "--resolution", str(R), "--teacher_resolution", str(RT),
            "--warmup_steps", "1", "--schedule_steps", "6", "--workers", "1", *flags]


def _distiller(teacher_npz, *flags: str, student: dict | None = None) -> distiller.Distiller:
    """A Distiller of `_args` (later flags win), its student's start `student` if given."""
    args = distill.build_parser("jax").parse_args(
        ["--name", "x", "--logdir", "unused", *_args(teacher_npz, *flags)])
    setup = distill.make_setup(args, FRAMEWORK,
                               student=None if student is None else (ARCH, student))
    return distiller.Distiller(setup, jax.devices()[:1])


@pytest.fixture(scope="module")
def start(teacher_npz):
    """A student with a random head (every layer gets a gradient), non-zero Adam moments at
    count 3 (so clipping and both moments show in the update), the first batch as numpy."""
    params = checkpoint.random_params(ARCH, 10, seed=2)
    rng = np.random.default_rng(0)
    mu = {k: (1e-6 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}
    nu = {k: (1e-10 * rng.random(v.shape)).astype(np.float32) for k, v in params.items()}
    state = distill.join_state(params, mu, nu, 3)
    d = _distiller(teacher_npz, *STEP_FLAGS, student=params)
    step, batch = next(d.train_batches(0))
    assert step == 0
    return state, {k: np.asarray(v) for k, v in batch.items()}


def _step(d: distiller.Distiller, state: dict, batch: dict, lr: float) -> tuple[dict, float]:
    d.set_state(state)
    loss = d.train_step(backend.shard_batch(batch, d.mesh), lr)
    return d.get_state(), loss


@pytest.fixture(scope="module")
def step1(teacher_npz, start):
    """One step at lr 1e-3 of the STEP_FLAGS Distiller from `start`."""
    state, batch = start
    d = _distiller(teacher_npz, *STEP_FLAGS)
    return _step(d, state, batch, 1e-3)


def _kl_numpy(teacher_logits, student_logits, t: float) -> np.ndarray:
    def log_softmax(z):
        z = np.asarray(z, np.float64) / t
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lt, ls = log_softmax(teacher_logits), log_softmax(student_logits)
    return t * t * (np.exp(lt) * (lt - ls)).sum(1)


def _gradient(before: dict, after: dict) -> dict:
    """The (clipped) gradient a step fed Adam, from its first moment: mu' = b1 mu + (1-b1) g."""
    return {k: (after[distill.ADAM_MU + k].astype(np.float64)
                - B1 * before[distill.ADAM_MU + k]) / (1 - B1)
            for k in before if k.startswith(checkpoint.PREFIX)}


def _norm(tree: dict) -> float:
    return float(np.sqrt(sum(np.sum(np.square(v)) for v in tree.values())))


# ---- the step ------------------------------------------------------------------------------
def test_loss_is_t2_kl_of_the_mixed_images(teacher_npz, start, step1):
    """The step's loss is T²·KL(teacher ‖ student) at T 2 of the two models' logits on the
    mixed images (the teacher on its own resolution), recomputed here in float64 numpy."""
    state, batch = start
    lam, perm = batch["mixup_lambda"], batch["mixup_perm"]
    assert 0 < lam < 1 and not np.array_equal(perm, np.arange(B))  # mixup happened
    mixed = {k: lam * batch[k] + (1 - lam) * batch[k][perm] for k in ("student", "teacher")}
    teacher = models.load_npz(teacher_npz)
    student = models.from_params(ARCH, {k: v for k, v in state.items()
                                        if k.startswith(checkpoint.PREFIX)})
    want = _kl_numpy(models.predict(teacher, mixed["teacher"]),
                     models.predict(student, mixed["student"]), 2.0).mean()
    assert step1[1] == pytest.approx(want, rel=1e-4)


def test_update_is_clipped_adamw_with_decay_on_kernels(teacher_npz, start, step1):
    """The update is optax's AdamW on the clipped gradient, written out here: the gradient,
    recovered from the first moment, has the clip's global norm and the direction of the
    unclipped one (a Distiller whose clip never binds); the second moment, the count and every
    parameter follow Adam's formulas with decay lr / base_lr · wd on the kernels only."""
    state, batch = start
    new, _ = step1
    lr, ratio = 1e-3, 0.3 / 0.03
    g = _gradient(state, new)
    free, _ = _step(_distiller(teacher_npz, *STEP_FLAGS, "--clip_norm", "1e9"), state, batch, lr)
    g_raw = _gradient(state, free)
    raw_norm = _norm(g_raw)
    print(f"gradient norm {raw_norm:.3g}, clipped to 0.01")
    assert raw_norm > 2 * 0.01  # the clip binds
    assert _norm(g) == pytest.approx(0.01, rel=1e-4)
    assert update_difference({k: g[k] for k in g}, {k: g_raw[k] * 0.01 / raw_norm for k in g},
                             {k: np.zeros_like(v) for k, v in g.items()}, "resnet/") < 1e-4
    assert int(new[distill.ADAM_COUNT]) == 4
    c = 4
    decayed = [k for k in g if distill.decayed(k)]
    assert checkpoint.HEAD_KERNEL in decayed and checkpoint.HEAD_BIAS not in decayed
    assert not any("group_norm" in k for k in decayed)
    for k in g:
        nu = B2 * state[distill.ADAM_NU + k] + (1 - B2) * g[k] ** 2
        np.testing.assert_allclose(new[distill.ADAM_NU + k], nu, rtol=1e-4, atol=1e-12,
                                   err_msg=k)
        m_hat = new[distill.ADAM_MU + k] / (1 - B1 ** c)
        v_hat = new[distill.ADAM_NU + k] / (1 - B2 ** c)
        update = m_hat / (np.sqrt(v_hat) + EPS) + (ratio * state[k] if k in decayed else 0)
        # The update of float32 parameters is exact to their rounding (2**-24 relative).
        np.testing.assert_allclose(new[k] - state[k], -lr * update, rtol=1e-3,
                                   atol=1.2e-7 * float(np.abs(state[k]).max()), err_msg=k)


def test_gradient_is_the_losses_and_lr_zero_changes_nothing(teacher_npz, start):
    """The gradient Adam is fed is the loss's: the loss after a small step changes by the
    gradient's dot product with the step (to first order); a step at lr 0 leaves every
    parameter bit for bit and still moves Adam's moments and count."""
    state, batch = start
    d = _distiller(teacher_npz, *STEP_FLAGS, "--clip_norm", "1e9")
    at0, loss0 = _step(d, state, batch, 0.0)
    for k in state:
        if k.startswith(checkpoint.PREFIX):
            np.testing.assert_array_equal(at0[k], state[k], err_msg=k)
    assert int(at0[distill.ADAM_COUNT]) == 4
    assert not np.array_equal(at0[distill.ADAM_MU + checkpoint.HEAD_KERNEL],
                              state[distill.ADAM_MU + checkpoint.HEAD_KERNEL])
    g = _gradient(state, at0)
    moved, _ = _step(d, state, batch, 1e-7)  # small enough for the first order (1e-6: 10 % off)
    _, loss1 = _step(d, moved, batch, 0.0)
    predicted = sum(float(np.sum(g[k] * (moved[k].astype(np.float64) - state[k]))) for k in g)
    print(f"loss change {loss1 - loss0:.4g}, first-order prediction {predicted:.4g}")
    assert predicted < 0
    assert loss1 - loss0 == pytest.approx(predicted, rel=0.03)


@pytest.mark.slow
def test_batch_split_equals_full_batch(teacher_npz, start, step1):
    """2 micro-batches give the full batch's step (the whole update, params and both moments,
    to UPDATE_TOLERANCE relative L2; the loss to 1e-5)."""
    state, batch = start
    split, loss2 = _step(_distiller(teacher_npz, *STEP_FLAGS, "--batch_split", "2"), state,
                         batch, 1e-3)
    full, loss1 = step1
    assert loss2 == pytest.approx(loss1, abs=1e-5)
    for prefix in ("resnet/", distill.ADAM_MU, distill.ADAM_NU):
        diff = update_difference(full, split, state, prefix)
        print(f"split 2 vs 1, {prefix}: relative L2 of the update {diff:.1e}")
        assert diff < UPDATE_TOLERANCE, prefix


def test_state_round_trip(teacher_npz, start, step1):
    """get_state -> set_state on a fresh Distiller gives the same state, and the same next
    step as the Distiller that made it (Adam's count included)."""
    state, batch = start
    new, _ = step1
    a, b = (_distiller(teacher_npz, *STEP_FLAGS) for _ in range(2))
    a.set_state(new)
    again = a.get_state()
    assert again.keys() == new.keys()
    assert all(np.array_equal(again[k], new[k]) for k in new)
    after_a, loss_a = _step(a, again, batch, 1e-3)
    after_b, loss_b = _step(b, new, batch, 1e-3)
    assert loss_a == loss_b and int(after_a[distill.ADAM_COUNT]) == 5
    assert all(np.array_equal(after_a[k], after_b[k]) for k in after_a)
    broken = dict(new)
    del broken[distill.ADAM_NU + checkpoint.HEAD_BIAS]
    with pytest.raises(checkpoint.CheckpointError, match="second moments"):
        b.set_state(broken)


def test_precision(teacher_npz, monkeypatch):
    """--precision bf16 builds both models in bfloat16 where mixed precision is allowed (a
    patch on this CPU), the parameters staying float32; fp16 is refused as by `train`."""
    import jax.numpy as jnp

    monkeypatch.setattr(backend, "mixed_precision_available", lambda: True)
    d = _distiller(teacher_npz, "--precision", "bf16")
    assert d.student.dtype == jnp.bfloat16 and d.teacher.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves((d.state[0], d.teacher_params)))
    with pytest.raises(BiTError, match="fp16 is not supported by the JAX backend"):
        _distiller(teacher_npz, "--precision", "fp16")


# ---- the CLI ---------------------------------------------------------------------------------
# Adam moves every weight by about the learning rate at each step: 0.1 or 0.01 overshoots by far
# with a zero-head student on 8 images (its KL grows tenfold), the default 0.03 is for batch 4096.
CLI_FLAGS = ("--base_lr", "0.001", "--eval_every", "3", "--batch_eval", "40")


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_distill_runs")


def _main(teacher_npz, logdir, name: str, *flags: str) -> int:
    return main(_args(teacher_npz, *CLI_FLAGS, "--name", name, "--logdir", str(logdir), *flags))


@pytest.fixture(scope="module")
def straight(teacher_npz, logdir):
    """6 steps (the whole schedule), evaluating and checkpointing every 3."""
    assert _main(teacher_npz, logdir, "straight") == 0
    return logdir / "straight"


@pytest.mark.slow
def test_cli_end_to_end(teacher_npz, straight):
    """The run's files and records; the KL falls: on the evaluation split, from the student's
    start (R50x1 from `initial_params`, its zero head predicting the uniform distribution) to
    step 3 to step 6, and in training, the last 3 steps' mean below the first step's."""
    for name in ("train.log", "metrics.jsonl", "checkpoint.npz", "model.npz", "config.json"):
        assert (straight / name).is_file(), name
    records = read_metrics(straight / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert 0 <= r["top1"] <= r["top5"] <= 1 and 0 <= r["agree_top1"] <= r["agree_top5"] <= 1
        assert 0 <= r["teacher_top1"] <= 1 and r["kl"] >= 0 and np.isfinite(r["loss"])
    assert evals[0]["teacher_top1"] == evals[1]["teacher_top1"]  # the frozen teacher
    begin = distill.eval_metrics(_distiller(teacher_npz, *CLI_FLAGS).eval_sums())
    losses = [r["loss"] for r in train]
    kls = [begin["kl"], *(r["kl"] for r in evals)]
    print("train KL", np.round(losses, 4), "eval KL", np.round(kls, 4))
    assert kls[0] > kls[1] > kls[2]
    assert np.mean(losses[3:]) < losses[0]  # step 1 has lr 0 (the warm-up's start)
    config = json.loads((straight / "config.json").read_text())
    assert config["framework"] == "jax" and config["command"] == "distill"
    assert config["teacher_arch"] == "R50x1" and config["teacher_resolution"] == RT
    m = models.load_npz(straight / "model.npz")
    assert m.arch == ARCH and m.num_classes == 10
    with np.load(straight / "checkpoint.npz") as ck:
        assert int(ck["meta/step"]) == 6 and int(ck[distill.ADAM_COUNT]) == 6
        final = models.to_params(m)
        assert all(np.array_equal(final[k], ck[k]) for k in final)
        assert np.abs(final[checkpoint.HEAD_KERNEL]).max() > 0  # the zero head has moved


@pytest.mark.slow
def test_resume_equals_straight(teacher_npz, logdir, straight, capsys):
    """--steps 3, then the same command without it, ends where the 6 straight steps did, with
    the same metrics (--steps is not a resume key)."""
    assert _main(teacher_npz, logdir, "halves", "--steps", "3") == 0
    capsys.readouterr()
    assert _main(teacher_npz, logdir, "halves") == 0
    assert "(resumed)" in capsys.readouterr().out
    halves = logdir / "halves"
    worst = checkpoint_difference(straight / "checkpoint.npz", halves / "checkpoint.npz")
    assert worst <= 1e-6, worst
    ra, rb = read_metrics(straight / "metrics.jsonl"), read_metrics(halves / "metrics.jsonl")
    assert [r["step"] for r in rb if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    for kind, fields in (("train", ("loss", "lr")),
                         ("eval", ("top1", "agree_top1", "agree_top5", "kl", "teacher_top1"))):
        for f in fields:
            np.testing.assert_allclose([r[f] for r in rb if r["type"] == kind],
                                       [r[f] for r in ra if r["type"] == kind], atol=1e-6,
                                       err_msg=f"{kind} {f}")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="bf16 is allowed on accelerators")
def test_cli_refuses_bf16_on_cpu(teacher_npz, logdir, capsys):
    assert _main(teacher_npz, logdir, "bf16", "--precision", "bf16") == 2
    err = capsys.readouterr().err
    assert "bf16 needs a GPU" in err and "Traceback" not in err
    assert not (logdir / "bf16").exists()


TWO_DEVICES = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, "tests")
    import test_jax_distill as t
    from bit_common import checkpoint, distill
    from bit_jax import backend
    from conftest import update_difference
    assert len(jax.devices()) == 2, jax.devices()
    params = checkpoint.random_params(t.ARCH, 10, seed=2)
    flags = (*t.STEP_FLAGS, "--batch_split", "2")
    out = {}
    for n in (1, 2):
        d = t._distiller(sys.argv[1], *flags, student=params)
        d = t.distiller.Distiller(d.setup, jax.devices()[:n])
        step, batch = next(d.train_batches(0))
        if n == 2:  # the plan's mixup partners stay inside each device's half
            perm = np.asarray(batch["mixup_perm"])
            assert set(perm[:4]) == {0, 1, 2, 3} and set(perm[4:]) == {4, 5, 6, 7}, perm
            assert len(batch["student"].sharding.device_set) == 2
        batch = {k: np.asarray(v) for k, v in batch.items()}
        batch["mixup_perm"] = np.array([1, 0, 3, 2, 5, 4, 7, 6], np.int32)  # the same for both
        loss = d.train_step(backend.shard_batch(batch, d.mesh), 1e-3)
        out[n] = d.get_state(), loss, d.eval_sums()
    start = distill.join_state(params, *({k: np.zeros_like(v) for k, v in params.items()},) * 2,
                               0)
    diff = max(update_difference(out[1][0], out[2][0], start, p)
               for p in ("resnet/", distill.ADAM_MU, distill.ADAM_NU))
    print(json.dumps({"update_diff": diff, "loss_diff": abs(out[1][1] - out[2][1]),
                      "eval_close": bool(np.allclose(out[1][2], out[2][2], rtol=1e-4, atol=1e-3)),
                      "count": float(out[2][2][-1])}))
""")


@pytest.mark.slow
def test_two_devices_equal_one_device(teacher_npz):
    """The step and the evaluation sharded over two (CPU) devices, --batch_split 2 (a micro-batch
    spread over both), equal one device's on the same batch."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", TWO_DEVICES, str(teacher_npz)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["update_diff"] < UPDATE_TOLERANCE and result["loss_diff"] <= 1e-5, result
    assert result["count"] == 360 and result["eval_close"], result
