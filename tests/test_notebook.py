"""experiments/colab_tpu.ipynb runs end to end on CPU in quickstart mode, and restores in a fresh kernel.

The kernel is this interpreter (a kernelspec written to a temporary JUPYTER_PATH) with the repository
on PYTHONPATH and two simulated CPU devices, so the notebook's sharded batches are exercised.
HYBRIDHASH_NOTEBOOK_STEPS cuts the quickstart run to keep CI short.
"""

import json
import os
import pathlib
import sys

import nbclient
import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "colab_tpu.ipynb"
STEPS = 40


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
  spec = tmp_path / "jupyter" / "kernels" / "hybridhash-test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "hybridhash test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "2")
  monkeypatch.setenv("HYBRIDHASH_NOTEBOOK_QUICKSTART", "1")
  monkeypatch.setenv("HYBRIDHASH_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("HYBRIDHASH_NOTEBOOK_STEPS", str(STEPS))
  return "hybridhash-test"


def _execute(nb, kernel_name: str):
  # Run from experiments/, where a user opens it: the notebook finds the checkout above itself.
  client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=600,
                                   resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()
  return nb


def _text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_notebook_is_stored_clean():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert "QUICKSTART = False" in code[0].source


@pytest.mark.slow
def test_notebook_quickstart_end_to_end(kernel, tmp_path):
  nb = _execute(nbformat.read(NOTEBOOK, as_version=4), kernel)
  results = json.loads((tmp_path / "work" / "eval" / "results.json").read_text())
  assert results["step"] == STEPS and results["dataset"] == "digits" and results["bits"] == 32
  assert (results["num_query"], results["num_database"]) == (200, 597)  # configs/quickstart.py's split
  assert 0.1 < results["map"] <= 1.0  # random 32-bit codes score about 0.1
  outputs = "".join(_text(c) for c in nb.cells if c.cell_type == "code")
  assert "QUICKSTART=True" in outputs and "2 devices" in outputs
  assert f"final mAP {results['map']:.4f} (step {STEPS})" in outputs
  plots = [c for c in nb.cells if "plots" in c.metadata.get("tags", [])]
  assert sum(o.output_type == "display_data" and "image/png" in o.data for o in plots[0].outputs) == 3

  # A fresh kernel that only runs the settings and restore cells reproduces the final evaluation.
  fresh = nbformat.v4.new_notebook(metadata=nb.metadata, cells=[
      nbformat.v4.new_code_cell(c.source) for c in nbformat.read(NOTEBOOK, as_version=4).cells
      if {"settings", "restore"} & set(c.metadata.get("tags", []))])
  assert len(fresh.cells) == 2
  fresh = _execute(fresh, kernel)
  assert f"restored step {STEPS}: mAP@597 {results['map']:.4f}" in _text(fresh.cells[1])
  restored = json.loads((tmp_path / "work" / "eval" / "results.json").read_text())
  assert restored["map"] == pytest.approx(results["map"], abs=1e-6) and restored["step"] == STEPS
