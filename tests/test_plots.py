"""The figures are written as valid PNGs of plausible size."""

import matplotlib.figure
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


def test_retrieval_grid_draws_the_query_like_its_results(tmp_path, monkeypatch):
  """The query and every result show their whole image, drawn at the same size on the page."""
  rng = np.random.default_rng(1)
  queries = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  database = rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8)
  top = rng.integers(0, 30, (2, 10))
  drawn = []
  real = matplotlib.figure.Figure.savefig

  def measure(fig, *args, **kwargs):
    fig.canvas.draw()
    for ax in fig.axes:
      (image,) = ax.get_images()
      array, extent = np.asarray(image.get_array()), image.get_window_extent()
      drawn.append((array, extent.width * 16 / array.shape[1], extent.height * 16 / array.shape[0]))
    real(fig, *args, **kwargs)

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", measure)
  plots.plot_retrieval_grid(queries, database, top, rng.random((2, 10)) < 0.5, tmp_path / "grid.png")
  assert len(drawn) == 22
  for k, (array, width, height) in enumerate(drawn):
    row, col = divmod(k, 11)
    want = queries[row] if col == 0 else database[top[row, col - 1]]
    pad = (array.shape[0] - 16) // 2
    np.testing.assert_array_equal(array[pad:pad + 16, pad:pad + 16], want)  # the whole image, not overdrawn
    np.testing.assert_allclose((width, height), drawn[0][1:], rtol=1e-6)  # at the query's drawn size
