"""experiments/bench_map.py --plot: the database sizes it sweeps and the figure it draws."""

import types

import numpy as np
from PIL import Image

from experiments import bench_map


def _result(db, seconds):
  return {"db": db, "queries": 100, "load_average": (1.0, 1.5, 2.0),
          "kernels": [{"kernel": "host", "steady_s": seconds}],
          "baseline": {"time_s_scaled_to_all_queries": 50 * seconds},
          "faiss_search": {"k": 1000, "threads": 2, "time_s": 3 * seconds}}


def test_sweep_runs_each_database_size_at_k_all(monkeypatch):
  calls = []
  monkeypatch.setattr(bench_map, "bench", lambda name, spec, args: calls.append((name, spec)) or _result(spec["db"], 1))
  args = types.SimpleNamespace(plot_db="1000,20000", plot_queries=100)
  results = bench_map.sweep(args)
  assert [r["db"] for r in results] == [1000, 20000]
  assert calls == [("db1000", dict(queries=100, db=1000, bits=64, classes=10, top_k=-1)),
                   ("db20000", dict(queries=100, db=20000, bits=64, classes=10, top_k=-1))]


def test_plot_sweep_draws_the_three_lines(tmp_path):
  png = tmp_path / "ranking.png"
  bench_map.plot_sweep([_result(db, db / 1e5) for db in (1000, 10000, 100000)], str(png))
  image = np.asarray(Image.open(png).convert("RGB"))
  assert image.shape[0] > 300 and image.shape[1] > 400
  colours = {tuple(c) for c in np.unique(image.reshape(-1, 3), axis=0)}
  assert {(31, 119, 180), (255, 127, 14), (44, 160, 44)} <= colours  # matplotlib's first three line colours
