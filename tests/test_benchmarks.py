"""The arithmetic and plumbing of `make bench` and `make profile` (not their timings)."""

from __future__ import annotations

import json
import mmap
import sys

import numpy as np
import pytest

from benchmarks import bench, profile

CONV_FWD = ("onednn_verbose,v1,primitive,exec,cpu,convolution,jit:avx2,forward_training,"
            "src:f32::blocked:acdb::f0 wei:f32:a:blocked:ABcd8b8a::f0,,alg:convolution_direct,"
            "mb16_ic64oc64_ih34oh32kh3sh1dh0ph0_iw34ow32kw3sw1dw0pw0,{ms}")
REORDER = ("onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src:f32::blocked:abcd::f0 "
           "dst:f32::blocked:aBcd8b::f0,,,16x64x32x32,{ms}")


def test_speed_ratio_is_per_round_reference_over_own():
    # Round 2 is slow for both (machine drift): its ratio is still 2, unlike a ratio of pooled
    # medians.
    own = [[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]]
    timm = [[2.0, 2.0], [4.0, 4.0], [3.0, 3.0]]
    assert bench.speed_ratio(own, timm) == (2.0, 2.0, 3.0)


def test_onednn_breakdown_sums_between_markers_per_step():
    lines = [CONV_FWD.format(ms=100.0),  # warm-up, before the marker: not counted
             "onednn_verbose,v1,primitive,info,template:operation,engine,primitive,exec_time",
             profile.START,
             CONV_FWD.format(ms=3.0), REORDER.format(ms=0.5), CONV_FWD.format(ms=5.0),
             "not a verbose line",
             f"{profile.END} 12.0",
             CONV_FWD.format(ms=100.0)]
    rows = profile.onednn_breakdown(lines, steps=2)
    assert rows == {"convolution forward_training jit:avx2": [4.0, 1.0],
                    "reorder undef jit:uni": [0.25, 0.5]}


def test_xla_breakdown_names_each_thunk_by_its_model_op():
    hlo = """
  %ynn_fusion.7 = f32[2304,256]{1,0} fusion(%a, %b), kind=kCustom, calls=%c, metadata={op_name="jit(core)/transpose(jvp(ResNetV2))/block3/unit01/b/standardized_conv2d/dot_general" stack_frame_id=1}
  ROOT %ynn_fusion.9 = f32[16,32,32,64]{3,2,1,0} fusion(%d, %e), kind=kCustom, calls=%f, metadata={op_name="jit(core)/jvp(ResNetV2)/block1/unit02/b/standardized_conv2d/conv_general_dilated" stack_frame_id=2}
"""
    names = profile.hlo_op_names(hlo)
    assert names["ynn_fusion.9"].endswith("unit02/b/standardized_conv2d/conv_general_dilated")
    events = [("ynn_fusion.7", 4e6), ("ynn_fusion.9", 2e6), ("ynn_fusion.9", 2e6),
              ("copy.3", 1e6)]
    rows = profile.xla_breakdown(events, names, steps=2)
    assert rows == {
        "backward b/standardized_conv2d/dot_general [ynn_fusion]": [2.0, 0.5],
        "forward b/standardized_conv2d/conv_general_dilated [ynn_fusion]": [2.0, 1.0],
        "other [copy]": [0.5, 0.5]}


@pytest.mark.parametrize("op_name, category", [
    ("jit(core)/jvp(ResNetV2)/root_block/standardized_conv2d/conv_general_dilated",
     "forward root_block/standardized_conv2d/conv_general_dilated"),
    ("jit(core)/transpose(jvp(ResNetV2))/block4/unit03/c/group_norm/reduce_sum",
     "backward c/group_norm/reduce_sum"),
])
def test_op_category(op_name, category):
    assert profile.op_category(op_name) == category


# ---- the bench's own plumbing (no framework compiles here) ---------------------------------
def test_bench_refuses_mixed_precision_without_a_gpu(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("bf16 is valid with a CUDA GPU")
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--precision", "bf16"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--precision bf16" in err and "no CUDA GPU" in err and "drop the flag" in err


def test_bench_refuses_an_unknown_framework(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--frameworks", "timm,mxnet"])
    assert "unknown mxnet" in capsys.readouterr().err


def test_bench_leaves_out_a_framework_that_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # find_spec now finds nothing
    ok, missing = bench.installed(["timm", "pytorch", "tf2"])
    assert ok == ["timm", "pytorch"] and missing == {"tf2": "not installed: tensorflow"}


def test_jax_batch_without_tensorflow_has_the_pipelines_form(monkeypatch):
    """On a GPU image without TensorFlow the JAX step runs on a batch made by the bench: the same
    arrays, dtypes and shardings as its tf.data batch, so the same compiled step."""
    backend = bench.framework("jax").make_backend(bench.make_setup("jax", 4, 32))
    real = bench.fixed_batch("jax", backend, 4, 32)
    monkeypatch.setattr(bench, "has_tensorflow", lambda: False)
    made = bench.fixed_batch("jax", backend, 4, 32)
    form = lambda b: {k: (v.shape, v.dtype, v.sharding) for k, v in b.items()}  # noqa: E731
    assert form(made) == form(real)


def test_resident_memory_probe_sees_an_allocation():
    start, peak = bench.memory_probe("pytorch")  # no GPU: the resident set
    base = start()
    # Fresh pages from the kernel: a malloc'ed block could reuse heap pages already resident
    # (runtime.configure("jax") keeps freed memory), which would not raise the resident set.
    block = mmap.mmap(-1, 64 * 2 ** 20)
    np.frombuffer(block, np.uint8)[:] = 1  # touch every page
    block.close()
    assert peak() - base >= 60 * 2 ** 20


def test_bench_runs_timm_and_pytorch_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--frameworks", "timm,pytorch", "--batch", "2", "--crop", "32",
                       "--rounds", "2", "--steps", "1", "--skip_memory", "--pipeline_images", "16",
                       "--pipeline_batches", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["train"]) == ["timm", "pytorch"] and res["precision"] == "fp32"
    assert res["train"]["timm"]["x_timm"] == 1.0 and res["train"]["pytorch"]["img_per_s"] > 0
    assert list(res["eval_img_per_s"]) == ["pytorch"]
    pipes = res["pipeline_img_per_s"]
    assert {"pytorch digits 160->128", "pytorch photos 512->480 1 worker",
            "pytorch photos 160->128 2 workers", "pytorch decode",
            "pytorch decode+resize 160"} <= set(pipes), pipes
    assert all(k.startswith("pytorch ") and v > 0 for k, v in pipes.items())
    assert "pytorch" in capsys.readouterr().out
