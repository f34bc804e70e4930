"""BiT in JAX: `models` (flax ResNet-v2 + the load_npz/predict/embed/save_npz contract), `data`
(the shared tf.data pipeline of bit_tf2.data) and `train` (`python -m bit_jax.train`).

Importing the package imports nothing heavy; `bit_jax.models` needs only jax/flax (no TensorFlow).
It sets two process-wide defaults:

- glibc's malloc keeps freed memory (`bit_common.runtime.retain_freed_memory`): XLA allocates
  each step's scratch buffer afresh, and unmapped pages cost the kernel a zero-fill each;
- JAX's persistent compilation cache, in `~/.cache/bit_jax/xla` (under `$XDG_CACHE_HOME` when
  set, at most 2 GiB): a later run with the same model, batch and flags loads the compiled step
  instead of compiling it again (R50x1 training step on a 2-core CPU: first step 40 s -> 10 s).
  JAX's own `JAX_COMPILATION_CACHE_DIR` chooses another folder; set empty, it turns the cache
  off. XLA checks a cached CPU program against the host's instruction set before loading it and
  compiles afresh where they differ (a home folder shared by different machines).
"""

import os
import sys

from bit_common.runtime import retain_freed_memory

retain_freed_memory()

CACHE_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
CACHE_MAX_ENV = "JAX_COMPILATION_CACHE_MAX_SIZE"
CACHE_MAX_BYTES = 2 << 30


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/bit_jax/xla`, `~/.cache/bit_jax/xla` when XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bit_jax", "xla")


def _default_compilation_cache() -> None:
    """Point JAX's persistent compilation cache at `default_cache_dir()` unless the user chose.

    JAX reads its options from the environment when it is imported (children inherit them too);
    if it was imported before this package, its configuration is set instead, which holds as
    long as it has compiled nothing yet (JAX decides once, at its first compilation).
    """
    os.environ.setdefault(CACHE_DIR_ENV, default_cache_dir())
    os.environ.setdefault(CACHE_MAX_ENV, str(CACHE_MAX_BYTES))
    jax = sys.modules.get("jax")
    if jax is not None and jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_DIR_ENV])
        jax.config.update("jax_compilation_cache_max_size", int(os.environ[CACHE_MAX_ENV]))


_default_compilation_cache()
