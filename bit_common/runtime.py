"""Process-wide settings, applied by one explicit call: `configure(frameworks)`.

Importing a package of this project changes nothing global; each entry point that wants these
settings (the three CLIs through `bit_common.loop.main`, the bench, the test suite) calls
`configure` once, first, with the frameworks it will run. Each setting, once:

- jax: glibc keeps freed memory (`retain_freed_memory`). XLA's CPU runtime allocates a step's
  whole scratch buffer afresh each step, and every unmapped page costs a zero-fill (15-25 % of
  a step); `BIT_KEEP_SYSTEM_MALLOC=1` opts out.
- jax: the persistent compilation cache in `~/.cache/bit_jax/xla` (`$XDG_CACHE_HOME`, at most
  2 GiB): a later run of the same step loads it instead of compiling (first step 40 s -> 10 s).
  `JAX_COMPILATION_CACHE_DIR` moves it; set empty, it turns the cache off.
- jax: CPU computations run inline, so a step's scratch buffer is freed before the next step
  allocates its own and the kept heap holds one.
- jax without tf2: TensorFlow sees no GPU; tf.data only feeds JAX, which owns the accelerators.
- jax, tf2: the C++ log lines of TensorFlow and XLA (oneDNN banner, CPU feature notice, XLA
  service start, a libjpeg complaint per damaged image) stay out of the terminal
  (`TF_CPP_MIN_LOG_LEVEL=3` unless set; `TF_CPP_MIN_LOG_LEVEL=0` shows them): a failing op
  still raises its error in Python, which the command reports. The banners TensorFlow's
  libraries print while they load, before reading that variable, are filtered out of stderr
  during its import (nothing else it prints there is dropped).
- tf2: TensorFlow's oneDNN kernels (`TF_ENABLE_ONEDNN_OPTS=1` unless set; read when TensorFlow
  is first imported). TensorFlow enables them itself only on AVX-512 VNNI CPUs; elsewhere its
  Eigen convolutions made a step 1.37x slower.
- jax, tf2: TensorFlow allocates GPU memory as it needs it, instead of taking the whole GPU at
  start beside torch or JAX.
- pytorch, tf2 (fp32 runs): TF32 off, true float32 on GPUs, as JAX's HIGHEST precision; the
  parity tolerances assume it.
- pytorch: cuDNN picks its fastest algorithms (`cudnn.benchmark`); shapes are fixed in a run.
- pytorch with jax or tf2: torchvision is imported before TensorFlow; the other order crashes
  (torchvision 0.29, TensorFlow 2.21).

`HeapTrimmer` bounds the kept heap from the training loop; `env_override` reads the on/off
environment overrides of a backend's defaults (BIT_TF2_JIT, BIT_JAX_WINOGRAD, BIT_TF2_WINOGRAD).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import os
import platform
import sys
import tempfile
from collections.abc import Iterable, Iterator

# mallopt parameters of glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1

OPT_OUT_ENV = "BIT_KEEP_SYSTEM_MALLOC"
_kept_heap_libc: ctypes.CDLL | None = None  # glibc, once retain_freed_memory applied


def env_override(name: str) -> bool | None:
    """An on/off override from the environment: None if `name` is unset, False for "", "0" or
    "false" (any case), True for any other value."""
    value = os.environ.get(name)
    if value is None:
        return None
    return value.lower() not in ("", "0", "false")


def retain_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse instead of unmapping them; True if applied.

    Sets one malloc arena (threads of a non-main arena fall back to mmap for blocks above 64 MB,
    whatever the limits), no mmap for large blocks, and no trimming of the heap's top. The price
    is that the process keeps its peak heap mapped until it exits, which a training run does
    anyway. It takes full effect only before the process starts threads that allocate (that is,
    before jax, torch or tensorflow run anything), so `configure` applies it first. A no-op off
    glibc, and when the environment sets BIT_KEEP_SYSTEM_MALLOC=1.
    """
    if os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))
    if not all(libc.mallopt(param, value) == 1 for param, value in settings):
        return False
    global _kept_heap_libc
    _kept_heap_libc = libc
    return True


class HeapTrimmer:
    """Hands back to the system the freed heap memory that piles up between training steps.

    Under `retain_freed_memory` a step's scratch buffer sometimes does not fit the hole the last
    one left: a small allocation took part of it, or the runtime freed it only after the next
    step had started. The heap then grows by a whole buffer whose pages stay resident (R50x1,
    batch 32: 1.6 -> 2.4 -> 3.3 GB). `after_step` calls `malloc_trim(0)` when the heap's end
    (`sbrk(0)`: one arena and no mmap, so the heap is all of malloc's memory) has moved more than
    `margin` beyond its furthest point at the last trim: the pages of free blocks go back to the
    system and fault in again once, where a later step reuses them. A steady run stops trimming
    after its first step. The check takes 0.02 ms; glibc's `mallinfo2` walks every free chunk
    and took 14-24 ms per step at R50x1, batch 16. Does nothing unless `retain_freed_memory`
    applied.
    """

    def __init__(self, margin: int = 64 << 20):
        self.margin = margin
        self._end_at_trim: int | None = None
        self._libc = _kept_heap_libc
        if self._libc is not None:
            self._libc.sbrk.restype, self._libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]

    def after_step(self) -> bool:
        """Trim the heap if it grew since the last trim; True if it trimmed."""
        if self._libc is None:
            return False
        end = self._libc.sbrk(0)
        if self._end_at_trim is not None and end <= self._end_at_trim + self.margin:
            return False
        # The end before trimming: a trim that releases the heap's top lowers it, and the next
        # step growing back to it is no growth.
        self._end_at_trim = max(end, self._end_at_trim or 0)
        self._libc.malloc_trim(0)
        return True


# ---- configure -----------------------------------------------------------------------------
JAX_CACHE_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
JAX_CACHE_MAX_ENV = "JAX_COMPILATION_CACHE_MAX_SIZE"
JAX_CACHE_MAX_BYTES = 2 << 30
ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"
TF_LOG_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"


def default_jax_cache_dir() -> str:
    """`$XDG_CACHE_HOME/bit_jax/xla`, `~/.cache/bit_jax/xla` when XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bit_jax", "xla")


def configure(frameworks: str | Iterable[str], precision: str = "fp32") -> None:
    """Apply the settings listed above for `frameworks` ("pytorch", "jax", "tf2"; other
    names get none). Call it before the frameworks run anything; `precision` is the run's
    --precision (TF32 stays at its defaults under mixed precision)."""
    names = {frameworks} if isinstance(frameworks, str) else set(frameworks)
    if names & {"jax", "tf2"}:
        os.environ.setdefault(TF_LOG_LEVEL_ENV, "3")  # read when jaxlib and TensorFlow load
    if "jax" in names:
        retain_freed_memory()  # first: before any framework starts threads
    if "pytorch" in names:
        _configure_torch(precision, tensorflow_too=bool(names & {"jax", "tf2"}))
    if "jax" in names:
        _configure_jax()
    if "tf2" in names:
        os.environ.setdefault(ONEDNN_ENV, "1")  # read when TensorFlow is first imported
    if names & {"jax", "tf2"} and importlib.util.find_spec("tensorflow") is not None:
        _configure_tensorflow(gpus="tf2" in names, fp32=precision == "fp32")


def _configure_torch(precision: str, tensorflow_too: bool) -> None:
    import torch

    if tensorflow_too and importlib.util.find_spec("torchvision") is not None:
        import torchvision  # noqa: F401  (before tensorflow: the other order crashes)
    if precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True


def _configure_jax() -> None:
    """The compilation cache's defaults (JAX reads them from the environment when imported, and
    its children inherit them; if it was imported before, its configuration is set instead,
    which holds while it has compiled nothing), and inline CPU dispatch."""
    os.environ.setdefault(JAX_CACHE_DIR_ENV, default_jax_cache_dir())
    os.environ.setdefault(JAX_CACHE_MAX_ENV, str(JAX_CACHE_MAX_BYTES))
    imported_before = "jax" in sys.modules
    import jax

    if imported_before and jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", os.environ[JAX_CACHE_DIR_ENV])
        jax.config.update("jax_compilation_cache_max_size", int(os.environ[JAX_CACHE_MAX_ENV]))
    jax.config.update("jax_cpu_enable_async_dispatch", False)


_TF_BANNERS = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on",
               "cpu_feature_guard", "To enable the following instructions")


@contextlib.contextmanager
def _without_load_banners(enabled: bool) -> Iterator[None]:
    """Drop TensorFlow's load-time banners (`_TF_BANNERS`) from what the block writes to the
    process's stderr (file descriptor 2: native libraries write there); the rest is kept."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
            sys.stderr.write("".join(x for x in lines if not any(b in x for b in _TF_BANNERS)))
            sys.stderr.flush()


def _configure_tensorflow(gpus: bool, fp32: bool) -> None:
    quiet = "tensorflow" not in sys.modules and os.environ.get(TF_LOG_LEVEL_ENV) != "0"
    with _without_load_banners(quiet):
        import tensorflow as tf

    try:
        if not gpus:
            tf.config.set_visible_devices([], "GPU")
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except (RuntimeError, ValueError):  # TensorFlow already started its devices: leave them
        pass
    if fp32:
        tf.config.experimental.enable_tensor_float_32_execution(False)
