"""experiments/quickstart_curves.py: the runs it starts, the curves it reads back, the JSON and the plot."""

import json
import os
import types

from absl.testing import flagsaver
import numpy as np
from PIL import Image
import pytest

from experiments import quickstart_curves
from experiments import seed_runs


def _fake_main_run(runs, curves):
  """Stands in for `python -m hybridhash_jax.main`: records the command, writes metrics.jsonl as train.py does
  (a loss row per log step; an eval row, at the same step as a loss row, per evaluation)."""
  def run(cmd, env, cwd, **_):
    assert os.path.exists(os.path.join(cwd, "configs", "quickstart.py"))
    workdir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
    seed = int(next(a.split("=", 1)[1] for a in cmd if a.startswith("--config.seed=")))
    runs.append((cmd, env["JAX_NUM_CPU_DEVICES"]))
    os.makedirs(workdir)
    with open(f"{workdir}/metrics.jsonl", "w") as f:
      for step, loss in curves[seed]["loss"]:
        f.write(json.dumps({"step": step, "loss": loss, "grad_norm": 0.5, "images_per_sec": 900.0}) + "\n")
        if step in dict(curves[seed]["map"]):
          f.write(json.dumps({"step": step, "eval_map": dict(curves[seed]["map"])[step],
                              "eval_map_tie_aware": 0.0}) + "\n")
    return types.SimpleNamespace(returncode=0, stderr="")
  return run


_CURVES = {
    4: {"loss": [[20, 1.2], [40, 0.9], [60, 0.7]], "map": [[40, 0.6], [60, 0.95]]},
    7: {"loss": [[20, 1.1], [40, 0.8], [60, 0.5]], "map": [[40, 0.7], [60, 0.98]]},
}


def test_runs_each_seed_and_reads_its_curves(monkeypatch, tmp_path, capsys):
  runs = []
  monkeypatch.setattr(seed_runs, "subprocess", types.SimpleNamespace(run=_fake_main_run(runs, _CURVES)))
  (tmp_path / "seed4_dev2").mkdir()
  (tmp_path / "seed4_dev2" / "metrics.jsonl").write_text('{"step": 999, "loss": 9.0}\n')  # a stale run: replaced
  png = tmp_path / "curves.png"
  with flagsaver.flagsaver(out=str(tmp_path), seeds=["4", "7"], devices=2, eval_every_epochs=3, plot=str(png)):
    quickstart_curves.main([])
  assert [d for _, d in runs] == ["2", "2"]
  assert all("--config=configs/quickstart.py" in c and "--config.eval_every_epochs=3" in c
             and f"--workdir={tmp_path / f'seed{s}_dev2'}" in c for (c, _), s in zip(runs, (4, 7)))
  table = json.loads(capsys.readouterr().out)
  assert [(r["seed"], r["loss"], r["map"], r["final_map"]) for r in table["runs"]] == [
      (4, _CURVES[4]["loss"], _CURVES[4]["map"], 0.95), (7, _CURVES[7]["loss"], _CURVES[7]["map"], 0.98)]
  assert table["final_map_range"] == [0.95, 0.98] and table["devices"] == 2 and table["eval_every_epochs"] == 3
  image = np.asarray(Image.open(png))
  assert image.shape[1] > image.shape[0] > 200  # two panels side by side
  assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10  # something was drawn


def test_a_failed_run_stops_with_its_log(monkeypatch, tmp_path):
  failed = lambda cmd, env, **_: types.SimpleNamespace(returncode=1, stderr="error: config.seed: boom")
  monkeypatch.setattr(seed_runs, "subprocess", types.SimpleNamespace(run=failed))
  with flagsaver.flagsaver(out=str(tmp_path), seeds=["0"]), pytest.raises(SystemExit, match=r"(?s)seed 0 failed.*boom"):
    quickstart_curves.main([])


def test_a_run_without_an_evaluation_is_an_error(monkeypatch, tmp_path):
  no_eval = _fake_main_run([], {0: {"loss": [[20, 1.0]], "map": []}})
  monkeypatch.setattr(seed_runs, "subprocess", types.SimpleNamespace(run=no_eval))
  with flagsaver.flagsaver(out=str(tmp_path), seeds=["0"]), pytest.raises(SystemExit, match="no eval_map"):
    quickstart_curves.main([])
