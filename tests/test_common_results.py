"""Result tables and plot from tiny real runs, and the reproduction grid."""

from __future__ import annotations

import re

import numpy as np
import pytest

from bit_common import cli, distill, reproduce, results
from bit_common.loop import main as loop_main
from test_common_loop import Numpy


@pytest.fixture(scope="module")
def logdir(tmp_path_factory, r50_npz):
    logdir = tmp_path_factory.mktemp("runs")
    base = ["--model", "BiT-M-R50x1", "--logdir", str(logdir), "--dataset", "digits",
            "--bit_pretrained_dir", str(r50_npz.parent), "--batch", "16", "--base_lr", "1.0",
            "--no-save"]
    for seed in range(3):
        assert loop_main(Numpy, base + ["--name", f"k2-s{seed}", "--steps", "8",
                                        "--examples_per_class", "2",
                                        "--examples_per_class_seed", str(seed)]) == 0
    assert loop_main(Numpy, base + ["--name", "full", "--steps", "30"]) == 0
    return logdir


def test_tables_show_min_median_max_per_group(logdir):
    found = results.collect(logdir)
    assert len(found) == 4
    few = sorted(r.top1 for r in found if r.examples_per_class == 2)
    table = results.tables(found)
    assert "| Dataset | Ex/cls | numpy |" in table
    assert f"| digits | 2 | {few[0]:.1f} ← {few[1]:.1f} → {few[2]:.1f} |" in table
    full = next(r.top1 for r in found if r.examples_per_class is None)
    assert f"| digits | full | {full:.1f} |" in table
    assert table.index("| digits | 2 |") < table.index("| digits | full |")


def test_plot_and_cli(logdir, tmp_path, capsys):
    png = tmp_path / "fig.png"
    assert results.main([str(logdir), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "BiT-M-R50x1" in capsys.readouterr().out
    assert results.main([str(tmp_path / "empty")]) == 2


def _share_of_colour(png, colour: str, columns: slice) -> float:
    """The fraction of the PNG's pixels, in `columns`, within a few levels of `colour`."""
    import matplotlib.colors
    import matplotlib.image

    rgb = matplotlib.image.imread(png)[..., :3]
    want = np.asarray(matplotlib.colors.to_rgb(colour))
    near = np.abs(rgb[:, columns] - want).max(-1) < 0.05
    return float(near.mean())


def test_curves_are_the_runs_metrics_and_the_png_draws_them(logdir, tmp_path):
    run = logdir / "full"
    c = results.curves(run)
    steps, losses = c["train loss"]
    assert steps == list(range(1, 31)) and len(losses) == 30
    eval_steps, top1 = c["eval top-1 [%]"]
    last = results.collect(logdir)
    assert eval_steps[-1] == 30 and top1[-1] == next(r.top1 for r in last if r.path == run)
    assert all(0 <= v <= 100 for v in top1)  # percent, as the axis says
    png = results.plot_curves([run], tmp_path / "curves.png")
    # The one run's colour is drawn in both panels (loss left, top-1 right); a blank figure
    # (axes, grid and text only) has none of it.
    assert _share_of_colour(png, "C0", slice(0, 500)) > 1e-3
    assert _share_of_colour(png, "C0", slice(560, None)) > 1e-4
    blank = results.plot_curves([], tmp_path / "blank.png")
    assert _share_of_colour(blank, "C0", slice(None)) < 1e-5


def test_plot_of_full_data_runs_is_their_curves(logdir, tmp_path):
    full = [r for r in results.collect(logdir) if r.examples_per_class is None]
    png = results.plot(full, tmp_path / "full.png")
    assert _share_of_colour(png, "C0", slice(0, 500)) > 1e-3


def test_summary_format():
    assert results.summary([3.0, 1.0, 2.0]) == "1.0 ← 2.0 → 3.0"
    assert results.summary([97.25]) == "97.2"


def test_reproduce_grid_covers_every_published_row():
    jobs = list(reproduce.jobs())
    cifar = [j for j in jobs if j.table == "CIFAR"]
    # 3 models x 2 datasets x (5 seeds x 2 shot counts + 1 full) x their frameworks (3, 2, 3)
    assert len(cifar) == 2 * 11 * (3 + 2 + 3)
    assert len([j for j in jobs if j.table == "ImageNet"]) == 9
    assert len({j.name for j in jobs}) == len(jobs)
    parser = cli.build_parser("pytorch")
    for job in (j for j in jobs if j.command == "train"):
        args = parser.parse_args(job.argv("runs", "weights", "data")[3:])
        cli.check_args(args)
        if job.table == "CIFAR":
            assert (args.batch, args.base_lr) == (128, 0.001)
    r152 = {j.framework for j in cifar if "R152x2" in j.name}
    assert r152 == {"jax", "pytorch"}


def test_reproduce_prints_commands(capsys):
    assert reproduce.main(["--only", "BiT-M-R50x1-cifar10-1-s3"]) == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("python -m")]
    assert len(lines) == 3 and all(re.search(r"--examples_per_class_seed 3", l) for l in lines)
    assert {l.split()[2] for l in lines} == {"bit_tf2.train", "bit_jax.train", "bit_pytorch.train"}
    assert np.all(["--batch 128 --base_lr 0.001" in l for l in lines])


def test_demo_uses_real_weights_when_present_else_says_random(tmp_path, monkeypatch, r50_npz):
    from bit_common import demo
    monkeypatch.setenv("BIT_OFFLINE", "1")
    real_dir = tmp_path / "weights"
    real_dir.mkdir()
    (real_dir / "BiT-M-R50x1.npz").symlink_to(r50_npz)
    assert demo.prepare_weights("BiT-M-R50x1", real_dir, tmp_path / "rand") == (real_dir, True)
    folder, real = demo.prepare_weights("BiT-S-R50x1", real_dir, tmp_path / "rand")
    assert (folder, real) == (tmp_path / "rand", False)
    from bit_common import checkpoint
    arch, params = checkpoint.load_params(folder / "BiT-S-R50x1.npz")
    assert arch.name == "R50x1" and params[checkpoint.HEAD_BIAS].shape == (1000,)


def test_demo_writes_the_runs_curves_and_prints_where(tmp_path, monkeypatch, capsys, logdir):
    """The demo's training command is replaced by one that leaves a finished run's files."""
    import shutil

    from bit_common import demo

    monkeypatch.setenv("BIT_OFFLINE", "1")

    def fake_training(cmd):
        name = cmd[cmd.index("--name") + 1]
        shutil.copytree(logdir / "full", tmp_path / "runs" / name)
        return 0

    monkeypatch.setattr(demo.subprocess, "call", fake_training)
    monkeypatch.setattr(demo.checkpoint, "write_random_checkpoint", lambda *a, **k: None)
    assert demo.main(["--framework", "jax", "--logdir", str(tmp_path / "runs"),
                      "--bit_pretrained_dir", str(tmp_path / "none")]) == 0
    png = tmp_path / "runs" / "jax-BiT-M-R50x1-random" / "curves.png"
    assert f"Loss and top-1 against step: {png}" in capsys.readouterr().out
    assert _share_of_colour(png, "C0", slice(0, 500)) > 1e-3


def test_demo_trains_to_the_end_of_its_scaled_schedule(tmp_path, monkeypatch, capsys, r50_npz):
    """The demo's own training command, run by the shared loop on the numpy stand-in backbone:
    --schedule_steps makes it end BiT-HyperRule's schedule, so its last step trains at a
    thousandth of the peak rate (a truncated schedule would end at the peak)."""
    from bit_common import demo, hyperrule
    from bit_common.runlog import read_metrics

    monkeypatch.setenv("BIT_OFFLINE", "1")
    monkeypatch.setattr(demo.checkpoint, "write_random_checkpoint", lambda *a, **k: None)
    commands = []

    def train_with_numpy(cmd):
        flags = cmd[3:]  # after `python -m bit_<framework>.train`
        commands.append(flags)
        flags = [str(r50_npz.parent) if f == str(tmp_path / "runs" / "random_weights") else f
                 for f in flags]
        return loop_main(Numpy, flags)

    monkeypatch.setattr(demo.subprocess, "call", train_with_numpy)
    assert demo.main(["--framework", "tf2", "--logdir", str(tmp_path / "runs"),
                      "--bit_pretrained_dir", str(tmp_path / "none")]) == 0
    args = cli.build_parser("tf2").parse_args(commands[0])
    assert args.schedule_steps is not None
    run_dir = tmp_path / "runs" / "tf2-BiT-M-R50x1-random"
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]
    assert train[-1]["step"] == hyperrule.total_steps(1437, args.schedule_steps)
    peak = max(r["lr"] for r in train)
    assert peak == pytest.approx(args.base_lr) and args.base_lr == float(demo.RANDOM_LR)
    assert train[-1]["lr"] == pytest.approx(peak / 1000)
    out = capsys.readouterr().out
    assert "Training: " in out and f"for the {len(train) - 1} steps after the first" in out


def test_demo_times_come_from_this_invocations_records():
    """Start-up to the first step's record, training without the evaluations between steps."""
    from bit_common import demo

    records = [{"type": "train", "step": 1, "time": 50.0},  # an earlier invocation's
               {"type": "train", "step": 2, "time": 110.0},
               {"type": "train", "step": 3, "time": 111.0},
               {"type": "eval", "step": 3, "time": 113.5},
               {"type": "train", "step": 4, "time": 114.5},
               {"type": "train", "step": 5, "time": 115.0},
               {"type": "eval", "step": 5, "time": 117.0}]
    times = demo.run_times(records, launched=100.0)
    assert times == demo.RunTimes(startup=10.0, training=2.5, steps=3, evaluation=4.5,
                                  evaluations=2)
    assert demo.run_times(records, launched=200.0) is None
    assert "Start-up: 10.0 s (imports, weights, data, compiling" in demo.describe_times(times, "jax")
    assert "already complete" in demo.describe_times(None, "jax")


def test_demo_says_what_it_tries_and_leaves_no_empty_folder(tmp_path, monkeypatch, capsys):
    from bit_common import demo

    monkeypatch.delenv("BIT_OFFLINE", raising=False)
    monkeypatch.setenv("BIT_MODELS_URL", "http://127.0.0.1:9/none")  # refused at once, offline
    monkeypatch.setattr(demo.checkpoint, "write_random_checkpoint", lambda *a, **k: None)
    weights = tmp_path / "weights"
    assert demo.prepare_weights("BiT-M-R50x1", weights, tmp_path / "rand") == (
        tmp_path / "rand", False)
    out = capsys.readouterr().out
    assert "trying to download http://127.0.0.1:9/none/" in out and "BIT_OFFLINE=1" in out
    assert not weights.exists()
    weights.mkdir()  # a folder the user made stays
    demo.prepare_weights("BiT-M-R50x1", weights, tmp_path / "rand")
    assert weights.is_dir()


# ---- VTAB-1k ------------------------------------------------------------------------------
def _hand_made_run(logdir, name: str, top1: float, steps: int | None = None, **config) -> None:
    """A finished run's folder as the loop writes it: config.json and its last eval record."""
    import json

    run_dir = logdir / name
    run_dir.mkdir(parents=True)
    config = {"examples_per_class": None, "steps": steps, **config}
    (run_dir / "config.json").write_text(json.dumps(config))
    records = [{"type": "eval", "step": 5, "top1": 0.01, "top5": 0.1, "loss": 3.0},
               {"type": "eval", "step": 0 if steps == 0 else 10, "top1": top1, "top5": 1.0,
                "loss": 0.5}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _vtab_value(task_index: int, run: int, framework: str) -> float:
    return 0.40 + 0.02 * task_index + 0.003 * run + {"pytorch": 0.0, "jax": 0.001}[framework]


@pytest.fixture
def vtab_logdir(tmp_path):
    """BiT-M-R152x4 fine-tuned on every task three times in PyTorch and on the natural tasks
    once in Jax; two released files scored with --steps 0 in TF2; a CIFAR run and a few-shot
    VTAB run (which belong in the ordinary table)."""
    from bit_common import vtab

    for i, task in enumerate(vtab.TASKS):
        for run in range(3):
            _hand_made_run(tmp_path, f"pt-{task}-{run}", _vtab_value(i, run, "pytorch"),
                           model="BiT-M-R152x4", dataset=f"vtab/{task}", framework="pytorch")
        if vtab.TASKS[task].group == "natural":
            _hand_made_run(tmp_path, f"jax-{task}", _vtab_value(i, 0, "jax"),
                           model="BiT-M-R152x4", dataset=f"vtab/{task}", framework="jax")
    for run, value in ((0, 0.9), (1, 0.8)):
        _hand_made_run(tmp_path, f"released-{run}", value, steps=0, framework="tf2",
                       model=f"vtab/BiT-M-R152x4-run{run}-clevr-count", dataset="vtab/clevr-count")
    _hand_made_run(tmp_path, "cifar", 0.97, model="BiT-M-R152x4", dataset="cifar10",
                   framework="pytorch")
    _hand_made_run(tmp_path, "few", 0.33, model="BiT-M-R152x4", dataset="vtab/dtd",
                   framework="pytorch", examples_per_class=2)
    return tmp_path


def _table(text: str, title: str) -> list[list[str]]:
    """The cells of the Markdown table under `title` (its header row first)."""
    lines = text.splitlines()
    start = lines.index(title) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return [rows[0]] + rows[2:]  # without the alignment row


def test_vtab_table_has_every_task_the_group_means_and_the_mean(vtab_logdir):
    from bit_common import vtab

    text = results.tables(results.collect(vtab_logdir))
    table = _table(text, "VTAB-1k: BiT-M-R152x4, fine-tuned")
    assert table[0] == ["Task", "Group", "Jax", "PyTorch"]
    rows = {row[0]: row[1:] for row in table[1:]}
    assert list(rows)[:19] == list(vtab.TASKS)
    medians = {}
    for i, (task, t) in enumerate(vtab.TASKS.items()):
        runs = [100 * _vtab_value(i, r, "pytorch") for r in range(3)]
        medians[task] = runs[1]
        jax = f"{100 * _vtab_value(i, 0, 'jax'):.1f}" if t.group == "natural" else "–"
        assert rows[task] == [t.group, jax, f"{runs[0]:.1f} ← {runs[1]:.1f} → {runs[2]:.1f}"]
    for group in vtab.GROUPS:
        names = [n for n, t in vtab.TASKS.items() if t.group == group]
        mean = np.mean([medians[n] for n in names])
        jax = [100 * _vtab_value(list(vtab.TASKS).index(n), 0, "jax") for n in names]
        jax = f"{np.mean(jax):.2f}" if group == "natural" else "–"
        assert rows[f"**{group}**"] == [f"mean of {len(names)}", jax, f"{mean:.2f}"]
    assert rows["**all**"] == ["mean of 19", "–", f"{np.mean(list(medians.values())):.2f}"]


def test_released_vtab_files_scored_with_steps_0_are_one_model_of_their_own(vtab_logdir):
    text = results.tables(results.collect(vtab_logdir))
    table = _table(text, "VTAB-1k: vtab/BiT-M-R152x4, evaluated as released (--steps 0)")
    rows = {row[0]: row[1:] for row in table[1:]}
    assert table[0] == ["Task", "Group", "TF2"]
    assert rows["clevr-count"] == ["structured", "80.0 ← 85.0 → 90.0"]
    assert rows["dtd"] == ["natural", "–"] and rows["**structured**"] == ["mean of 8", "–"]
    # The CIFAR run and the few-shot VTAB run are in the ordinary table, no VTAB run is.
    ordinary = _table(text, "BiT-M-R152x4")
    assert ordinary[1:] == [["cifar10", "full", "97.0"], ["vtab/dtd", "2", "33.0"]]
    assert text.index("| cifar10 |") < text.index("VTAB-1k: ")


def test_results_cli_prints_the_vtab_tables(vtab_logdir, capsys):
    assert results.main([str(vtab_logdir)]) == 0
    out = capsys.readouterr().out
    assert "VTAB-1k: BiT-M-R152x4, fine-tuned" in out and "| **all** | mean of 19 |" in out


def test_reproduce_lists_the_vtab_rows():
    from bit_common import vtab

    jobs = [j for j in reproduce.jobs() if j.table == "VTAB-1k"]
    parser = cli.build_parser("jax")
    tuned, scored = [j for j in jobs if not j.eval_only], [j for j in jobs if j.eval_only]
    # 2 models x 19 tasks x 3 runs x 3 frameworks, fine-tuned and scored as released.
    assert len(tuned) == len(scored) == 2 * 19 * 3 * 3
    assert len({j.name for j in jobs}) == len(jobs)
    for job in jobs:
        args = parser.parse_args(job.argv("runs", "weights", "data")[3:])
        cli.check_args(args)
        assert args.dataset.removeprefix("vtab/") in vtab.TASKS
        if job.eval_only:
            assert args.steps == 0 and args.model.startswith("vtab/BiT-M-")
            assert args.model.endswith("-" + args.dataset.removeprefix("vtab/"))
        else:
            assert args.steps is None and args.model in reproduce.VTAB_MODELS
            assert (args.batch, args.base_lr) == (512, 0.003)  # BiT-HyperRule's
    assert {(j.framework, j.flags[1]) for j in scored if "clevr-count" in j.name} == {
        (fw, f"vtab/{m}-run{r}-clevr-count") for fw in ("tf2", "jax", "pytorch")
        for m in ("BiT-M-R152x4", "BiT-M-R101x3") for r in range(3)}


def test_reproduce_prints_the_vtab_commands_and_skips_finished_evaluations(tmp_path, capsys,
                                                                          monkeypatch):
    calls = []
    monkeypatch.setattr(reproduce.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    name = "BiT-M-R101x3-vtab-dtd-run2-released-pytorch"
    assert reproduce.main(["--only", name]) == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("python -m")]
    assert lines == [f"python -m bit_pytorch.train --name {name} --logdir runs/reproduce "
                     f"--bit_pretrained_dir weights --datadir data --model "
                     f"vtab/BiT-M-R101x3-run2-dtd --dataset vtab/dtd --steps 0"]
    assert "VTAB-1k" not in out.splitlines()[-1]  # VTAB-1k has its commands now
    _hand_made_run(tmp_path, name, 0.7, steps=0, model="vtab/BiT-M-R101x3-run2-dtd",
                   dataset="vtab/dtd", framework="pytorch")  # evaluated: no model.npz needed
    tuned = "BiT-M-R101x3-vtab-dtd-run2-pytorch"
    _hand_made_run(tmp_path, tuned, 0.7, model="BiT-M-R101x3", dataset="vtab/dtd",
                   framework="pytorch")  # no model.npz: not finished
    only = "BiT-M-R101x3-vtab-dtd-run2"
    assert reproduce.main(["--only", only, "--run", "--logdir", str(tmp_path)]) == 0
    everything = {j.name for j in reproduce.jobs() if only in j.name}
    assert len(everything) == 6  # fine-tuned and released, three frameworks
    assert {c[c.index("--name") + 1] for c in calls} == everything - {name}
    assert "VTAB-1k: vtab/BiT-M-R101x3, evaluated as released (--steps 0)" in \
        capsys.readouterr().out


def test_reproduce_lists_the_distilled_students():
    jobs = [j for j in reproduce.jobs() if j.table == "Distillation"]
    assert {(j.framework, j.flags[j.flags.index("--resolution") + 1]) for j in jobs} == {
        (fw, res) for fw in ("tf2", "jax", "pytorch") for res in ("224", "160")}
    parser = distill.build_parser("jax")
    for job in jobs:
        argv = job.argv("runs", "weights", "data")
        assert argv[2] == f"bit_{job.framework}.distill"
        args = parser.parse_args(argv[3:])
        distill.check_args(args)
        assert (args.teacher, args.student, args.dataset) == (
            "distill/R152x2_T_224", "R50x1", "imagenet2012")
        assert (args.base_lr, args.batch, args.warmup_steps) == (0.03, 4096, 5000)


def test_distillation_runs_get_their_own_table(tmp_path, capsys, logdir):
    from test_common_distill import Numpy as NumpyDistill

    from bit_common import checkpoint
    teacher = checkpoint.write_random_checkpoint(tmp_path / "t.npz", "R50x1", 10, seed=5)
    for res in (16, 24):
        assert distill.main(NumpyDistill, [
            "--teacher", str(teacher), "--student", "R50x1", "--name", f"d{res}", "--logdir",
            str(tmp_path / "runs"), "--dataset", "digits", "--batch", "32", "--base_lr", "0.01",
            "--warmup_steps", "1", "--schedule_steps", "4", "--resolution", str(res),
            "--no-save"]) == 0
    found = results.collect_distill(tmp_path / "runs")
    assert sorted(r.resolution for r in found) == [16, 24]
    assert not results.collect(tmp_path / "runs")  # not fine-tuning runs
    table = results.distill_tables(found)
    assert table.startswith(f"Distillation: {teacher} into R50x1 on digits (teacher top-1 ")
    rows = [line for line in table.splitlines() if line.endswith(" |") and "px" in line]
    assert len(rows) == 2 and rows[0].startswith("| 16 px | ")
    r16 = next(r for r in found if r.resolution == 16)
    assert f"{r16.top1:.1f} ({r16.agree_top1:.1f})" in rows[0]
    capsys.readouterr()
    assert results.main([str(tmp_path / "runs")]) == 0
    assert "Distillation:" in capsys.readouterr().out
