"""`make bench`: training, evaluation and input speed of the three frameworks and timm, in one run.

Prints a table and writes the same figures as JSON (default bench_results/bench.json) with the
hardware. A benchmark, not a test: it asserts nothing. Frameworks are timed in alternating
order within one process and the medians reported, since timings on shared machines drift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# JAX's persistent compilation cache stays off (unless the caller set it), so that the first-step
# column is JAX's compile time and the step memory includes compiling, whatever ran before.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")

# First, before torch or tensorflow start threads or read their environment: bit_jax keeps
# freed memory mapped (XLA's per-step scratch buffer), bit_tf2 asks for TensorFlow's oneDNN
# kernels. The settings hold for the whole process, timm included.
import bit_jax  # noqa: F401, E402
import bit_tf2  # noqa: F401, E402
# torchvision must be imported before tensorflow in one process (it segfaults otherwise).
import torchvision  # noqa: F401, E402

from bit_common import checkpoint, cli, hyperrule  # noqa: E402
from bit_common.datasets import get_dataset, load_digits, scan_image_folder  # noqa: E402
from bit_common.fewshot import sample_few_shot  # noqa: E402
from bit_common.flops import train_flops, forward_flops  # noqa: E402
from bit_common.loop import RunSetup  # noqa: E402
from bit_common.plan import InputPlan  # noqa: E402
from bit_common.registry import parse_arch  # noqa: E402

FRAMEWORKS = ("pytorch", "jax", "tf2")
ARCH = parse_arch("R50x1")


def framework(name: str):
    import importlib
    return importlib.import_module(f"bit_{name}.train").FRAMEWORK


def make_setup(fw: str, batch: int, crop: int, batch_split: int = 1, dataset: str = "digits",
               datadir: str | None = None, workers: int = 2) -> RunSetup:
    """A RunSetup as the shared loop would build it, with a seeded random R50x1 (10 classes)."""
    resize = crop + crop // 8
    argv = ["--name", "bench", "--model", "BiT-M-R50x1", "--logdir", tempfile.gettempdir(),
            "--dataset", dataset, "--batch", str(batch), "--batch_split", str(batch_split),
            "--resolution", str(resize), str(crop), "--workers", str(workers),
            "--batch_eval", str(batch)] + (["--datadir", datadir] if datadir else [])
    args = cli.build_parser(fw).parse_args(argv)
    train = load_digits("train") if dataset == "digits" else scan_image_folder(datadir, "train")
    params = checkpoint.random_params(ARCH, 10, seed=0)
    plan = InputPlan(len(train), batch, resize, crop, seed=0,
                     mixup_alpha=hyperrule.get_mixup(len(train)))
    return RunSetup(args, get_dataset(dataset), train, np.arange(len(train)), 10, ARCH, params,
                    plan, resize, crop)


# ---- the machine's ceiling -----------------------------------------------------------------
def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    import torch
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    ta = torch.from_numpy(a)
    best = 0.0
    for fn in (lambda: a @ a, lambda: ta @ ta):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * n ** 3 / min(times) / 1e9)
    return best


# ---- training and evaluation speed ---------------------------------------------------------
class TimmStep:
    """timm's resnetv2_50x1_bit with plain SGD momentum: the outside reference."""

    def __init__(self, batch: dict, classes: int = 10):
        import timm
        import torch
        self.torch = torch
        self.model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=classes)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.001, momentum=0.9)
        self.x = torch.from_numpy(np.ascontiguousarray(batch["x"].transpose(0, 3, 1, 2)))
        self.y = torch.from_numpy(batch["y"]).long()

    def __call__(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss.item()


def step_runner(name: str, batch: int, crop: int) -> Callable[[], object]:
    """One training step of timm (`name` 'timm') or of a framework's backend, on a fixed batch."""
    if name == "timm":
        rng = np.random.default_rng(0)
        return TimmStep({"x": rng.uniform(-1, 1, (batch, crop, crop, 3)).astype(np.float32),
                         "y": rng.integers(0, 10, batch)})
    backend = framework(name).make_backend(make_setup(name, batch, crop))
    data = next(backend.train_batches(0))
    return lambda: backend.train_step(data, 0.001)


def train_steps(batch: int, crop: int, rounds: int, steps: int) -> dict[str, dict]:
    """Median seconds per training step of each framework's backend and of timm."""
    runners, compile_s = {}, {}
    for name in ("timm",) + FRAMEWORKS:
        runners[name] = step_runner(name, batch, crop)
        t0 = time.perf_counter()
        runners[name]()  # compiles where the framework compiles
        if name != "timm":
            compile_s[name] = time.perf_counter() - t0
    times: dict[str, list[list[float]]] = {k: [] for k in runners}
    order = list(runners)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            times[name].append([])
            for _ in range(steps):
                t0 = time.perf_counter()
                runners[name]()
                times[name][-1].append(time.perf_counter() - t0)
    out = {}
    for k, per_round in times.items():
        step_s = float(np.median(np.concatenate(per_round)))
        low, mid, high = speed_ratio(per_round, times["timm"])
        out[k] = {"step_s": step_s, "img_per_s": batch / step_s, "first_step_s": compile_s.get(k),
                  "x_timm": mid, "x_timm_range": [low, high]}
    return out


def speed_ratio(rounds: list[list[float]], reference: list[list[float]]) -> tuple[float, ...]:
    """Speed relative to `reference` per round (its median step time over ours): (min, median,
    max) over the rounds.

    Within a round the two ran minutes apart at most, so each round's ratio cancels the machine's
    slow drift; their spread says how far to trust the median ratio.
    """
    ratios = [float(np.median(ref) / np.median(own)) for own, ref in zip(rounds, reference)]
    return min(ratios), float(np.median(ratios)), max(ratios)


def eval_speed(batch: int, crop: int, rounds: int, npz: Path) -> dict[str, float]:
    """Median img/s of `models.predict` on one batch."""
    import importlib
    x = np.random.default_rng(1).uniform(-1, 1, (batch, crop, crop, 3)).astype(np.float32)
    fns = {}
    for fw in FRAMEWORKS:
        m = importlib.import_module(f"bit_{fw}.models")
        model = m.load_npz(npz)
        m.predict(model, x)
        fns[fw] = lambda m=m, model=model: m.predict(model, x)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for fw in (FRAMEWORKS if r % 2 == 0 else FRAMEWORKS[::-1]):
            t0 = time.perf_counter()
            fns[fw]()
            times[fw].append(time.perf_counter() - t0)
    return {k: batch / float(np.median(v)) for k, v in times.items()}


# ---- input pipelines -----------------------------------------------------------------------
def synthetic_folder(root: Path, n: int = 256, size: tuple[int, int] = (375, 500)) -> Path:
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(4):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n // 4 if split == "train" else 2):
                img = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}.jpg", quality=90)
    return root


def pipeline_speed(batch: int, crop: int, batches: int, folder: Path) -> dict[str, float]:
    """img/s of the torchvision pipeline and of the shared tf.data pipeline, model-free."""
    from bit_pytorch import train as pt_train
    from bit_tf2 import data as tf_data
    out = {}
    for source, kwargs in (("digits", {}), ("jpeg_folder", {"dataset": "imagefolder",
                                                           "datadir": str(folder)})):
        setup = make_setup("pytorch", batch, crop, **kwargs)
        pt = pt_train.FRAMEWORK.make_backend(setup).train_batches(0)
        tf_it = tf_data.batches(tf_data.train_dataset(make_setup("tf2", batch, crop, **kwargs), 0))
        for name, it in (("pytorch", pt), ("tf.data", tf_it)):
            next(it)  # start workers
            t0 = time.perf_counter()
            for _ in range(batches):
                next(it)
            out[f"{name} {source}"] = batches * batch / (time.perf_counter() - t0)
    return out


# ---- memory of a step, per batch split (one fresh process each) ------------------------------
def step_memory(fw: str, batch: int, crop: int, split: int) -> float:
    """MiB of resident memory training steps add on top of the loaded model (fresh process)."""
    code = (f"import benchmarks.bench as b; print(b._measure_step_memory({fw!r}, {batch}, "
            f"{crop}, {split}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _measure_step_memory(fw: str, batch: int, crop: int, split: int) -> float:
    """Peak resident memory of two training steps above the loaded model and its batch.

    Allocators keep freed memory, so the peak is taken over the first steps, before which no
    activation was ever allocated (for JAX and TF2 it includes compiling the step).
    """
    backend = framework(fw).make_backend(make_setup(fw, batch, crop, batch_split=split))
    data = next(backend.train_batches(0))
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    for _ in range(2):
        backend.train_step(data, 0.001)
    return (_status_kib("VmHWM") - base) / 1024


# ---- report ----------------------------------------------------------------------------------
def hardware() -> dict:
    info = {"machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version()}
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in
                           Path("/proc/cpuinfo").read_text().splitlines()
                           if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="steps per framework per round")
    p.add_argument("--out", default="bench_results/bench.json")
    p.add_argument("--memory_batch", type=int, default=128,
                   help="global batch of the step-memory figures (split 1 against split 8); "
                        "at small batches the gradients, optimizer state and compiled code, "
                        "which no split reduces, dominate")
    p.add_argument("--skip_memory", action="store_true")
    args = p.parse_args(argv)
    res: dict = {"hardware": hardware(), "batch": args.batch, "crop": args.crop,
                 "precision": "fp32", "arch": ARCH.name}
    res["matmul_gflops"] = ceiling = matmul_gflops()
    print(f"machine: {res['hardware']}\nceiling: 2048x2048 float32 matmul {ceiling:.0f} GFLOP/s",
          flush=True)
    flops = train_flops(ARCH, args.crop, args.crop, 10)
    res["train"] = train_steps(args.batch, args.crop, args.rounds, args.steps)
    for r in res["train"].values():
        r["gflops"] = flops * r["img_per_s"] / 1e9
        r["fraction_of_ceiling"] = r["gflops"] / ceiling
    with tempfile.TemporaryDirectory() as tmp:
        npz = checkpoint.write_random_checkpoint(Path(tmp) / "r50.npz", ARCH, 10)
        res["eval_img_per_s"] = eval_speed(args.batch, args.crop, args.rounds * 2, npz)
        folder = synthetic_folder(Path(tmp) / "images")
        res["pipeline_img_per_s"] = pipeline_speed(args.batch, args.crop, 20, folder)
    if not args.skip_memory:
        res["memory_batch"] = args.memory_batch
        res["step_memory_mib"] = {
            fw: {s: step_memory(fw, args.memory_batch, args.crop, s) for s in (1, 8)}
            for fw in FRAMEWORKS}
    labels = np.random.default_rng(0).integers(0, 1000, 1_281_167)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        sample_few_shot(labels, 5, seed=0)
        times.append(time.perf_counter() - t0)
    res["few_shot_5x1000_of_1.28M_s"] = float(np.median(times))
    res["forward_gflop_per_image"] = forward_flops(ARCH, args.crop, args.crop, 10) / 1e9
    print_table(res)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"\nwritten to {args.out}")
    return 0


def print_table(res: dict) -> None:
    print(f"\nR50x1, {res['crop']} px, batch {res['batch']}, float32, "
          f"{res['hardware'].get('cpu', res['hardware']['machine'])}")
    print(f"{'training step':<14} {'img/s':>8} {'x timm':>7} {'per round':>11} {'GFLOP/s':>8} "
          f"{'of peak':>8} {'1st step s':>10}")
    for name, r in res["train"].items():
        first = f"{r['first_step_s']:.1f}" if r["first_step_s"] else "-"
        low, high = r["x_timm_range"]
        print(f"{name:<14} {r['img_per_s']:8.1f} {r['x_timm']:7.2f} {f'{low:.2f}-{high:.2f}':>11} "
              f"{r['gflops']:8.1f} {r['fraction_of_ceiling']:8.1%} {first:>10}")
    print("evaluation img/s: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                           res["eval_img_per_s"].items()))
    print("input pipeline img/s: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                               res["pipeline_img_per_s"].items()))
    for fw, m in res.get("step_memory_mib", {}).items():
        print(f"step memory {fw}, batch {res['memory_batch']}: split 1 {m[1]:.0f} MiB, "
              f"split 8 {m[8]:.0f} MiB ({m[8] / max(m[1], 1e-9):.2f}x)")
    print(f"few-shot 5/class over 1.28 M labels: {res['few_shot_5x1000_of_1.28M_s'] * 1e3:.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
