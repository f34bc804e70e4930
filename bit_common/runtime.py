"""Process-wide settings that make the training step faster on CPU hosts.

`retain_freed_memory`: XLA's CPU runtime allocates the whole temporary buffer of a compiled step
(hundreds of MB for R50x1) with one malloc per step and frees it at the end. glibc serves such
blocks with a fresh mmap, so the kernel zero-fills every page again on each step: about 130 000
page faults and 15-25 % of a JAX step on a 2-core host. Keeping freed memory in the heap makes the
next step reuse pages that are already mapped.

`HeapTrimmer`: the kept heap can grow by a whole scratch buffer when the next step's buffer no
longer fits the hole the last one left; a training loop calls `after_step` to hand such memory
back to the system when it piles up.

`env_override`: how the on/off environment overrides of a backend's defaults (BIT_TF2_JIT,
BIT_JAX_WINOGRAD, BIT_TF2_WINOGRAD) read.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

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
    before jax, torch or tensorflow run anything), so callers invoke it at import time. A no-op
    off glibc, and when the environment sets BIT_KEEP_SYSTEM_MALLOC=1.
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
