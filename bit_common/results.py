"""Turn runs into the README's tables: `python -m bit_common.results <logdir> [--plot out.png]`.

Each run folder holds config.json and metrics.jsonl; a run's result is its last evaluation's
top-1. Runs are grouped by model, dataset, examples per class and framework, and each group is
shown as `min ← median → max` over its runs (a single run as its value). The plot is the
few-shot figure (top-1 against examples per class) where few-shot runs are found, and otherwise
each run's curves (loss and top-1 against step).

VTAB-1k runs (`--dataset vtab/<task>`, no --examples_per_class) get tables of their own, one per
model and kind (fine-tuned, or evaluated as released with --steps 0): a row per task and a
column per framework, then the three group means and the 19-task mean, each the mean of its
tasks' median top-1 (shown once every task of the group has a run). The released fine-tuned
files `vtab/BiT-M-<arch>-run<r>-<task>` count as one model, `vtab/BiT-M-<arch>`, whose runs
are r = 0, 1, 2.

Distillation runs (`bit_<framework>.distill`, config.json's `command`) get one table per
teacher, student and dataset: a row per student resolution, a column per framework, each cell the
student's top-1 and, in parentheses, its top-1 agreement with the teacher (both percent).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bit_common import vtab
from bit_common.runlog import read_metrics

FRAMEWORK_ORDER = ("tf2", "jax", "pytorch")
FRAMEWORK_TITLES = {"tf2": "TF2", "jax": "Jax", "pytorch": "PyTorch"}


@dataclass(frozen=True)
class RunResult:
    model: str
    dataset: str
    examples_per_class: int | None  # None: full data
    framework: str
    top1: float  # percent
    path: Path
    eval_only: bool = False  # --steps 0: the model scored as it is, with its own head

    @property
    def vtab_task(self) -> str | None:
        """The VTAB-1k task of a `vtab/<task>` run on the task's 1000 examples, else None."""
        if self.dataset.startswith(VTAB_PREFIX) and self.examples_per_class is None:
            return self.dataset[len(VTAB_PREFIX):]
        return None

    @property
    def vtab_model(self) -> str:
        """The model's name in the VTAB tables: the released per-task files as one model."""
        released = _RELEASED_VTAB.match(self.model)
        return f"{VTAB_PREFIX}{released['model']}" if released else self.model


VTAB_PREFIX = "vtab/"
_RELEASED_VTAB = re.compile(r"^vtab/(?P<model>.+)-run\d+-[^/]+$")


@dataclass(frozen=True)
class DistillResult:
    teacher: str
    student: str
    dataset: str
    resolution: int       # the student's
    framework: str
    top1: float           # percent, the student's
    agree_top1: float     # percent of evaluation images on whose top-1 class it agrees
    teacher_top1: float   # percent
    path: Path


def _finished_runs(logdir: str | Path) -> Iterator[tuple[Path, dict, dict]]:
    """(run folder, config, last eval record) of every run below `logdir` that evaluated."""
    for config_path in sorted(Path(logdir).rglob("config.json")):
        run_dir = config_path.parent
        evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("type") == "eval"]
        if evals:
            yield run_dir, json.loads(config_path.read_text()), evals[-1]


def collect_distill(logdir: str | Path) -> list[DistillResult]:
    """The last evaluation of every distillation run below `logdir`."""
    return [DistillResult(c["teacher"], c["student"], c["dataset"], c["resolution"],
                          c["framework"], 100.0 * e["top1"], 100.0 * e["agree_top1"],
                          100.0 * e["teacher_top1"], run_dir)
            for run_dir, c, e in _finished_runs(logdir) if c.get("command") == "distill"]


def distill_tables(results: list[DistillResult]) -> str:
    """One Markdown table per teacher, student and dataset: rows the student's resolution,
    columns frameworks, cells `top-1 (agreement)`, each the median over runs."""
    out = []
    for teacher, student, dataset in sorted({(r.teacher, r.student, r.dataset)
                                             for r in results}):
        runs = [r for r in results if (r.teacher, r.student, r.dataset) == (teacher, student,
                                                                            dataset)]
        fws = _frameworks(runs)
        teacher_top1 = float(np.median([r.teacher_top1 for r in runs]))
        out += [f"Distillation: {teacher} into {student} on {dataset} (teacher top-1 "
                f"{teacher_top1:.1f}); student top-1 (agreement with the teacher)", "",
                *_header(["Resolution"], fws)]
        for res in sorted({r.resolution for r in runs}):
            cells = []
            for f in fws:
                cell = [r for r in runs if (r.resolution, r.framework) == (res, f)]
                cells.append(f"{np.median([r.top1 for r in cell]):.1f} "
                             f"({np.median([r.agree_top1 for r in cell]):.1f})" if cell else "–")
            out.append(f"| {res} px | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def collect(logdir: str | Path) -> list[RunResult]:
    """Final top-1 of every finished fine-tuning run found below `logdir`."""
    results = []
    for run_dir, c, last in _finished_runs(logdir):
        if c.get("command", "train") != "train":
            continue
        results.append(RunResult(c["model"], c["dataset"], c.get("examples_per_class"),
                                 c["framework"], 100.0 * last["top1"], run_dir,
                                 eval_only=c.get("steps") == 0))
    return results


def summary(values: list[float]) -> str:
    """`min ← median → max` (one decimal), or the single value."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    v = np.asarray(values)
    return f"{v.min():.1f} ← {np.median(v):.1f} → {v.max():.1f}"


def _frameworks(results: list[RunResult]) -> list[str]:
    """The frameworks of `results`, the README's order first."""
    found = {r.framework for r in results}
    return [f for f in FRAMEWORK_ORDER if f in found] + sorted(found - set(FRAMEWORK_ORDER))


def _header(first: list[str], fws: list[str]) -> list[str]:
    cols = first + [FRAMEWORK_TITLES.get(f, f) for f in fws]
    return ["| " + " | ".join(cols) + " |",
            "| " + " | ".join([":---"] * len(first) + [":---:"] * len(fws)) + " |"]


def tables(results: list[RunResult]) -> str:
    """The README's tables: the VTAB-1k runs' (`vtab_tables`) after all others'."""
    others = [r for r in results if r.vtab_task is None]
    vtab_runs = [r for r in results if r.vtab_task is not None]
    return "\n".join(part for part in (dataset_tables(others), vtab_tables(vtab_runs)) if part)


def vtab_tables(results: list[RunResult]) -> str:
    """One Markdown table per VTAB model and kind: a row per task (its group beside it), then
    the group means and the 19-task mean; columns frameworks. A task without a run shows "–",
    as does a mean that lacks one of its tasks."""
    out = []
    for model, eval_only in sorted({(r.vtab_model, r.eval_only) for r in results}):
        runs = [r for r in results if (r.vtab_model, r.eval_only) == (model, eval_only)]
        fws = _frameworks(runs)
        top1: dict[tuple[str, str], list[float]] = defaultdict(list)
        for r in runs:
            top1[r.vtab_task, r.framework].append(r.top1)
        kind = "evaluated as released (--steps 0)" if eval_only else "fine-tuned"
        out += [f"VTAB-1k: {model}, {kind}", "", *_header(["Task", "Group"], fws)]
        for name, task in vtab.TASKS.items():
            cells = [summary(top1[name, f]) if (name, f) in top1 else "–" for f in fws]
            out.append(f"| {name} | {task.group} | " + " | ".join(cells) + " |")
        means = {f: vtab.group_means({name: float(np.median(top1[name, f]))
                                      for name in vtab.TASKS if (name, f) in top1})
                 for f in fws}
        sizes = {g: sum(t.group == g for t in vtab.TASKS.values()) for g in vtab.GROUPS}
        for key, label, size in [*((g, g, sizes[g]) for g in vtab.GROUPS),
                                 ("mean", "all", len(vtab.TASKS))]:
            cells = [f"{means[f][key]:.2f}" if key in means[f] else "–" for f in fws]
            out.append(f"| **{label}** | mean of {size} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def dataset_tables(results: list[RunResult]) -> str:
    """One Markdown table per model: rows dataset x examples per class, columns frameworks."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in results:
        groups[(r.model, r.dataset, r.examples_per_class, r.framework)].append(r.top1)
    out = []
    for model in sorted({r.model for r in results}):
        fws = [f for f in FRAMEWORK_ORDER if any(r.model == model and r.framework == f
                                                 for r in results)]
        fws += sorted({r.framework for r in results if r.model == model} - set(fws))
        out += [f"{model}", "",
                "| Dataset | Ex/cls | " + " | ".join(FRAMEWORK_TITLES.get(f, f) for f in fws) + " |",
                "| :--- | :---: | " + " | ".join(":---:" for _ in fws) + " |"]
        rows = sorted({(r.dataset, r.examples_per_class) for r in results if r.model == model},
                      key=lambda x: (x[0], x[1] is None, x[1] or 0))
        for ds, k in rows:
            cells = [summary(groups[(model, ds, k, f)]) if groups.get((model, ds, k, f)) else "–"
                     for f in fws]
            out.append(f"| {ds} | {'full' if k is None else k} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def curves(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """A run's curves from its metrics.jsonl, as (steps, values): "train loss", "eval loss"
    and "eval top-1 [%]"."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    return {"train loss": ([r["step"] for r in train], [r["loss"] for r in train]),
            "eval loss": ([r["step"] for r in evals], [r["loss"] for r in evals]),
            "eval top-1 [%]": ([r["step"] for r in evals], [100.0 * r["top1"] for r in evals])}


def plot_curves(run_dirs: list[Path], path: str | Path) -> Path:
    """Loss (left) and top-1 (right) against step, one colour per run, written to `path`."""
    plt = _pyplot()
    fig, (loss_ax, top1_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, run_dir in enumerate(run_dirs):
        c, colour = curves(run_dir), f"C{i % 10}"
        label = Path(run_dir).name
        loss_ax.plot(*c["train loss"], color=colour, lw=1, label=f"{label} train")
        loss_ax.plot(*c["eval loss"], color=colour, ls="--", marker="o", ms=3,
                     label=f"{label} eval")
        top1_ax.plot(*c["eval top-1 [%]"], color=colour, marker="o", ms=3, label=label)
    loss_ax.set(xlabel="step", ylabel="cross-entropy loss", title="loss")
    top1_ax.set(xlabel="step", ylabel="top-1 accuracy [%]", title="evaluation top-1",
                ylim=(0, 100))
    return _save(fig, (loss_ax, top1_ax), bool(run_dirs), path)


def plot(results: list[RunResult], path: str | Path) -> Path:
    """Median top-1 against examples per class, one line per model/dataset/framework (Fig. 1);
    without few-shot runs, every run's curves instead (`plot_curves`)."""
    if all(r.examples_per_class is None for r in results):
        return plot_curves([r.path for r in results], path)
    plt = _pyplot()
    series: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.examples_per_class is not None:
            series[(r.model, r.dataset, r.framework)][r.examples_per_class].append(r.top1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for (model, ds, fw), points in sorted(series.items()):
        ks = sorted(points)
        ax.plot(ks, [np.median(points[k]) for k in ks], marker="o",
                label=f"{model} {ds} ({FRAMEWORK_TITLES.get(fw, fw)})")
    ax.set_xscale("log")
    ax.set_xlabel("examples per class")
    ax.set_ylabel("top-1 accuracy [%]")
    ax.set_title("BiT few-shot transfer")
    return _save(fig, (ax,), bool(series), path)


def _save(fig, axes: tuple, legend: bool, path: str | Path) -> Path:
    """Grid (and legend, when anything is drawn) on every axis; the figure written as a PNG."""
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if legend:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Summarise BiT runs as the README's tables.")
    p.add_argument("logdir")
    p.add_argument("--plot", default=None,
                   help="write a PNG: top-1 against examples per class where there are few-shot "
                        "runs, otherwise each run's loss and top-1 against step")
    args = p.parse_args(argv)
    results, distilled = collect(args.logdir), collect_distill(args.logdir)
    if not results and not distilled:
        print(f"error: no finished runs (config.json + an eval in metrics.jsonl) below "
              f"{args.logdir}.", file=sys.stderr)
        return 2
    print("\n".join(part for part in (tables(results), distill_tables(distilled)) if part))
    if args.plot and results:
        print(f"Plot: {plot(results, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
