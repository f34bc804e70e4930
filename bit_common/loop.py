"""The training loop, shared by the three `train` modules: the run's set-up and its control flow.

A framework package supplies a `Framework` (joining a multi-process run, loading a dataset's two
splits, building a backend) and the `Backend` it builds (batches, optimizer steps, evaluation
sums, state as canonical numpy arrays). Everything else happens here, once: the flags' checks,
`make_setup` (few-shot subset, resolution, weights, input plan, end step), the schedule, the
evaluation and checkpoint cadence, resume, signals, non-finite losses and logging.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from bit_common import checkpoint, cli, hyperrule, registry, runtime, trainable
from bit_common.datasets import (DatasetInfo, Split, first_image_hw, get_dataset,
                                 pillow_image_problem, verify_images)
from bit_common.errors import BiTError, CheckpointError, DataError
from bit_common.fewshot import sample_few_shot
from bit_common.plan import InputPlan
from bit_common.runlog import RunLog, read_metrics
from bit_common.weights import find_or_download

CHECKPOINT = "checkpoint.npz"
FINAL_MODEL = "model.npz"
CONFIG = "config.json"
MOMENTUM_PREFIX = "momentum/"  # checkpoint keys of the momentum buffers: momentum/<canonical key>
# Flags that change what is trained: resuming with other values would silently mix two runs.
RESUME_KEYS = ("model", "dataset", "examples_per_class", "examples_per_class_seed", "batch",
               "base_lr", "schedule_steps", "seed", "resolution", "augment", "train")


def join_state(params: Mapping[str, np.ndarray], momentum: Mapping[str, np.ndarray]
               ) -> dict[str, np.ndarray]:
    """One checkpoint state from canonical params and momentum buffers (same keys)."""
    return {**params, **{MOMENTUM_PREFIX + k: v for k, v in momentum.items()}}


def split_state(state: Mapping[str, np.ndarray], arch: registry.Arch, num_classes: int
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(params, momentum) of a checkpoint state, both validated against the architecture."""
    params = {k: v for k, v in state.items() if k.startswith(checkpoint.PREFIX)}
    momentum = {k[len(MOMENTUM_PREFIX):]: v for k, v in state.items()
                if k.startswith(MOMENTUM_PREFIX)}
    checkpoint.validate(params, arch, num_classes, source="The run folder's checkpoint")
    checkpoint.validate(momentum, arch, num_classes,
                        source="The momentum buffers of the run folder's checkpoint")
    return params, momentum


def eval_metrics(sums: np.ndarray) -> dict[str, float]:
    """top1, top5 and mean loss from a backend's `eval_sums` (hits, hits, loss sum, count)."""
    top1, top5, loss, count = (float(v) for v in np.asarray(sums, np.float64))
    count = max(count, 1.0)
    return {"top1": top1 / count, "top5": top5 / count, "loss": loss / count}


# ---- the run's set-up ----------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    """The flags a framework package reads (checked by the shared code first)."""

    batch: int
    batch_split: int
    batch_eval: int
    workers: int
    precision: str
    datadir: str | None = None
    tfds_manual_dir: str | None = None
    skip_bad_images: bool = False
    train: str = "all"  # --train: which parameters are fine-tuned (bit_common.trainable)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        # A command without a flag (distill has no --train) takes the field's default.
        return cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)})


@dataclass
class RunSetup:
    """Everything a backend needs, decided by the shared code (`make_setup`)."""

    config: RunConfig
    dataset: DatasetInfo
    train: Split                # the full training split (labels always; images or paths maybe)
    eval: Split                 # the evaluation split
    train_indices: np.ndarray   # few-shot subset (indices into `train`), or all of it
    num_classes: int
    arch: registry.Arch
    params: dict[str, np.ndarray]  # canonical: the checkpoint's, its head replaced by zeros
                                   # (kept with --steps 0, which evaluates it: see eval_only)
    plan: InputPlan
    end_step: int               # the run stops after this many optimizer steps

    @property
    def eval_only(self) -> bool:
        """--steps 0: the checkpoint is evaluated with its own head, nothing is trained."""
        return self.end_step == 0

    @property
    def resize(self) -> int:
        return self.plan.resize

    @property
    def crop(self) -> int:
        return self.plan.crop


class Backend(ABC):
    """One framework's model, optimizer and input pipeline, as the shared loop drives them."""

    is_chief: bool = True  # writes logs and checkpoints (rank 0 of a multi-process run)

    @abstractmethod
    def train_batches(self, start_step: int) -> Iterator[tuple[int, Any]]:
        """(step, batch) for steps start_step, start_step + 1, ... (from `plan.batch_plan`)."""

    @abstractmethod
    def train_step(self, batch: Any, lr: float) -> float:
        """One optimizer step (hyperrule.MOMENTUM, mixup per the batch's plan); the loss."""

    @abstractmethod
    def eval_sums(self) -> np.ndarray:
        """[top-1 hits, top-5 hits, summed cross-entropy, examples] over the whole evaluation
        split, summed over every process."""

    @abstractmethod
    def get_state(self) -> dict[str, np.ndarray]:
        """Canonical params plus `momentum/<canonical key>` momentum buffers."""

    @abstractmethod
    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Inverse of get_state."""

    def agree(self, flag: bool) -> bool:
        """True if any process has `flag` set (multi-process runs must stop together)."""
        return flag


class Framework(ABC):
    """What each `bit_<framework>.train` module hands to `main`. Building it imports nothing
    heavy: the framework is imported by the methods, after `runtime.configure`."""

    name: str  # "pytorch", "jax" or "tf2"

    def start(self, config: RunConfig) -> int:
        """Join a multi-process run where the environment describes one (before any data);
        the number of processes of the run (1 when it is not multi-process)."""
        return 1

    def stop(self) -> None:
        """Leave the multi-process run `start` joined."""

    @abstractmethod
    def load_splits(self, config: RunConfig, info: DatasetInfo) -> tuple[Split, Split]:
        """The training and the evaluation split of a dataset (same class names)."""

    @abstractmethod
    def make_backend(self, setup: RunSetup) -> Backend:
        """The backend that trains `setup`."""

    def make_distiller(self, setup: Any) -> Backend:
        """The backend that distils `setup` (a `bit_common.distill.DistillSetup`)."""
        raise BiTError(f"{self.name} has no distillation backend.")

    def image_problem(self, path: str) -> str | None:
        """Why the image file at `path` does not decode in this framework's pipeline, or None
        (--verify_images); the default decodes with Pillow."""
        return pillow_image_problem(path)


class PackageFramework(Framework):
    """A framework package laid out as the three are: `bit_<name>.data.load_splits`, and
    `bit_<name>.backend` with `init_distributed`, `finish_distributed` and the backend class,
    and `bit_<name>.distiller.Distiller`; each module is imported on first use."""

    def __init__(self, name: str, backend_class: str):
        self.name, self._backend_class = name, backend_class
        self._started = False

    def _module(self, module: str) -> Any:
        return importlib.import_module(f"bit_{self.name}.{module}")

    def start(self, config: RunConfig) -> int:
        processes = self._module("backend").init_distributed()
        self._started = True
        return processes

    def stop(self) -> None:
        if self._started:
            self._module("backend").finish_distributed()
            self._started = False

    def load_splits(self, config: RunConfig, info: DatasetInfo) -> tuple[Split, Split]:
        return self._module("data").load_splits(config, info)

    def make_backend(self, setup: RunSetup) -> Backend:
        return getattr(self._module("backend"), self._backend_class)(setup)

    def make_distiller(self, setup: Any) -> Backend:
        return self._module("distiller").Distiller(setup)

    def image_problem(self, path: str) -> str | None:
        return self._module("data").image_problem(path)


def check_flags(args: argparse.Namespace) -> tuple[registry.ModelInfo, DatasetInfo]:
    """Every check of the flags that needs no file and no framework: (model, dataset)."""
    cli.check_args(args)
    model = registry.get_model(args.model)
    info = get_dataset(args.dataset)
    if info.needs_datadir and not args.datadir:
        raise DataError(f"--dataset {args.dataset} needs --datadir (the folder holding "
                        f"train/<class>/ and val/<class>/).")
    return model, info


def load_splits(args: argparse.Namespace, framework: Framework, config: RunConfig,
                info: DatasetInfo) -> tuple[Split, Split]:
    """Both splits of the dataset, every image file decoded first with --verify_images or
    --skip_bad_images (the latter leaving out those that do not decode)."""
    train, evaluation = framework.load_splits(config, info)
    if args.verify_images or args.skip_bad_images:
        train, evaluation = (
            verify_images(split, framework.image_problem, args.skip_bad_images, what,
                          threads=max(1, args.workers))
            for split, what in ((train, "training"), (evaluation, "evaluation")))
    return train, evaluation


def make_setup(args: argparse.Namespace, framework: Framework,
               params: Mapping[str, np.ndarray] | None = None) -> RunSetup:
    """The whole run, decided once from the flags: both splits (loaded now, so that a broken
    evaluation split fails before the first step), the few-shot subset, the resolution, the
    checkpoint of --model with a zero head (its own head with --steps 0, which must fit the
    dataset), the input plan and the end step.

    `params` (canonical) replace the checkpoint file and are kept as they are, head included;
    the bench and the tests start from random ones.
    """
    model, info = check_flags(args)
    weights = None if params is not None else find_or_download(args.model,
                                                                args.bit_pretrained_dir)
    config = RunConfig.from_args(args)
    train, evaluation = load_splits(args, framework, config, info)
    num_classes = info.num_classes or len(train.class_names)
    if args.examples_per_class:
        indices = sample_few_shot(train.labels, args.examples_per_class,
                                  args.examples_per_class_seed)
    else:
        indices = np.arange(len(train), dtype=np.int64)
    n = len(indices)
    if args.resolution:
        resize, crop = args.resolution
    else:
        resize, crop = hyperrule.get_resolution(info.image_hw or first_image_hw(train))
    if weights is not None:
        arch, params = checkpoint.load_params(weights, expected=model.arch, num_classes=(
            None if args.steps == 0 else num_classes))
        if args.steps == 0:
            _check_own_head(params, num_classes, args)
    else:
        arch, params = model.arch, dict(params)
        checkpoint.validate(params, arch, num_classes, source="The given parameters")
    plan = InputPlan(n, args.batch, resize, crop, seed=args.seed,
                     mixup_alpha=hyperrule.get_mixup(n), augment=args.augment,
                     random_flip=info.flip_keeps_label, random_crop=info.crop_keeps_label)
    total = hyperrule.total_steps(n, args.schedule_steps)
    end = total if args.steps is None else min(args.steps, total)
    return RunSetup(config, info, train, evaluation, indices, num_classes, arch, params, plan,
                    end)


def _check_own_head(params: Mapping[str, np.ndarray], num_classes: int,
                    args: argparse.Namespace) -> None:
    """--steps 0 scores the checkpoint's own head, so it must have the dataset's classes."""
    head = int(params[checkpoint.HEAD_BIAS].shape[0])
    if head != num_classes:
        raise CheckpointError(
            f"--steps 0 evaluates --model {args.model} with its own head, which has {head} "
            f"classes, but --dataset {args.dataset} has {num_classes}. Evaluate a model "
            f"fine-tuned on this dataset (for vtab/<task>: vtab/BiT-M-<arch>-run<r>-<task>), or "
            f"fine-tune first (leave out --steps, or give it 1 or more).")


# ---- what a command trains -------------------------------------------------------------------
class Recipe:
    """What one command of the shared loop trains: its flags, the run's set-up and backend, the
    learning rate of each step, its evaluation metrics and what its run folder records. This one
    is `train`'s (BiT-HyperRule fine-tuning); `bit_common.distill` has distillation's."""

    command = "train"
    resume_keys: tuple[str, ...] = RESUME_KEYS

    def parser(self, framework: str) -> argparse.ArgumentParser:
        return cli.build_parser(framework)

    def check_flags(self, args: argparse.Namespace) -> None:
        check_flags(args)

    def make_setup(self, args: argparse.Namespace, framework: Framework) -> Any:
        return make_setup(args, framework)

    def make_backend(self, framework: Framework, setup: Any) -> Backend:
        return framework.make_backend(setup)

    def lr(self, args: argparse.Namespace, setup: Any, step: int) -> float:
        return hyperrule.get_lr(step, setup.plan.num_examples, args.base_lr, args.schedule_steps)

    def describe(self, args: argparse.Namespace, setup: Any, framework: str, start: int) -> str:
        """The run's first log line."""
        n, end = setup.plan.num_examples, setup.end_step
        return (f"{framework}: {args.model} ({setup.arch.name}) on {args.dataset}, "
                f"{n} training examples, {setup.num_classes} classes, {setup.resize}->"
                f"{setup.crop} px, mixup {setup.plan.mixup_alpha}, steps {start}->{end} of "
                f"{hyperrule.total_steps(n, args.schedule_steps)}, schedule (warm-up, decays, "
                f"end) {list(hyperrule.get_schedule(n, args.schedule_steps))}"
                + (f" (--schedule_steps {args.schedule_steps})" if args.schedule_steps else "")
                + (" (resumed)" if start else "")
                + ("" if args.train == "all" else f"; {trainable.describe(args.train)}"))

    def eval_metrics(self, sums: np.ndarray) -> dict[str, float]:
        return eval_metrics(sums)

    def run_config(self, args: argparse.Namespace, setup: Any) -> dict[str, Any]:
        """What config.json records beyond the flags and the framework."""
        return {"arch": setup.arch.name, "num_classes": setup.num_classes,
                "num_train_examples": setup.plan.num_examples,
                "resize": setup.resize, "crop": setup.crop,
                "mixup_alpha": setup.plan.mixup_alpha,
                # The few-shot subset (indices into the training split), so runs can be compared.
                "few_shot_indices": (setup.train_indices.tolist() if args.examples_per_class
                                     else None)}


FINE_TUNE = Recipe()


# ---- the command ---------------------------------------------------------------------------
def main(framework: Framework, argv: list[str] | None = None, recipe: Recipe = FINE_TUNE) -> int:
    """Parse the command's flags and train; a BiTError becomes a one-paragraph message and
    exit 2."""
    args = recipe.parser(framework.name).parse_args(argv)
    try:
        recipe.check_flags(args)
        runtime.configure(framework.name, precision=args.precision)
        processes = framework.start(RunConfig.from_args(args))
        try:
            return Trainer(args, framework, recipe).run()
        except BaseException as e:
            if processes > 1:
                _end_multi_process(e)  # os._exit: the `finally` does not leave the run
            raise
        finally:
            framework.stop()
    except BiTError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def _end_multi_process(e: BaseException) -> NoReturn:
    """End a failed process of a multi-process run without leaving the run: the frameworks'
    leaving waits for every process (JAX's for minutes, then aborts), and the others are either
    lost or waiting in a collective, which they give up when this process is gone."""
    if isinstance(e, BiTError):
        exit_at_once(f"error: {e}")
    traceback.print_exception(e)
    exit_at_once(f"error: this process of a multi-process run failed ({type(e).__name__}).", 1)


def exit_at_once(message: str, code: int = 2) -> NoReturn:
    """Print `message` and end the process now: after a process of a multi-process run is lost,
    the frameworks' own shutdown would wait for it (JAX's for minutes, then aborts)."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


class Trainer:
    def __init__(self, args: argparse.Namespace, framework: Framework,
                 recipe: Recipe = FINE_TUNE):
        self.args, self.framework, self.recipe = args, framework, recipe
        self.stop_signal: int | None = None

    # ---- set-up: everything is validated before the run folder is touched ----------------
    def run(self) -> int:
        args = self.args
        run_dir = Path(args.logdir) / args.name
        _check_writable(Path(args.logdir))
        if args.steps == 0:
            _check_eval_only_folder(run_dir)
        resume = self._read_checkpoint(run_dir) if args.save and args.steps != 0 else None
        setup = self.recipe.make_setup(args, self.framework)
        backend = self.recipe.make_backend(self.framework, setup)
        start = 0
        if resume is not None:
            start = int(resume.pop("meta/step"))
            resume.pop("meta/config")
            backend.set_state(resume)
        _check_all_resume(backend, run_dir, start)
        # The first batch before the run folder: an image that does not decode there (the
        # common case: few-shot runs touch most files in their first steps) writes nothing.
        batches = _prefetched(backend.train_batches(start)) if start < setup.end_step else None
        run_dir_or_none = run_dir if backend.is_chief else None
        if run_dir_or_none:
            run_dir.mkdir(parents=True, exist_ok=True)
            for stale in checkpoint.remove_stale_temporaries(run_dir):
                print(f"Removed {stale}, left by a write that was interrupted.")
            self._write_config(run_dir, setup)
        log = RunLog(run_dir_or_none, resume_step=start, echo=backend.is_chief)
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._train(backend, batches, setup, log, run_dir, start)
        finally:
            log.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _read_checkpoint(self, run_dir: Path) -> dict[str, np.ndarray] | None:
        path = run_dir / CHECKPOINT
        if not path.exists():
            return None
        keep = ("It is left untouched: move it away to start this run afresh, or use another "
                "--name.")
        try:
            with np.load(path, allow_pickle=False) as f:
                state = {k: f[k] for k in f.files}
        except Exception as e:  # any unreadable file: explain, never overwrite
            raise CheckpointError(f"The run folder's checkpoint {path} "
                                  f"{checkpoint.npz_problem(path, e)}. {keep}") from None
        try:
            saved = json.loads(str(state["meta/config"]))
            int(state["meta/step"])
        except Exception as e:  # a foreign .npz
            raise CheckpointError(
                f"The run folder's checkpoint {path} cannot be resumed from ({type(e).__name__}: "
                f"{e}): it is not a checkpoint this project wrote. {keep}") from None
        now = self._resume_config()
        # A key the checkpoint lacks (written before the flag existed) had the flag's default.
        parser = self.recipe.parser(self.framework.name)
        saved = {k: saved.get(k, parser.get_default(k)) for k in now}
        diff = {k: (saved[k], now[k]) for k in now if saved[k] != now[k]}
        if diff:
            desc = ", ".join(f"--{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(
                f"{path} belongs to a run with other settings ({desc}). Use another --name, or "
                f"the original flags to resume it.")
        return state

    # ---- the loop ----------------------------------------------------------------------
    def _train(self, backend: Backend, batches: Iterator[tuple[int, Any]] | None,
               setup: RunSetup, log: RunLog, run_dir: Path, start: int) -> int:
        args, end, recipe = self.args, setup.end_step, self.recipe
        if getattr(setup, "eval_only", False):
            log.info(f"{self.framework.name}: evaluating {args.model} ({setup.arch.name}, its "
                     f"own {setup.num_classes}-class head) on {len(setup.eval)} {args.dataset} "
                     f"examples at {setup.crop} px (--steps 0: no training, no checkpoint).")
            log.eval(0, **recipe.eval_metrics(backend.eval_sums()))
            return 0
        if start >= end:
            log.info(f"Run {run_dir} already reached step {start}; nothing to do.")
            return 0
        log.info(recipe.describe(args, setup, self.framework.name, start))
        save_every = args.save_every or args.eval_every
        self._install_signal_handlers()
        for step in range(start, end):
            lr = recipe.lr(args, setup, step)
            got, batch = next(batches)
            if got != step:
                raise BiTError(f"The input pipeline produced the batch of step {got} where "
                               f"step {step} was expected.")
            t0 = time.perf_counter()
            loss = backend.train_step(batch, lr)
            step_s = time.perf_counter() - t0
            done = step + 1
            if not math.isfinite(loss):
                raise BiTError(
                    f"The training loss became {loss} at step {done} (lr {lr:.3g}). Training "
                    f"stopped; the last good checkpoint in {run_dir} is kept. Lower --base_lr or "
                    f"check the data.")
            log.train(done, loss, lr, args.batch, step_s, end)
            last = done == end
            if (args.eval_every and done % args.eval_every == 0) or last:
                log.eval(done, **recipe.eval_metrics(backend.eval_sums()))
            stop = backend.agree(self.stop_signal is not None)
            if args.save and (last or stop or (save_every and done % save_every == 0)):
                self._save(backend, run_dir, done, final=last)
            if stop and not last:
                log.info(f"Stopped by signal after step {done}; checkpoint in {run_dir}. Run "
                         f"the same command again to resume.")
                return 0
        log.info(f"Done: {end} steps. " + (f"Final model: {run_dir / FINAL_MODEL}"
                                           if args.save else "(--no-save: nothing written)"))
        return 0

    def _save(self, backend: Backend, run_dir: Path, step: int, final: bool) -> None:
        state = backend.get_state()
        if not backend.is_chief:
            return
        state["meta/step"] = np.asarray(step, np.int64)
        state["meta/config"] = np.asarray(json.dumps(self._resume_config()))
        try:
            checkpoint.atomic_savez(run_dir / CHECKPOINT, state)
            if final:
                checkpoint.save_params({k: v for k, v in state.items()
                                        if k.startswith(checkpoint.PREFIX)},
                                       run_dir / FINAL_MODEL)
        except OSError as e:
            raise BiTError(f"Could not write the checkpoint of step {step} to {run_dir} "
                           f"({e.strerror or e}). The previous checkpoint there is intact; free "
                           f"space or fix the folder, then run the same command to resume.") from None

    def _resume_config(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in ((k, getattr(self.args, k)) for k in self.recipe.resume_keys)}

    def _write_config(self, run_dir: Path, setup: Any) -> None:
        config = {**vars(self.args), "framework": self.framework.name,
                  "command": self.recipe.command, **self.recipe.run_config(self.args, setup),
                  "hardware": {"machine": platform.machine(), "processor": platform.processor(),
                               "cpus": os.cpu_count(), "python": platform.python_version()}}
        (run_dir / CONFIG).write_text(json.dumps(config, indent=2, default=str))

    def _install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            self.stop_signal = signum
            signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)


def _prefetched(it: Iterator[Any]) -> Iterator[Any]:
    """`it` with its first item already taken (errors in making it raised now)."""
    first = next(it)

    def chained() -> Iterator[Any]:
        yield first
        yield from it

    return chained()


def _check_all_resume(backend: Backend, run_dir: Path, start: int) -> None:
    """Every process of a multi-process run resumes, or none does: a --logdir that is not shared
    would have the others start afresh beside a resumed process 0."""
    some, not_all = backend.agree(start > 0), backend.agree(start == 0)
    if some and not_all:
        raise BiTError(
            f"Some processes of this multi-process run found a checkpoint in {run_dir} and others "
            f"did not, so they cannot resume together. --logdir must name a folder that every "
            f"process sees (a shared file system), with the same contents.")


def _check_eval_only_folder(run_dir: Path) -> None:
    """--steps 0 never writes into a training run's folder (its log would lose the run's
    records, which a fresh run's log drops after the step it starts from)."""
    trained = (run_dir / CHECKPOINT).exists() or any(
        r.get("step", 0) > 0 for r in read_metrics(run_dir / "metrics.jsonl"))
    if trained:
        raise BiTError(f"--steps 0 (evaluation only) was given the folder of a training run, "
                       f"{run_dir}, which it would overwrite. Use another --name.")


def _check_writable(logdir: Path) -> None:
    try:
        logdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BiTError(f"Cannot create --logdir {logdir} ({e.strerror}). Choose a folder you "
                       f"can write to.") from None
    if not os.access(logdir, os.W_OK | os.X_OK):
        raise BiTError(f"--logdir {logdir} is not writable. Choose a folder you can write to, "
                       f"or fix its permissions.")
