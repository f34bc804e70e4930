"""`make profile`: where one training step's time goes, per framework, by kernel.

R50x1 at 128 px, batch 16, float32, the step `make bench` times. Each framework runs in a fresh
process, since the profilers are switched on through the environment before the library loads:

- pytorch, timm, tf2: their convolutions, pooling and reorders run in oneDNN, which with
  `ONEDNN_VERBOSE=1` prints each primitive's execution time; summed by primitive, direction and
  implementation (`jit:avx2` against `brg_conv_fwd:avx2`, ...). Time outside oneDNN (group norm,
  elementwise ops, the framework) is the step time less the oneDNN total. TensorFlow runs
  independent ops concurrently, so its per-primitive times overlap and can add up to more than
  the step.
- jax: XLA's CPU runtime executes one thunk per kernel; a `jax.profiler` trace (with
  `--xla_cpu_enable_xprof_traceme`) times each, and the optimized HLO (dumped to a temporary
  folder) names the model op each came from. Summed by direction (forward or backward), op, and
  thunk kind (`ynn_fusion` for YNNPACK's dots and convolutions, XLA's own fusions otherwise).

    python -m benchmarks.profile --framework jax --top 25

A diagnostic tool, not a test: it prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHOICES = ("pytorch", "jax", "tf2", "timm")
START, END = "PROFILE_START", "PROFILE_END"


# ---- aggregation (pure functions) ------------------------------------------------------------
def onednn_breakdown(lines: Iterable[str], steps: int) -> dict[str, list[float]]:
    """`ONEDNN_VERBOSE` execution lines -> {"primitive direction implementation": [ms/step,
    calls/step]}, over the lines between the START and END markers.

    An `exec` line reads `onednn_verbose,[v1,]primitive,exec,cpu,<primitive>,<impl>,<direction>,
    <formats>,...,<ms>`; the `v1` and `primitive` fields appear only in oneDNN 3.x.
    """
    out: dict[str, list[float]] = {}
    inside = False
    for line in lines:
        if START in line:
            inside = True
        elif END in line:
            break
        elif inside and line.startswith("onednn_verbose") and ",exec," in line:
            f = line.split(",")
            i = f.index("exec")
            try:
                ms = float(f[-1])
            except ValueError:
                continue
            key = f"{f[i + 2]} {f[i + 4]} {f[i + 3]}"
            acc = out.setdefault(key, [0.0, 0.0])
            acc[0] += ms / steps
            acc[1] += 1 / steps
    return out


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the `op_name` metadata JAX attached to it, from optimized HLO text."""
    names = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]+)\"",
                         hlo_text, re.M):
        names[m.group(1)] = m.group(2)
    return names


def op_category(op_name: str) -> str:
    """A JAX op_name -> "forward|backward <layer role>/<primitive>", blocks and units merged.

    'jit(core)/transpose(jvp(ResNetV2))/block3/unit02/b/standardized_conv2d/dot_general' ->
    'backward b/standardized_conv2d/dot_general'.
    """
    parts = op_name.split("/")
    direction = "backward" if any(p.startswith("transpose(") for p in parts) else "forward"
    keep = [p for p in parts if not re.match(r"(jit|jvp|transpose|vmap|pjit)\(|block\d+$|unit\d+$",
                                             p)]
    return f"{direction} {'/'.join(keep[-3:])}"


def xla_breakdown(events: Iterable[tuple[str, float]], op_names: dict[str, str],
                  steps: int) -> dict[str, list[float]]:
    """Thunk events (name, ns) -> {"<category> [<thunk kind>]": [ms/step, calls/step]}."""
    out: dict[str, list[float]] = {}
    for name, ns in events:
        kind = re.sub(r"[.\d]+$", "", name)
        op = op_names.get(name)
        key = f"{op_category(op) if op else 'other'} [{kind}]"
        acc = out.setdefault(key, [0.0, 0.0])
        acc[0] += ns / 1e6 / steps
        acc[1] += 1 / steps
    return out


def print_breakdown(framework: str, step_ms: float, rows: dict[str, list[float]],
                    top: int) -> None:
    total = sum(ms for ms, _ in rows.values())
    print(f"\n{framework}: {step_ms:.0f} ms per step; the kernels below sum to {total:.0f} ms")
    print(f"{'ms/step':>8} {'share':>6} {'calls':>6}  kernel")
    for key, (ms, calls) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{ms:8.1f} {ms / step_ms:6.1%} {calls:6.0f}  {key}")


# ---- the measured process --------------------------------------------------------------------
def _child(framework: str, batch: int, crop: int, steps: int, hlo_dir: str) -> None:
    """Warm up, then run `steps` profiled steps between the markers; print the step time (and,
    for JAX, the breakdown as JSON on the last line)."""
    from benchmarks.bench import configure, step_runner
    configure([framework])
    run = step_runner(framework, batch, crop)
    for _ in range(2):
        run()
    if framework != "jax":
        _timed_steps(run, steps)
        return
    import jax
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        step_ms = _timed_steps(run, steps)
        jax.profiler.stop_trace()
        print(json.dumps({"step_ms": step_ms, "rows": _jax_rows(trace_dir, hlo_dir, steps)}))


def _timed_steps(run, steps: int) -> float:
    """`steps` steps between the START and END markers; ms per step (also printed with END)."""
    print(START, flush=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    step_ms = (time.perf_counter() - t0) / steps * 1e3
    print(f"{END} {step_ms:.3f}", flush=True)
    return step_ms


def _jax_rows(trace_dir: str, hlo_dir: str, steps: int) -> dict[str, list[float]]:
    import jax
    trace = next(Path(trace_dir).rglob("*.xplane.pb"))
    data = jax.profiler.ProfileData.from_file(str(trace))
    events = [(ev.name, ev.duration_ns) for plane in data.planes for line in plane.lines
              if line.name.startswith("tf_XLAEigen") for ev in line.events
              if not ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "end: "))]
    hlo = "\n".join(p.read_text() for p in Path(hlo_dir).glob("*cpu_after_optimizations.txt"))
    return xla_breakdown(events, hlo_op_names(hlo), steps)


def profile(framework: str, batch: int, crop: int, steps: int) -> tuple[float, dict]:
    """Run one framework's profiled steps in a fresh process; (ms per step, breakdown)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as hlo_dir:
        if framework == "jax":
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
                                f" --xla_dump_to={hlo_dir} --xla_dump_hlo_module_re=.*core.*")
        else:
            env["ONEDNN_VERBOSE"] = "1"
        code = (f"from benchmarks.profile import _child; _child({framework!r}, {batch}, {crop}, "
                f"{steps}, {hlo_dir!r})")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=ROOT, env=env)
        if out.returncode != 0:
            raise SystemExit(f"The {framework} profile run failed (exit {out.returncode}):\n"
                             f"{out.stderr[-3000:]}")
    lines = out.stdout.splitlines()
    if framework == "jax":
        res = json.loads(lines[-1])
        return res["step_ms"], res["rows"]
    step_ms = float(next(l for l in lines if l.startswith(END)).split()[1])
    return step_ms, onednn_breakdown(lines, steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=CHOICES, action="append",
                   help="repeatable; default: all four")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=20, help="rows printed per framework")
    args = p.parse_args(argv)
    for fw in args.framework or CHOICES:
        step_ms, rows = profile(fw, args.batch, args.crop, args.steps)
        print_breakdown(fw, step_ms, rows, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
