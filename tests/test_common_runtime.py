"""The process-wide settings (`runtime.configure`): glibc keeps freed memory, TensorFlow gets
oneDNN kernels, JAX keeps compiled programs on disk, ...; and importing our packages applies none.

Each check runs in a fresh interpreter, because these settings act only before the process has
started framework threads (malloc), imported TensorFlow (oneDNN) or compiled anything (JAX).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from bit_common import runtime

# A worker thread allocates, writes and frees a 256 MB block twice, as XLA's CPU runtime does with
# a step's scratch buffer (plain malloc: numpy would ask for huge pages); the child prints the
# page faults of the second round.
REUSE = """
import ctypes, resource, sys, threading
if sys.argv[1] == "retain":
    from bit_common.runtime import retain_freed_memory
    assert retain_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 256 * 2**20
faults = []
def allocate_and_write():
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    libc.free(block)
def step():
    allocate_and_write()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    allocate_and_write()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=step); t.start(); t.join()
print(faults[0])
"""


# A steady step reuses the kept block without trimming; when the heap grows by a second block
# (as when a step's scratch buffer no longer fits the last one's hole) the trimmer hands the
# free pages back, and a step that grows the trimmed heap back to where it was is no growth.
# The child prints: trimmed after the repeat, MiB resident then, trimmed after the growth, MiB
# resident then, trimmed after growing back.
TRIM = """
import ctypes
from pathlib import Path
from bit_common import runtime
assert runtime.retain_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 256 * 2**20
def rss_mib():
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(l for l in status if l.startswith("VmRSS")).split()[1]) // 1024
def written():
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    return block
trimmer = runtime.HeapTrimmer()
libc.free(written())
trimmer.after_step()  # the first call sets the baseline
libc.free(written())
repeat = trimmer.after_step()
rss_repeat = rss_mib()
a, b = written(), written()
libc.free(a)
libc.free(b)
grown = trimmer.after_step()
rss_grown = rss_mib()
libc.free(written())
print(repeat, rss_repeat, grown, rss_grown, trimmer.after_step())
"""


def _child(code: str, *args: str, unset: str | tuple[str, ...] = (), **env: str) -> str:
    """The last line a fresh interpreter prints; `env` added to, `unset` removed from, ours."""
    unset = (unset,) if isinstance(unset, str) else unset
    child_env = {k: v for k, v in os.environ.items() if k not in unset} | env
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env=child_env, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_retained_memory_is_reused_without_page_faults():
    pages = 256 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    default = int(_child(REUSE, "system"))
    retained = int(_child(REUSE, "retain"))
    assert default > pages // 2  # glibc unmapped the block: every page is faulted in again
    assert retained < pages // 20


def test_opt_out_leaves_malloc_alone():
    code = "from bit_common.runtime import retain_freed_memory; print(retain_freed_memory())"
    assert _child(code, BIT_KEEP_SYSTEM_MALLOC="1") == "False"


def test_configure_turns_on_onednn_unless_the_user_chose():
    pytest.importorskip("tensorflow")
    code = ("from bit_common import runtime; runtime.configure('tf2'); import tensorflow\n"
            "from tensorflow.python.util import _pywrap_util_port as port\n"
            "print(port.IsMklEnabled())")
    assert _child(code, unset="TF_ENABLE_ONEDNN_OPTS") == "True"
    assert _child(code, TF_ENABLE_ONEDNN_OPTS="0") == "False"


def test_configure_keeps_tensorflows_start_up_logging_out_unless_asked_for():
    """The oneDNN banner (printed while TensorFlow loads) and the C++ log lines are gone;
    TF_CPP_MIN_LOG_LEVEL=0 brings them back, and what else reaches stderr is kept."""
    pytest.importorskip("tensorflow")
    code = ("import sys\nfrom bit_common import runtime\nruntime.configure('tf2')\n"
            "import tensorflow as tf\nsys.stderr.write('kept\\n')\n"
            "jpeg = tf.io.encode_jpeg(tf.random.uniform([64, 64, 3], 0, 255, tf.int32, seed=1)"
            ".numpy().astype('uint8')).numpy()\n"
            "try:\n    tf.io.decode_image(jpeg[:len(jpeg) * 4 // 5])  # logs an error line\n"
            "except tf.errors.OpError as e:\n    print(type(e).__name__)")

    def stderr(**env: str) -> str:
        child_env = {k: v for k, v in os.environ.items()
                     if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")} | env
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=child_env, check=True)
        assert out.stdout.strip() == "InvalidArgumentError"
        return out.stderr

    assert stderr() == "kept\n"
    loud = stderr(TF_CPP_MIN_LOG_LEVEL="0")
    assert "oneDNN custom operations are on" in loud and "kept\n" in loud


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_heap_trimmer_keeps_a_steady_heap_and_returns_growth():
    repeat, rss_repeat, grown, rss_grown, regrown = _child(TRIM).split()
    assert repeat == "False" and grown == "True" and regrown == "False"
    assert int(rss_repeat) > 200  # the reused block stayed resident: no page faults next time
    assert int(rss_grown) < int(rss_repeat) - 128  # two freed blocks were handed back


def test_heap_trimmer_is_inert_without_kept_memory():
    code = ("from bit_common.runtime import HeapTrimmer\n"
            "t = HeapTrimmer()\n"
            "print(t.after_step(), t.after_step())")
    assert _child(code) == "False False"


def test_env_override_reads_unset_off_and_on(monkeypatch):
    name = "BIT_TEST_OVERRIDE"
    monkeypatch.delenv(name, raising=False)
    assert runtime.env_override(name) is None
    for off in ("", "0", "false", "False", "FALSE"):
        monkeypatch.setenv(name, off)
        assert runtime.env_override(name) is False, off
    for on in ("1", "true", "yes"):
        monkeypatch.setenv(name, on)
        assert runtime.env_override(name) is True, on


CACHE_DIR_QUERY = ("{first}; from bit_common import runtime; runtime.configure('jax'); "
                   "import jax\n"
                   "print(repr(jax.config.jax_compilation_cache_dir), "
                   "jax.config.jax_compilation_cache_max_size)")
# A jitted function compiled in a fresh process; prints the persistent cache's hits.
COMPILE = """
from bit_common import runtime
runtime.configure("jax")
import jax, jax.numpy as jnp
hits = []
jax.monitoring.register_event_listener(lambda event, **_: hits.append(event))
jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64))).block_until_ready()
print(hits.count("/jax/compilation_cache/cache_hits"))
"""


@pytest.mark.parametrize("first", ["import bit_jax.models", "import jax"])
def test_configure_defaults_the_compilation_cache_to_the_user_cache(tmp_path, first):
    pytest.importorskip("jax")
    code = CACHE_DIR_QUERY.format(first=first)
    got = _child(code, unset="JAX_COMPILATION_CACHE_DIR", XDG_CACHE_HOME=str(tmp_path))
    assert got == f"{str(tmp_path / 'bit_jax' / 'xla')!r} {2 << 30}"


def test_the_users_compilation_cache_setting_wins(tmp_path):
    pytest.importorskip("jax")
    code = CACHE_DIR_QUERY.format(first="import bit_jax.models")
    mine = str(tmp_path / "mine")
    got = _child(code, JAX_COMPILATION_CACHE_DIR=mine, JAX_COMPILATION_CACHE_MAX_SIZE="12345")
    assert got == f"{mine!r} 12345"
    assert _child(code, JAX_COMPILATION_CACHE_DIR="").startswith("'' ")  # empty: the cache is off
    # jax imported first: its configuration is set, with the user's size limit kept.
    code = CACHE_DIR_QUERY.format(first="import jax")
    got = _child(code, unset="JAX_COMPILATION_CACHE_DIR", XDG_CACHE_HOME=str(tmp_path),
                 JAX_COMPILATION_CACHE_MAX_SIZE="12345")
    assert got == f"{str(tmp_path / 'bit_jax' / 'xla')!r} 12345"


def test_a_second_process_loads_the_compiled_program_from_the_cache(tmp_path):
    pytest.importorskip("jax")
    env = {"XDG_CACHE_HOME": str(tmp_path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    assert _child(COMPILE, unset="JAX_COMPILATION_CACHE_DIR", **env) == "0"
    written = list((tmp_path / "bit_jax" / "xla").glob("jit_*-cache"))
    assert written  # the jitted function (and jnp.ones, at this zero threshold)
    assert _child(COMPILE, unset="JAX_COMPILATION_CACHE_DIR", **env) == str(len(written))


# The state of every setting `configure` can change, as one line of JSON.
SETTINGS = """
import json, os
import jax, tensorflow as tf, torch
from bit_common import runtime
print(json.dumps({
    "kept_heap": runtime._kept_heap_libc is not None,
    "env": {k: os.environ.get(k) for k in ("TF_ENABLE_ONEDNN_OPTS", "JAX_COMPILATION_CACHE_DIR",
                                           "JAX_COMPILATION_CACHE_MAX_SIZE",
                                           "TF_CPP_MIN_LOG_LEVEL")},
    "jax_cache": jax.config.jax_compilation_cache_dir,
    "jax_async": jax.config.values["jax_cpu_enable_async_dispatch"],
    "tf_tf32": tf.config.experimental.tensor_float_32_execution_enabled(),
    "torch_tf32": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32],
    "cudnn_benchmark": torch.backends.cudnn.benchmark}))
"""
OUR_MODULES = ("bit_common.loop", "bit_pytorch.models", "bit_pytorch.backend", "bit_pytorch.train",
               "bit_jax.models", "bit_jax.ops", "bit_jax.backend", "bit_jax.train",
               "bit_tf2.models", "bit_tf2.ops", "bit_tf2.backend", "bit_tf2.train",
               "bit_tfdata.pipeline")


def _settings(before: str) -> dict:
    import json
    env = {"XDG_CACHE_HOME": "/nonexistent"}
    return json.loads(_child(f"import torchvision\n{before}\n{SETTINGS}",
                             unset=("JAX_COMPILATION_CACHE_DIR", "TF_CPP_MIN_LOG_LEVEL"), **env))


def test_importing_our_packages_changes_nothing_process_wide():
    """A notebook that imports every module of ours gets the frameworks' own defaults."""
    for name in ("jax", "tensorflow", "torch"):
        pytest.importorskip(name)
    imports = "\n".join(f"import {m}" for m in OUR_MODULES)
    untouched = _settings("import os")
    after = _settings(imports)
    for settings in (untouched, after):  # the test run's own environment may set it
        settings["env"].pop("TF_ENABLE_ONEDNN_OPTS")
    assert after == untouched
    assert not untouched["kept_heap"] and untouched["jax_cache"] is None
    assert untouched["jax_async"] is True and untouched["tf_tf32"] is True


def test_configure_applies_each_setting():
    for name in ("jax", "tensorflow", "torch"):
        pytest.importorskip(name)
    got = _settings("from bit_common import runtime\n"
                    "runtime.configure(['pytorch', 'jax', 'tf2'])")
    if platform.libc_ver()[0] == "glibc" and not os.environ.get(runtime.OPT_OUT_ENV):
        assert got["kept_heap"]
    assert got["jax_cache"] == "/nonexistent/bit_jax/xla" == got["env"]["JAX_COMPILATION_CACHE_DIR"]
    assert got["env"]["JAX_COMPILATION_CACHE_MAX_SIZE"] == str(2 << 30)
    assert got["jax_async"] is False and got["tf_tf32"] is False
    assert got["torch_tf32"] == [False, False] and got["cudnn_benchmark"] is True
    assert got["env"]["TF_ENABLE_ONEDNN_OPTS"] == os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1")
    assert got["env"]["TF_CPP_MIN_LOG_LEVEL"] == "3"
