"""The figures are written as valid PNGs of plausible size."""

import numpy as np
import pytest
from PIL import Image

from hybridhash_jax import plots


def _check_png(path, min_side):
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert min(im.size) >= min_side, im.size


def test_curves(tmp_path):
  r = np.linspace(0, 1, 9)
  plots.plot_pr_curve(dict(radius=np.arange(9), precision=1 - r / 2, recall=r), tmp_path / "pr.png")
  plots.plot_precision_at_n(dict(n=np.arange(100, 1001, 100), precision=np.linspace(0.9, 0.6, 10)),
                            tmp_path / "pn.png")
  _check_png(tmp_path / "pr.png", 300)
  _check_png(tmp_path / "pn.png", 300)


def test_retrieval_grid(tmp_path):
  rng = np.random.default_rng(0)
  queries = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  database = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
  top = rng.integers(0, 50, (3, 10))
  relevance = rng.random((3, 10)) < 0.5
  plots.plot_retrieval_grid(queries, database, top, relevance, tmp_path / "grid.png")
  plots.plot_retrieval_grid(queries, database[top.reshape(-1)], top, relevance, tmp_path / "grid2.png")
  _check_png(tmp_path / "grid.png", 200)
  assert (tmp_path / "grid2.png").stat().st_size > 10_000


def test_grid_rejects_float_images(tmp_path):
  with pytest.raises(ValueError, match="uint8"):
    plots.plot_retrieval_grid(np.zeros((1, 8, 8, 3)), np.zeros((2, 8, 8, 3), np.uint8), np.zeros((1, 2), int),
                              np.ones((1, 2), bool), tmp_path / "x.png")
