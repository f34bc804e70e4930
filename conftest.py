"""Fixtures shared by every test module: seeded random checkpoints in the released layout."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

from bit_common import runtime

# One JAX persistent compilation cache for the whole test run (never the user's ~/.cache): made
# by the first process (the xdist controller, or pytest without workers), inherited through the
# environment by the workers and by the CLI runs the tests start, and removed by its maker at
# exit. Every program is written, however quickly it compiled, so each compiles once per run.
_CACHE_ENV = "BIT_TEST_JAX_CACHE"
if _CACHE_ENV not in os.environ:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="bit_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_ENV]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"



def pytest_configure(config):
    """The process-wide settings of the three CLIs, before any test module imports a framework
    (configure also imports torchvision before tensorflow, which the suite imports side by
    side); not in an xdist controller, which runs no test."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    runtime.configure(["pytorch", "jax", "tf2"])


from bit_common import checkpoint
from bit_common.registry import parse_arch
from bit_common.runlog import read_metrics


@pytest.fixture(scope="module")
def one_torch_thread():
    """PyTorch on one thread for a test module (`pytestmark = usefixtures(...)`): on a shared
    2-core machine OpenMP's spinning threads make a contended run many times slower, and one
    thread is fast and deterministic whatever else runs."""
    import torch  # here, not at the top: a JAX- or TF-only test session need not load torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    """A folder usable as --bit_pretrained_dir (files are added by the fixtures below)."""
    return tmp_path_factory.mktemp("bit_weights")


@pytest.fixture(scope="session")
def r50_npz(ckpt_dir):
    """A seeded random R50x1 checkpoint with a 10-way head, named like the released file."""
    path = ckpt_dir / "BiT-M-R50x1.npz"
    if not path.exists():
        # The name says 21843 classes; the file's own head is 10-way, which fine-tuning replaces.
        checkpoint.write_random_checkpoint(path, parse_arch("R50x1"), num_classes=10, seed=0)
    return path


@pytest.fixture(scope="session")
def r50_params(r50_npz):
    """The canonical parameters of `r50_npz`."""
    return checkpoint.read_npz(r50_npz)


@pytest.fixture(scope="session")
def tame_npz(tmp_path_factory, r50_params):
    """`r50_npz` with every residual branch scaled by 0.2 (its last group norm's gamma and beta:
    ReLU and the convolution after it are positively homogeneous), in a
    folder of its own, for comparing mixed precision with float32.

    A random network this deep is chaotic, and rounding errors grow through its depth: in
    PyTorch, bfloat16 autocast moves `r50_npz`'s gradient on a batch of noise images by 96 %
    (relative L2) against float32's, and this network's by 27 %, where each branch is small
    beside the residual stream.
    """
    params = {k: v * np.float32(0.2) if "/c/group_norm/" in k else v
              for k, v in r50_params.items()}
    path = tmp_path_factory.mktemp("tame_weights") / "BiT-M-R50x1.npz"
    checkpoint.save_params(params, path)
    return path


def random_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """float32 NHWC images in [-1, 1], as every framework's `predict` takes them."""
    return np.random.default_rng(seed).uniform(-1, 1, (n, h, w, 3)).astype(np.float32)


@pytest.fixture
def images():
    return random_images


def pooled_pre_logits(block4: np.ndarray, params: dict) -> np.ndarray:
    """relu(group_norm(block4)) mean-pooled over H and W, in float64 numpy with the head's group
    norm from `params` (32 groups, eps 1e-5, biased variance): `embed` recomputed from the
    `block4` output of `features`."""
    n, h, w, c = block4.shape
    g = block4.astype(np.float64).reshape(n, h * w, 32, c // 32)
    normed = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(
        g.var(axis=(1, 3), keepdims=True) + 1e-5)
    y = normed.reshape(n, h, w, c) * params[f"{checkpoint.PREFIX}group_norm/gamma"] \
        + params[f"{checkpoint.PREFIX}group_norm/beta"]
    return np.maximum(y, 0).mean(axis=(1, 2))


# Tolerance of `update_difference` for steps that must agree. Measured on the tests' input (R50x1,
# 32 px, batch 8): float32 against float64 PyTorch, and one CPU's kernels against another's, differ
# by 1.5-3 % (block 4 has 1x1 maps there, and one ReLU input within 1e-5 of zero flips), while
# leaving out one of 4 micro-batches moves the update by 43-54 % and a wrong scale by 75 % or more.
UPDATE_TOLERANCE = 0.1
# A mixed-precision update against float32's (`update_difference`, on `tame_npz`). Measured on the
# first digits batch of the tests: bf16 17-20 % and fp16 6.4-6.7 % in all three frameworks alike
# (27 % for bf16 on noise images); a gradient left scaled, or a micro-batch missed or counted
# twice, gives 50 % or more.
MIXED_UPDATE_TOLERANCE = {"bf16": 0.3, "fp16": 0.15}


def checkpoint_difference(a_path, b_path) -> float:
    """The largest absolute difference between two run checkpoints' arrays (their config
    aside), which must hold the same keys."""
    with np.load(a_path) as a, np.load(b_path) as b:
        assert sorted(a.files) == sorted(b.files)
        return max(float(np.abs(a[k] - b[k]).max()) for k in a.files if k != "meta/config")


def update_difference(a: dict, b: dict, start: dict, prefix: str) -> float:
    """Relative L2 difference of two updates (a - start, b - start) over all arrays at once.

    Steps that must agree (a batch split, two replicas) are compared this way and held to
    UPDATE_TOLERANCE: another batch size gives other float32 rounding, and at test sizes a ReLU
    input near zero that flips moves the whole update by a few percent, while accumulation errors
    (a micro-batch missed or counted twice, a wrong scale) move it by 40 % or more.
    """
    keys = [k for k in start if k.startswith(prefix)]
    da = np.concatenate([(a[k] - start[k]).ravel() for k in keys])
    db = np.concatenate([(b[k] - start[k]).ravel() for k in keys])
    return float(np.linalg.norm(da - db) / np.linalg.norm(da))


def run_setup(framework: str, *flags: str, params: dict | None = None):
    """The run's set-up as `python -m bit_<framework>.train` makes it (`loop.make_setup`) from
    `--name x --model BiT-M-R50x1 --logdir unused --dataset digits` and `flags` (later flags
    win); `params` replace the weights file."""
    import importlib

    from bit_common import cli, loop

    args = cli.build_parser(framework).parse_args(
        ["--name", "x", "--model", "BiT-M-R50x1", "--logdir", "unused", "--dataset", "digits",
         *flags])
    fw = importlib.import_module(f"bit_{framework}.train").FRAMEWORK
    return loop.make_setup(args, fw, params=params)


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of a run folder's event files as TensorBoard's own reader
    loads them: every file in name order, a resumed run's purge applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def metrics_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl in the same form: each field of a record as `<type>/<field>`, its value
    rounded to float32 as event files store it."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in read_metrics(run_dir / "metrics.jsonl"):
        for k, v in r.items():
            if k not in ("type", "step", "time"):
                out.setdefault(f"{r['type']}/{k}", []).append((r["step"], float(np.float32(v))))
    return out
