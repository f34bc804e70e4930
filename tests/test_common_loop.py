"""The shared training loop, driven by a tiny numpy backend (no framework needed).

The backend fine-tunes only the zero-initialised head on raw digit pixels, with the same SGD
momentum rule as the real backends, so resume, signals and faults are tested on real training.
"""

from __future__ import annotations

import itertools
import json
import os
import signal

import numpy as np
import pytest

from bit_common import checkpoint, cli, loop
from bit_common.datasets import load_digits, undecodable_message
from bit_common.errors import DataError
from bit_common.runlog import read_metrics

HEAD_K, HEAD_B = checkpoint.HEAD_KERNEL, checkpoint.HEAD_BIAS


class NumpyHead(loop.Backend):
    """Softmax regression on pixels padded to the feature width, as a stand-in backbone."""

    faults: dict[int, str] = {}  # step -> "nan" | "sigterm" | "wrong batch" | "bad image"

    def __init__(self, setup: loop.RunSetup):
        self.setup = setup
        self.params = dict(setup.params)
        self.momentum = {k: np.zeros_like(v) for k, v in self.params.items()}

    def _features(self, images):
        x = images.reshape(len(images), -1).astype(np.float64) / 255.0
        return np.pad(x, ((0, 0), (0, self.setup.arch.feature_dim - x.shape[1])))

    def train_batches(self, start_step):
        for s in itertools.count(start_step):
            idx = self.setup.train_indices[self.setup.plan.batch_plan(s).indices]
            got = s + 1 if self.faults.get(s) == "wrong batch" else s
            if self.faults.get(s) == "bad image":
                raise DataError(undecodable_message("/data/x.jpg", "OSError: broken"))
            yield got, (s, self._features(self.setup.train.images[idx]),
                        self.setup.train.labels[idx])

    def _loss_grad(self, x, y):
        w, b = self.params[HEAD_K][0, 0], self.params[HEAD_B]
        logits = x @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        loss = -np.log(p[np.arange(len(y)), y]).mean()
        p[np.arange(len(y)), y] -= 1
        return loss, (x.T @ p / len(y))[None, None], p.mean(0)

    def train_step(self, batch, lr):
        step, x, y = batch
        loss, gw, gb = self._loss_grad(x, y)
        for key, g in ((HEAD_K, gw), (HEAD_B, gb)):
            self.momentum[key] = 0.9 * self.momentum[key] + g
            self.params[key] = (self.params[key] - lr * self.momentum[key]).astype(np.float32)
        fault = self.faults.get(step)
        if fault == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        return float("nan") if fault == "nan" else float(loss)

    def eval_sums(self):
        x, y = self._features(self.setup.eval.images), self.setup.eval.labels
        logits = x @ self.params[HEAD_K][0, 0] + self.params[HEAD_B]
        top5 = np.argsort(-logits, 1)[:, :5]
        loss, _, _ = self._loss_grad(x, y)
        return np.array([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(1).sum(),
                         loss * len(y), len(y)])

    def get_state(self):
        return loop.join_state(self.params, self.momentum)

    def set_state(self, state):
        self.params, self.momentum = loop.split_state(state, self.setup.arch,
                                                      self.setup.num_classes)


class NumpyFramework(loop.Framework):
    name = "numpy"

    def load_splits(self, config, info):
        return load_digits("train"), load_digits("test")

    def make_backend(self, setup):
        return NumpyHead(setup)


Numpy = NumpyFramework()


@pytest.fixture
def run(tmp_path, r50_npz, capsys):
    """Run the loop in-process; returns (exit code, stderr, run folder)."""
    def go(*flags, name="run", faults=None):
        NumpyHead.faults = faults or {}
        argv = ["--name", name, "--model", "BiT-M-R50x1", "--logdir", str(tmp_path / "logs"),
                "--bit_pretrained_dir", str(r50_npz.parent), "--dataset", "digits",
                "--batch", "16", "--base_lr", "1.0", *flags]
        try:
            code = loop.main(Numpy, argv)
        finally:
            NumpyHead.faults = {}  # other modules run this backend too
        return code, capsys.readouterr().err, tmp_path / "logs" / name
    return go


def train_steps(run_dir):
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]


def state_of(run_dir):
    with np.load(run_dir / loop.CHECKPOINT) as f:
        return {k: f[k] for k in f.files}


def test_a_run_writes_logs_metrics_checkpoint_and_model(run):
    code, err, run_dir = run("--steps", "40", "--eval_every", "20")
    assert code == 0, err
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 41))
    assert [r["step"] for r in evals] == [20, 40]
    assert set(train[0]) == {"type", "step", "loss", "lr", "img_per_s", "time"}
    assert set(evals[0]) == {"type", "step", "top1", "top5", "loss", "time"}
    assert train[0]["lr"] == 0.0 and train[10]["lr"] == pytest.approx(0.1)
    assert evals[-1]["top1"] > 0.5  # digits learnt from pixels: the loop really trains
    assert "[step 40] eval: top1=" in (run_dir / "train.log").read_text()
    _, params = checkpoint.load_params(run_dir / loop.FINAL_MODEL)
    assert params[HEAD_K].any() and state_of(run_dir)["meta/step"] == 40
    config = json.loads((run_dir / loop.CONFIG).read_text())
    assert (config["framework"], config["num_train_examples"], config["crop"]) == ("numpy", 1437, 128)
    assert config["few_shot_indices"] is None


def test_few_shot_run_records_its_subset(run):
    code, err, run_dir = run("--steps", "2", "--examples_per_class", "3", "--no-save")
    assert code == 0, err
    config = json.loads((run_dir / loop.CONFIG).read_text())
    labels = load_digits("train").labels
    assert config["num_train_examples"] == 30
    assert np.array_equal(np.bincount(labels[config["few_shot_indices"]]), [3] * 10)
    assert not (run_dir / loop.CHECKPOINT).exists()


def test_resume_equals_a_straight_run(run):
    assert run("--steps", "6", name="straight")[0] == 0
    assert run("--steps", "3", name="split")[0] == 0
    code, _, split_dir = run("--steps", "6", name="split")
    assert code == 0
    a, b = state_of(split_dir.parent / "straight"), state_of(split_dir)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a if k != "meta/config")
    steps = [r["step"] for r in read_metrics(split_dir / "metrics.jsonl") if r["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert run("--steps", "6", name="split")[0] == 0
    assert "already reached step 6; nothing to do" in (split_dir / "train.log").read_text()


def test_sigterm_saves_and_the_same_command_resumes(run, capsys):
    code, _, run_dir = run("--steps", "6", name="sig", faults={2: "sigterm"})
    assert code == 0 and int(state_of(run_dir)["meta/step"]) == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert run("--steps", "6", name="sig")[0] == 0
    assert run("--steps", "6", name="ref")[0] == 0
    a, b = state_of(run_dir), state_of(run_dir.parent / "ref")
    assert all(np.array_equal(a[k], b[k]) for k in a if k != "meta/config")
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6, 6]  # six train records and the final eval


def test_an_image_that_fails_mid_run_keeps_the_checkpoint_and_the_same_command_resumes(run):
    code, err, run_dir = run("--steps", "6", "--save_every", "2", name="img",
                             faults={4: "bad image"})
    assert code == 2 and err.startswith("error: Cannot decode image /data/x.jpg (OSError")
    assert err.count("\n") == 1 and int(state_of(run_dir)["meta/step"]) == 4
    assert train_steps(run_dir) == [1, 2, 3, 4]
    assert run("--steps", "6", "--save_every", "2", name="img")[0] == 0  # the file fixed
    assert run("--steps", "6", "--save_every", "2", name="ref")[0] == 0
    a, b = state_of(run_dir), state_of(run_dir.parent / "ref")
    assert all(np.array_equal(a[k], b[k]) for k in a if k != "meta/config")
    assert train_steps(run_dir) == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_written_before_a_resume_flag_existed_resumes_with_its_default(run):
    code, _, run_dir = run("--steps", "3", name="old")
    assert code == 0
    path = run_dir / loop.CHECKPOINT
    state = state_of(run_dir)
    config = json.loads(str(state["meta/config"]))
    del config["augment"]  # as if written before --no-augment existed
    state["meta/config"] = np.asarray(json.dumps(config))
    checkpoint.atomic_savez(path, state)
    assert run("--steps", "4", name="old")[0] == 0
    code, err, _ = run("--steps", "5", "--no-augment", name="old")
    assert code == 2 and "--augment was True, now False" in err


def test_a_first_batch_that_fails_writes_no_run_folder(run):
    code, err, run_dir = run("--steps", "6", name="first", faults={0: "bad image"})
    assert code == 2 and "Cannot decode image" in err and not run_dir.exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(run):
    code, err, run_dir = run("--steps", "8", "--save_every", "2", name="nan", faults={4: "nan"})
    assert code == 2 and "loss became nan at step 5" in err and "Traceback" not in err
    assert int(state_of(run_dir)["meta/step"]) == 4


def test_schedule_steps_scales_the_schedule_and_steps_truncates_it(run):
    """--schedule_steps 10 is (2, 4, 6, 8, 10); --steps 9 stops one short, in its last phase."""
    code, err, run_dir = run("--steps", "9", "--schedule_steps", "10", name="scaled")
    assert code == 0, err
    lrs = [r["lr"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    log = (run_dir / "train.log").read_text()
    assert "steps 0->9 of 10, schedule (warm-up, decays, end) [2, 4, 6, 8, 10] " \
           "(--schedule_steps 10)" in log
    assert run("--steps", "10", "--schedule_steps", "10", name="scaled")[0] == 0  # resumes
    lrs = [r["lr"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]
    assert len(lrs) == 10 and lrs[-1] == pytest.approx(0.001)
    code, err, _ = run("--steps", "12", "--schedule_steps", "20", name="scaled")
    assert code == 2 and "--schedule_steps was 10, now 20" in err


def test_corrupt_or_foreign_checkpoint_is_never_overwritten(run, tmp_path):
    run_dir = tmp_path / "logs" / "bad"
    run_dir.mkdir(parents=True)
    (run_dir / loop.CHECKPOINT).write_bytes(b"garbage")
    code, err, _ = run("--steps", "2", name="bad")
    assert code == 2 and str(run_dir / loop.CHECKPOINT) in err and "left untouched" in err
    assert (run_dir / loop.CHECKPOINT).read_bytes() == b"garbage"
    assert run("--steps", "2", name="other")[0] == 0
    code, err, _ = run("--steps", "4", "--batch", "8", name="other")
    assert code == 2 and "--batch was 16, now 8" in err


def test_train_flag_is_logged_recorded_and_part_of_the_resume_identity(run):
    code, err, run_dir = run("--steps", "2", "--train", "block3", name="partial")
    assert code == 0, err
    assert "--train block3: block3-block4, the final group norm and the head trained; root, " \
           "block1, block2 frozen" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / loop.CONFIG).read_text())["train"] == "block3"
    code, err, _ = run("--steps", "4", "--train", "head", name="partial")
    assert code == 2 and "--train was 'block3', now 'head'" in err
    assert run("--steps", "4", "--train", "block3", name="partial")[0] == 0
    # A run of the default `all` says nothing of it, and one whose checkpoint predates the flag
    # resumes as `all`, which it was.
    code, _, run_dir = run("--steps", "2", name="whole")
    assert code == 0 and "--train" not in (run_dir / "train.log").read_text()
    state = state_of(run_dir)
    config = json.loads(str(state["meta/config"]))
    del config["train"]
    checkpoint.atomic_savez(run_dir / loop.CHECKPOINT,
                            {**state, "meta/config": np.asarray(json.dumps(config))})
    code, err, _ = run("--steps", "4", name="whole")
    assert code == 0, err
    code, err, _ = run("--steps", "6", "--train", "head", name="whole")
    assert code == 2 and "--train was 'all', now 'head'" in err


@pytest.mark.parametrize("flags, message", [
    (("--model", "BiT-M-R50x2"), "Unknown model 'BiT-M-R50x2'. Did you mean"),
    (("--dataset", "digit"), "Unknown dataset 'digit'. Did you mean: digits"),
    (("--examples_per_class", "200"), "more examples than class"),
    (("--batch_split", "3"), "not divisible"),
    (("--dataset", "imagefolder"), "needs --datadir"),
])
def test_bad_input_is_explained_before_anything_is_written(run, flags, message):
    code, err, run_dir = run(*flags, name="bad_input")
    assert code == 2 and message in err and "Traceback" not in err
    assert not run_dir.exists()


def test_unwritable_logdir(tmp_path, r50_npz, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = loop.main(Numpy, ["--name", "x", "--model", "BiT-M-R50x1", "--dataset", "digits",
                             "--logdir", str(blocker / "logs"),
                             "--bit_pretrained_dir", str(r50_npz.parent)])
    assert code == 2 and "Cannot create --logdir" in capsys.readouterr().err


def test_wrong_architecture_file_is_explained(run, tmp_path):
    weights = tmp_path / "w"
    checkpoint.write_random_checkpoint(weights / "BiT-M-R101x1.npz", "R50x1", 10)
    code, err, _ = run("--model", "BiT-M-R101x1", "--bit_pretrained_dir", str(weights))
    assert code == 2 and "holds a R50x1, but a R101x1 was asked for" in err


def test_a_batch_of_another_step_stops_the_run(run):
    code, err, run_dir = run("--steps", "6", "--save_every", "2", name="order",
                             faults={3: "wrong batch"})
    assert code == 2 and "batch of step 4 where step 3 was expected" in err
    assert int(state_of(run_dir)["meta/step"]) == 2  # the last good checkpoint is kept


def test_eval_metrics_from_the_four_sums():
    assert loop.eval_metrics(np.array([3.0, 5.0, 12.0, 8.0])) == {
        "top1": 3 / 8, "top5": 5 / 8, "loss": 1.5}
    assert loop.eval_metrics(np.zeros(4)) == {"top1": 0.0, "top5": 0.0, "loss": 0.0}


def test_make_setup_decides_the_run_once(r50_npz):
    """Both splits, the few-shot subset, the resolution, a zero head, the plan and the end step,
    from the flags alone."""
    args = cli.build_parser("numpy").parse_args(
        ["--name", "x", "--model", "BiT-M-R50x1", "--logdir", "unused", "--dataset", "digits",
         "--bit_pretrained_dir", str(r50_npz.parent), "--examples_per_class", "3",
         "--steps", "700", "--batch", "8", "--workers", "0"])
    setup = loop.make_setup(args, Numpy)
    assert (len(setup.train), len(setup.eval), len(setup.train_indices)) == (1437, 360, 30)
    assert setup.end_step == 500  # --steps beyond the rule's schedule stops at its end
    args.schedule_steps = 600
    assert loop.make_setup(args, Numpy).end_step == 600  # --steps 700 beyond the scaled one too
    args.steps = 120
    assert loop.make_setup(args, Numpy).end_step == 120
    args.steps, args.schedule_steps = 700, None
    assert (setup.resize, setup.crop, setup.plan.mixup_alpha) == (160, 128, 0.0)
    assert not setup.params[HEAD_K].any() and setup.params[HEAD_K].shape[-1] == 10
    assert setup.config == loop.RunConfig(batch=8, batch_split=1, batch_eval=32, workers=0,
                                          precision="fp32")
    given = checkpoint.random_params(setup.arch, 10, seed=1)
    assert loop.make_setup(args, Numpy, params=given).params[HEAD_K].any()  # kept as given
    with pytest.raises(checkpoint.CheckpointError, match="fit BiT R50x1 with 10 classes"):
        loop.make_setup(args, Numpy, params=checkpoint.random_params(setup.arch, 7))


# ---- --steps 0: evaluation only -------------------------------------------------------------
def test_steps_0_evaluates_the_checkpoint_with_its_own_head(run, tmp_path):
    """A fine-tuned model.npz, evaluated as --model: the same top-1 as the run's final
    evaluation (a zero head would score one class), and only the eval record is written."""
    code, err, trained = run("--steps", "30", name="trained")
    assert code == 0, err
    final = [r for r in read_metrics(trained / "metrics.jsonl") if r["type"] == "eval"][-1]
    weights = tmp_path / "finetuned"
    weights.mkdir()
    (weights / "BiT-M-R50x1.npz").write_bytes((trained / loop.FINAL_MODEL).read_bytes())
    code, err, run_dir = run("--steps", "0", "--bit_pretrained_dir", str(weights), name="ev")
    assert code == 0, err
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [(r["type"], r["step"]) for r in records] == [("eval", 0)]
    assert final["top1"] > 0.5
    assert records[0]["top1"] == pytest.approx(final["top1"])
    assert records[0]["loss"] == pytest.approx(final["loss"], rel=1e-5)
    config = json.loads((run_dir / loop.CONFIG).read_text())
    assert (config["steps"], config["framework"], config["num_classes"]) == (0, "numpy", 10)
    assert not (run_dir / loop.CHECKPOINT).exists() and not (run_dir / loop.FINAL_MODEL).exists()
    assert "its own 10-class head" in (run_dir / "train.log").read_text()
    assert run("--steps", "0", "--bit_pretrained_dir", str(weights), name="ev")[0] == 0  # again
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 0]


def test_steps_0_keeps_the_head_in_the_setup(r50_npz, r50_params):
    args = cli.build_parser("numpy").parse_args(
        ["--name", "x", "--model", "BiT-M-R50x1", "--logdir", "unused", "--dataset", "digits",
         "--bit_pretrained_dir", str(r50_npz.parent), "--steps", "0", "--workers", "0"])
    setup = loop.make_setup(args, Numpy)
    assert setup.eval_only and setup.end_step == 0
    assert np.array_equal(setup.params[HEAD_K], r50_params[HEAD_K]) and setup.params[HEAD_K].any()
    args.steps = 1
    setup = loop.make_setup(args, Numpy)
    assert not setup.eval_only and not setup.params[HEAD_K].any()


def test_steps_0_with_a_head_of_other_classes_is_explained(run, tmp_path):
    weights = tmp_path / "w7"
    checkpoint.write_random_checkpoint(weights / "BiT-M-R50x1.npz", "R50x1", 7)
    code, err, run_dir = run("--steps", "0", "--bit_pretrained_dir", str(weights), name="head")
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert ("--steps 0 evaluates --model BiT-M-R50x1 with its own head, which has 7 classes, "
            "but --dataset digits has 10.") in err
    assert not run_dir.exists()


def test_steps_0_never_writes_into_a_training_runs_folder(run):
    assert run("--steps", "2", name="busy")[0] == 0
    run_dir = run("--steps", "2", name="busy")[2]
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    code, err, _ = run("--steps", "0", name="busy")
    assert code == 2 and "--steps 0 (evaluation only) was given the folder of a training run" in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
