"""The three colabs run top to bottom, offline, in their small configuration."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "colabs"))
import make_notebooks  # noqa: E402


def test_committed_notebooks_are_generated_from_the_story():
    for fw in make_notebooks.TITLES:
        committed = nbformat.read(make_notebooks.path_of(fw), as_version=4)
        assert committed == make_notebooks.notebook(fw), (
            f"{make_notebooks.path_of(fw).name} is stale: run python colabs/make_notebooks.py")


# The three notebooks are generated from one story (test above) and differ only in the package
# they import (and TF2's export cell), so the default suite runs the PyTorch one; the JAX and TF2
# runs (about 2 minutes each, mostly their fine-tuning command compiling) are in `make test-slow`.
# Their model API, CLI and SavedModel export have their own tests in the default suite.
@pytest.mark.parametrize("fw", [fw if fw == "pytorch" else pytest.param(fw, marks=pytest.mark.slow)
                                for fw in make_notebooks.TITLES])
def test_notebook_runs_offline(fw, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("BIT_COLAB_SMALL", "1")
    monkeypatch.setenv("BIT_COLAB_WORKDIR", str(tmp_path))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    nb = nbformat.read(make_notebooks.path_of(fw), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "colabs")}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []))
    assert "RANDOM checkpoint" in text or "released weights" in text
    assert "final top-1 on the digits test split" in text
    assert "reloaded, max |logit difference|: 0.0" in text
    assert (tmp_path / "predictions.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "fewshot" / "model.npz").exists()
