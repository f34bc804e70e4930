"""The install extras: CPU builds by default, the frameworks' CUDA builds for GPU users, and the
installed metadata says the same as pyproject.toml."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
SELF = "bit-reference"


def extras() -> dict[str, list[Requirement]]:
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {k: [Requirement(r) for r in v]
            for k, v in table["project"]["optional-dependencies"].items()}


def expand(name: str, table: dict[str, list[Requirement]]) -> dict[str, Requirement]:
    """{distribution: requirement} an extra installs, its `bit-reference[...]` ones included."""
    out: dict[str, Requirement] = {}
    for req in table[name]:
        if req.name == SELF:
            for inner in sorted(req.extras):
                out.update(expand(inner, table))
        else:
            out[req.name] = req
    return out


@pytest.mark.parametrize("extra", ["all", "pytorch", "jax", "tf2"])
def test_the_default_extras_install_cpu_builds(extra):
    got = expand(extra, extras())
    assert "tensorflow" not in got  # the CPU build is tensorflow-cpu
    assert all(not req.extras for name, req in got.items() if name in ("jax", "tensorflow-cpu"))
    if extra == "all":
        assert {"torch", "torchvision", "jax", "jaxlib", "flax", "optax", "tensorflow-cpu",
                "keras", "tensorflow-datasets"} <= set(got)


@pytest.mark.parametrize("extra, cuda_packages", [
    ("cuda", {"jax": {"cuda12"}, "tensorflow": {"and-cuda"}}),
    ("jax-cuda", {"jax": {"cuda12"}}),
    ("tf2-cuda", {"tensorflow": {"and-cuda"}}),
])
def test_the_cuda_extras_bring_the_gpu_builds(extra, cuda_packages):
    table = extras()
    got = expand(extra, table)
    for name, wanted in cuda_packages.items():
        assert got[name].extras == wanted, got[name]
    if "tensorflow" in got:  # both would install the same `tensorflow` package
        assert "tensorflow-cpu" not in got
    # Each framework at the versions its CPU extra pins.
    cpu = expand("all", table)
    for name, req in got.items():
        base = "tensorflow-cpu" if name == "tensorflow" else name
        if base in cpu:
            assert req.specifier == cpu[base].specifier, name
    if extra == "cuda":
        assert set(expand("all", table)) - {"tensorflow-cpu", "jaxlib"} <= set(got)


def test_the_installed_metadata_has_the_extras():
    """What pip resolves from the installed project, not only what the file says."""
    try:
        requires = importlib.metadata.requires(SELF) or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the project is not installed (make install installs it)")
    by_extra: dict[str, set[str]] = {}
    for line in requires:
        req = Requirement(line)
        for extra in ("cuda", "jax-cuda", "tf2-cuda"):
            if req.marker and req.marker.evaluate({"extra": extra}):
                by_extra.setdefault(extra, set()).add(f"{req.name}{sorted(req.extras)}")
    assert "jax['cuda12']" in by_extra["cuda"] and "jax['cuda12']" in by_extra["jax-cuda"]
    assert "tensorflow['and-cuda']" in by_extra["tf2-cuda"]


def test_every_install_can_plot():
    """The curves `make demo` and `bit_common.results --plot` draw need matplotlib, which each
    framework's extra brings through the base requirements."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())
    base = {Requirement(r).name for r in table["project"]["dependencies"]}
    assert "matplotlib" in base


def test_every_install_writes_and_reads_tensorboard_files():
    """The run folder's event files (tensorboardX) and the `tensorboard` command come with every
    install, through the base requirements, and the installed versions satisfy them."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())
    base = {r.name: r for r in map(Requirement, table["project"]["dependencies"])}
    for name in ("tensorboardX", "tensorboard"):
        assert importlib.metadata.version(name) in base[name].specifier, name
