"""`make bench`: training, evaluation and input speed of the three frameworks and timm, in one run.

Prints a table and writes the same figures as JSON (default bench_results/bench.json) with the
hardware. A benchmark, not a test: it asserts nothing. Frameworks are timed in alternating
order within one process and the medians reported, since timings on shared machines drift.

On a machine with a CUDA GPU every framework, timm included, runs on it, `--precision bf16|fp16`
times mixed precision, the ceiling is the GPU's matmul in that precision and step memory is each
allocator's peak. A framework that is not installed (TensorFlow on an image without it) is left
out with a note, and JAX then times its step on a batch made here instead of its tf.data one.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from bit_common import checkpoint, cli, loop, runtime
from bit_common.errors import BiTError
from bit_common.fewshot import sample_few_shot
from bit_common.flops import forward_flops, train_flops
from bit_common.precision import PRECISIONS
from bit_common.registry import parse_arch

FRAMEWORKS = ("pytorch", "jax", "tf2")
RUNNERS = ("timm",) + FRAMEWORKS
ARCH = parse_arch("R50x1")


# What each runner needs installed.
REQUIRES = {"timm": ("torch", "timm"), "pytorch": ("torch", "torchvision"),
            "jax": ("jax", "flax", "optax"), "tf2": ("tensorflow", "tensorflow_datasets")}


def framework(name: str) -> loop.Framework:
    import importlib
    return importlib.import_module(f"bit_{name}.train").FRAMEWORK


def installed(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """Those of `names` (timm or a framework) whose packages are installed, and what each other
    one lacks."""
    import importlib.util
    ok, missing = [], {}
    for name in names:
        absent = [m for m in REQUIRES[name] if importlib.util.find_spec(m) is None]
        if absent:
            missing[name] = f"not installed: {', '.join(absent)}"
        else:
            ok.append(name)
    return ok, missing


def has_tensorflow() -> bool:
    import importlib.util
    return importlib.util.find_spec("tensorflow") is not None


def configure(names: Sequence[str], precision: str = "fp32") -> None:
    """The process-wide settings of the frameworks in `names` (bit_common.runtime), as their
    CLIs apply them, plus two of the bench's own, unless the caller set them: JAX's persistent
    compilation cache off, so that the first-step column is its compile time and the step memory
    includes compiling; and on a GPU, no JAX preallocation of 75 % of its memory, which would
    leave timm and PyTorch the rest."""
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    runtime.configure([("pytorch" if n == "timm" else n) for n in names], precision)


def cuda_device() -> str | None:
    """The CUDA GPU's name where torch sees one (every framework then trains on it)."""
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def make_setup(fw: str, batch: int, crop: int, batch_split: int = 1, dataset: str = "digits",
               datadir: str | None = None, workers: int = 2, precision: str = "fp32",
               classes: int = 10, resize: int | None = None) -> loop.RunSetup:
    """The run's set-up as the CLI makes it (`loop.make_setup`), from a seeded random R50x1 with
    a head for the dataset's `classes`; `resize` defaults to crop + crop / 8."""
    resize = resize or crop + crop // 8
    argv = ["--name", "bench", "--model", "BiT-M-R50x1", "--logdir", tempfile.gettempdir(),
            "--dataset", dataset, "--batch", str(batch), "--batch_split", str(batch_split),
            "--resolution", str(resize), str(crop), "--workers", str(workers),
            "--batch_eval", str(batch), "--precision", precision] + (
                ["--datadir", datadir] if datadir else [])
    args = cli.build_parser(fw).parse_args(argv)
    return loop.make_setup(args, framework(fw),
                           params=checkpoint.random_params(ARCH, classes, seed=0))


# ---- the machine's ceiling -----------------------------------------------------------------
def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the best of numpy's and torch's float32 n x n matmul on the CPU."""
    import torch
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    ta = torch.from_numpy(a)
    return max(_gflops(lambda: a @ a, n, repeats), _gflops(lambda: ta @ ta, n, repeats))


def gpu_matmul_gflops(precision: str, n: int = 8192, repeats: int = 10) -> float:
    """GFLOP/s of the GPU's n x n matmul in the steps' precision (float32 without TF32)."""
    import torch
    from bit_pytorch.backend import AMP_DTYPES
    dtype = AMP_DTYPES.get(precision, torch.float32)
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    with cuda_fp32_flags(precision == "fp32"):
        return _gflops(lambda: (a @ a, torch.cuda.synchronize()), n, repeats)


def _gflops(fn: Callable[[], object], n: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def cuda_fp32_flags(full: bool):
    """TF32 off for true float32 (as every backend's fp32 runs), the defaults otherwise."""
    import contextlib
    from bit_pytorch.models import full_fp32
    return full_fp32() if full else contextlib.nullcontext()


# ---- training and evaluation speed ---------------------------------------------------------
class TimmStep:
    """timm's resnetv2_50x1_bit with plain SGD momentum: the outside reference.

    On a GPU it trains as our PyTorch backend does there: the batch copied from pinned memory,
    channels_last, cudnn.benchmark, TF32 off in float32, autocast (and a GradScaler for fp16) in
    mixed precision.
    """

    def __init__(self, batch: dict, classes: int = 10, precision: str = "fp32"):
        import timm
        import torch
        self.torch = torch
        cuda = torch.cuda.is_available()
        device = torch.device("cuda" if cuda else "cpu")
        fmt = torch.channels_last if cuda else torch.contiguous_format
        self.model = timm.create_model("resnetv2_50x1_bit", pretrained=False,
                                       num_classes=classes).to(device, memory_format=fmt)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.001, momentum=0.9)
        self.device, self.fmt = device, fmt
        x = torch.from_numpy(np.ascontiguousarray(batch["x"].transpose(0, 3, 1, 2)))
        # On a GPU the batch comes from pinned host memory each step, as bit_pytorch's does.
        self.x = x.pin_memory() if cuda else x
        self.y = torch.from_numpy(batch["y"]).long()
        from bit_pytorch.backend import AMP_DTYPES, make_grad_scaler
        self.amp = AMP_DTYPES.get(precision)
        self.scaler = make_grad_scaler(device.type) if precision == "fp16" else None
        self.full_fp32 = cuda and precision == "fp32"
        if cuda:
            torch.backends.cudnn.benchmark = True

    def __call__(self) -> float:
        import contextlib
        torch = self.torch
        amp = (torch.autocast("cuda", dtype=self.amp) if self.amp else contextlib.nullcontext())
        with cuda_fp32_flags(self.full_fp32):
            self.opt.zero_grad(set_to_none=True)
            x = self.x.to(self.device, non_blocking=True).contiguous(memory_format=self.fmt)
            y = self.y.to(self.device, non_blocking=True)
            with amp:
                loss = torch.nn.functional.cross_entropy(self.model(x).float(), y)
            if self.scaler:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                loss.backward()
                self.opt.step()
            return loss.item()  # waits for the GPU


def random_batch(batch: int, crop: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.uniform(-1, 1, (batch, crop, crop, 3)).astype(np.float32),
            "y": rng.integers(0, 10, batch)}


def step_runner(name: str, batch: int, crop: int,
                precision: str = "fp32") -> Callable[[], object]:
    """One training step of timm (`name` 'timm') or of a framework's backend, on a fixed batch.

    Each step returns the loss as a Python float, so it has finished on the GPU when it returns.
    """
    if name == "timm":
        return TimmStep(random_batch(batch, crop), precision=precision)
    backend = framework(name).make_backend(make_setup(name, batch, crop, precision=precision))
    data = fixed_batch(name, backend, batch, crop)
    return lambda: backend.train_step(data, 0.001)


def fixed_batch(name: str, backend, batch: int, crop: int):
    """The backend's first training batch of digits; for JAX without TensorFlow (whose tf.data
    pipeline it uses), random images in the same form (no mixup, as for digits)."""
    if name != "jax" or has_tensorflow():
        return next(backend.train_batches(0))[1]
    from bit_jax.backend import shard_batch
    b = random_batch(batch, crop)
    return shard_batch({"image": b["x"], "label": b["y"].astype(np.int32),
                        "mixup_lambda": np.float32(1.0),
                        "mixup_perm": np.arange(batch, dtype=np.int32)}, backend.mesh)


def train_steps(batch: int, crop: int, rounds: int, steps: int, names: list[str],
                precision: str = "fp32", left_out: dict | None = None) -> dict[str, dict]:
    """Median seconds per training step of each of `names` (timm, framework backends).

    A framework that refuses the settings (JAX and fp16) is left out: its reason goes into
    `left_out`.
    """
    runners, compile_s = {}, {}
    for name in names:
        try:
            runners[name] = step_runner(name, batch, crop, precision)
        except BiTError as e:
            print(f"left out {name}: {e}", flush=True)
            if left_out is not None:
                left_out[name] = str(e)
            continue
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
        low, mid, high = (speed_ratio(per_round, times["timm"]) if "timm" in times
                          else (None, None, None))
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


def eval_speed(batch: int, crop: int, rounds: int, npz: Path,
               names: list[str]) -> dict[str, float]:
    """Median img/s of each framework's `models.predict` (float32) on one batch."""
    import importlib
    x = np.random.default_rng(1).uniform(-1, 1, (batch, crop, crop, 3)).astype(np.float32)
    fns = {}
    for fw in names:
        m = importlib.import_module(f"bit_{fw}.models")
        model = m.load_npz(npz, device="cuda") if fw == "pytorch" and cuda_device() \
            else m.load_npz(npz)
        m.predict(model, x)
        fns[fw] = lambda m=m, model=model: m.predict(model, x)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for fw in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[fw]()
            times[fw].append(time.perf_counter() - t0)
    return {k: batch / float(np.median(v)) for k, v in times.items()}


# ---- input pipelines -----------------------------------------------------------------------
FOLDER_CLASSES = 4


PHOTO_SIZE = (375, 500)  # height, width: a typical photo of a user's image folder
# (resize, crop): what BiT-HyperRule picks for such photos, and for small images
PIPELINE_SIZES = ((512, 480), (160, 128))
PIPELINE_WORKERS = (1, 2)


def photo_folder(root: Path, n: int = 256, size: tuple[int, int] = PHOTO_SIZE) -> Path:
    """An image folder of real photos: random crops (60-100 % of the side) of scikit-learn's two
    sample photos, resized to `size` and re-encoded as JPEG at quality 90 (JPEGs of noise are
    3-4x larger than photos and slower to decode)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(FOLDER_CLASSES):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n // FOLDER_CLASSES if split == "train" else 2):
                photo = photos[rng.integers(len(photos))]
                scale = rng.uniform(0.6, 1.0)
                h, w = int(photo.shape[0] * scale), int(photo.shape[1] * scale)
                top = rng.integers(photo.shape[0] - h + 1)
                left = rng.integers(photo.shape[1] - w + 1)
                img = Image.fromarray(photo[top:top + h, left:left + w])
                img.resize(size[::-1], Image.BILINEAR).save(d / f"{i}.jpg", quality=90)
    return root


def _files(folder: Path) -> list[Path]:
    return sorted((folder / "train").glob("*/*.jpg"))


def _rate(images: int, run: Callable[[], object], repeats: int = 1) -> float:
    """img/s of `run`, the best of `repeats` (the first pass also builds tf.data's graphs)."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return images / best


def decode_ceiling(folder: Path, resizes: Sequence[int], pipelines: Sequence[str]
                   ) -> dict[str, float]:
    """img/s of decoding the folder's JPEGs alone ("<pipeline> decode") and decoding + resizing
    them to each of `resizes` ("<pipeline> decode+resize <size>"), on one core, with each
    pipeline's own decoder and resize (PIL + torch for PyTorch's, TensorFlow's ops for
    tf.data's): the most a pipeline worker can deliver."""
    files, out = _files(folder), {}
    for f in files:  # from the page cache, as an epoch after the first reads them
        f.read_bytes()
    if "pytorch" in pipelines:
        import torch

        from bit_pytorch import data as torch_data
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out["pytorch decode"] = _rate(len(files), lambda: [torch_data.decode(str(f))
                                                               for f in files], 3)
            for resize in resizes:
                out[f"pytorch decode+resize {resize}"] = _rate(len(files), lambda: [
                    torch_data.resize(torch_data.decode(str(f)), resize) for f in files], 3)
        finally:
            torch.set_num_threads(threads)
    if "tf.data" in pipelines:
        import tensorflow as tf

        def run(resize: int | None) -> None:
            def load(path):
                img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
                if resize:
                    img = tf.image.resize(tf.cast(img, tf.float32), (resize, resize),
                                          antialias=True)
                return img[0, 0, 0]  # a value, so that no op is pruned
            opts = tf.data.Options()
            opts.threading.private_threadpool_size = 1
            ds = tf.data.Dataset.from_tensor_slices([str(f) for f in files]).map(load)
            for _ in ds.with_options(opts):
                pass

        out["tf.data decode"] = _rate(len(files), lambda: run(None), 3)
        for resize in resizes:
            out[f"tf.data decode+resize {resize}"] = _rate(len(files), lambda: run(resize), 3)
    return out


def _consume(it: Iterator, n: int) -> None:
    for _ in range(n):  # one batch alive at a time, as in training
        next(it)


def _pipeline(name: str, batch: int, crop: int, workers: int, kwargs: dict) -> Iterator:
    if name == "pytorch":
        return framework("pytorch").make_backend(
            make_setup("pytorch", batch, crop, workers=workers, **kwargs)).train_batches(0)
    from bit_tfdata import pipeline as tfd
    return tfd.batches(tfd.train_dataset(make_setup("tf2", batch, crop, workers=workers,
                                                    **kwargs), 0))


def pipeline_speed(batch: int, batches: int, folder: Path,
                   pipelines: Sequence[str] = ("pytorch", "tf.data")) -> dict[str, float]:
    """img/s of the torchvision pipeline (PyTorch's) and of the shared tf.data one (JAX's and
    TF2's), model-free: digits at 160->128 px, and the photo folder at each PIPELINE_SIZES
    entry with each PIPELINE_WORKERS count, beside the one-core decode ceiling."""
    out = {}
    runs = [("digits 160->128", {}, 2, 128)]
    out.update(decode_ceiling(folder, [resize for resize, _ in PIPELINE_SIZES], pipelines))
    for resize, crop in PIPELINE_SIZES:
        for workers in PIPELINE_WORKERS:
            runs.append((f"photos {resize}->{crop} {workers} worker{'s' * (workers > 1)}",
                         {"dataset": "imagefolder", "datadir": str(folder),
                          "classes": FOLDER_CLASSES, "resize": resize}, workers, crop))
    for label, kwargs, workers, crop in runs:
        for name in pipelines:
            it = _pipeline(name, batch, crop, workers, kwargs)
            try:
                for _ in range(4):  # start the workers and fill the prefetch buffers
                    next(it)
                out[f"{name} {label}"] = _rate(batches * batch, lambda: _consume(it, batches))
            finally:  # no pipeline's workers or buffers may compete with the next one
                it.close()
                gc.collect()
    return out


# ---- memory of a step, per batch split (one fresh process each) ------------------------------
def step_memory(fw: str, batch: int, crop: int, split: int, precision: str = "fp32") -> float:
    """MiB of memory training steps add on top of the loaded model (fresh process)."""
    code = (f"import benchmarks.bench as b; print(b._measure_step_memory({fw!r}, {batch}, "
            f"{crop}, {split}, {precision!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if out.returncode:
        raise RuntimeError(f"measuring {fw}'s step memory failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _measure_step_memory(fw: str, batch: int, crop: int, split: int,
                         precision: str = "fp32") -> float:
    """Peak memory of two training steps above the loaded model and its batch, in MiB.

    Allocators keep freed memory, so the peak is taken over the first steps, before which no
    activation was ever allocated (for JAX and TF2 it includes compiling the step). On a GPU it
    is the framework's device allocator's peak, on a CPU the process's resident set.
    """
    configure([fw], precision)
    backend = framework(fw).make_backend(make_setup(fw, batch, crop, batch_split=split,
                                                    precision=precision))
    data = fixed_batch(fw, backend, batch, crop)
    base, peak = memory_probe(fw)
    start = base()
    for _ in range(2):
        backend.train_step(data, 0.001)
    return (peak() - start) / 2 ** 20


def memory_probe(fw: str) -> tuple[Callable[[], int], Callable[[], int]]:
    """(bytes in use now, peak bytes since the first call): `fw`'s GPU allocator where it runs on
    a GPU, else the resident set (whose peak the first call resets)."""
    if cuda_device() and fw == "pytorch":
        import torch
        return ((lambda: (torch.cuda.reset_peak_memory_stats(), torch.cuda.memory_allocated())[1]),
                torch.cuda.max_memory_allocated)
    if fw == "jax":
        import jax
        dev = jax.devices()[0]
        if dev.platform != "cpu":  # a fresh process: the peak so far is the loaded model's
            return (lambda: dev.memory_stats()["bytes_in_use"],
                    lambda: dev.memory_stats()["peak_bytes_in_use"])
    if fw == "tf2":
        import tensorflow as tf
        if tf.config.list_physical_devices("GPU"):
            info = tf.config.experimental.get_memory_info
            return ((lambda: (tf.config.experimental.reset_memory_stats("GPU:0"),
                              info("GPU:0")["current"])[1]),
                    lambda: info("GPU:0")["peak"])

    def rss() -> int:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the RSS
        return _status_kib("VmRSS") * 1024
    return rss, lambda: _status_kib("VmHWM") * 1024


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
    info["cuda"] = cuda_device()
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    p.add_argument("--pipeline_images", type=int, default=256,
                   help="photos in the input-pipeline benchmark's folder")
    p.add_argument("--pipeline_batches", type=int, default=32,
                   help="batches timed per input pipeline and size")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16/fp16: mixed precision, on a CUDA GPU only")
    p.add_argument("--frameworks", default=",".join(RUNNERS),
                   help="comma-separated, from " + ", ".join(RUNNERS) + "; those not installed "
                        "are left out with a note")
    args = p.parse_args(argv)
    args.frameworks = [n.strip() for n in args.frameworks.split(",") if n.strip()]
    unknown = [n for n in args.frameworks if n not in RUNNERS]
    if unknown:
        p.error(f"--frameworks: unknown {', '.join(unknown)}; choose from {', '.join(RUNNERS)}.")
    if args.precision != "fp32" and not cuda_device():
        p.error(f"--precision {args.precision} is mixed precision on a GPU, and this machine has "
                f"no CUDA GPU; on CPU every framework trains in float32, so drop the flag.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names, missing = installed(args.frameworks)
    for name, why in missing.items():
        print(f"left out {name}: {why}", flush=True)
    configure(names, args.precision)
    res: dict = {"hardware": hardware(), "batch": args.batch, "crop": args.crop,
                 "precision": args.precision, "arch": ARCH.name, "left_out": missing}
    if res["hardware"]["cuda"]:
        res["matmul_gflops"] = ceiling = gpu_matmul_gflops(args.precision)
        what = f"8192x8192 {args.precision} matmul on the GPU"
    else:
        res["matmul_gflops"] = ceiling = matmul_gflops()
        what = "2048x2048 float32 matmul"
    print(f"machine: {res['hardware']}\nceiling: {what} {ceiling:.0f} GFLOP/s", flush=True)
    flops = train_flops(ARCH, args.crop, args.crop, 10)
    res["train"] = train_steps(args.batch, args.crop, args.rounds, args.steps, names,
                               args.precision, res["left_out"])
    fws = [n for n in res["train"] if n != "timm"]
    for r in res["train"].values():
        r["gflops"] = flops * r["img_per_s"] / 1e9
        r["fraction_of_ceiling"] = r["gflops"] / ceiling
    with tempfile.TemporaryDirectory() as tmp:
        npz = checkpoint.write_random_checkpoint(Path(tmp) / "r50.npz", ARCH, 10)
        res["eval_img_per_s"] = eval_speed(args.batch, args.crop, args.rounds * 2, npz, fws)
        pipelines = []
        if "pytorch" in fws:
            pipelines.append("pytorch")
        if "tf2" in fws or ("jax" in fws and has_tensorflow()):  # their shared tf.data one
            pipelines.append("tf.data")
        if pipelines:
            folder = photo_folder(Path(tmp) / "images", args.pipeline_images)
            res["pipeline_img_per_s"] = pipeline_speed(args.batch, args.pipeline_batches, folder,
                                                       pipelines)
    if not args.skip_memory:
        res["memory_batch"] = args.memory_batch
        res["step_memory_kind"] = "GPU allocator peak" if res["hardware"]["cuda"] \
            else "resident set"
        res["step_memory_mib"] = {
            fw: {s: step_memory(fw, args.memory_batch, args.crop, s, args.precision)
                 for s in (1, 8)} for fw in fws}
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
    hw = res["hardware"]
    print(f"\nR50x1, {res['crop']} px, batch {res['batch']}, {res['precision']}, "
          f"{hw['cuda'] or hw.get('cpu', hw['machine'])}")
    print(f"{'training step':<14} {'img/s':>8} {'x timm':>7} {'per round':>11} {'GFLOP/s':>8} "
          f"{'of peak':>8} {'1st step s':>10}")
    for name, r in res["train"].items():
        first = f"{r['first_step_s']:.1f}" if r["first_step_s"] else "-"
        low, high = r["x_timm_range"]
        ratio = f"{r['x_timm']:7.2f}" if r["x_timm"] is not None else f"{'-':>7}"
        spread = f"{low:.2f}-{high:.2f}" if low is not None else "-"
        print(f"{name:<14} {r['img_per_s']:8.1f} {ratio} {spread:>11} "
              f"{r['gflops']:8.1f} {r['fraction_of_ceiling']:8.1%} {first:>10}")
    print("evaluation img/s (float32): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                     res["eval_img_per_s"].items()))
    if "pipeline_img_per_s" in res:
        print("input pipeline img/s (model-free; decode rows: one core, the ceiling):")
        for k, v in res["pipeline_img_per_s"].items():
            print(f"  {k:<38} {v:6.0f}")
    for fw, m in res.get("step_memory_mib", {}).items():
        print(f"step memory ({res['step_memory_kind']}) {fw}, batch {res['memory_batch']}: "
              f"split 1 {m[1]:.0f} MiB, "
              f"split 8 {m[8]:.0f} MiB ({m[8] / max(m[1], 1e-9):.2f}x)")
    print(f"few-shot 5/class over 1.28 M labels: {res['few_shot_5x1000_of_1.28M_s'] * 1e3:.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
