"""Retrieval figures for `workdir/eval/`: PR curve, precision@N, and a retrieval grid (matplotlib, Agg).

Each is rendered in memory and written whole (`files.write_bytes`), to any epath (local or bucket).
"""

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from hybridhash_jax import files

_GREEN, _RED, _WHITE = (0, 170, 0), (220, 0, 0), (255, 255, 255)


def plot_pr_curve(pr: dict, path: str) -> None:
  """`pr` has precision and recall per Hamming radius (as `metrics.pr_curve_by_radius` returns)."""
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.plot(np.asarray(pr["recall"]), np.asarray(pr["precision"]), marker=".")
  ax.set(xlabel="recall", ylabel="precision", title="PR by Hamming radius", xlim=(0, 1), ylim=(0, 1.02))
  ax.grid(alpha=0.3)
  fig.tight_layout()
  _save(fig, path, dpi=100)


def plot_precision_at_n(pn: dict, path: str) -> None:
  """`pn` has n (cutoffs) and precision (mean precision@n)."""
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.plot(np.asarray(pn["n"]), np.asarray(pn["precision"]), marker=".")
  ax.set(xlabel="N", ylabel="precision@N", title="Precision@N", ylim=(0, 1.02))
  ax.grid(alpha=0.3)
  fig.tight_layout()
  _save(fig, path, dpi=100)


def _save(fig, path, dpi: int) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  plt.close(fig)
  files.write_bytes(path, buf.getvalue())


def _framed(image: np.ndarray, color) -> np.ndarray:
  """The whole image inside a frame of `color` (added around it, 1/16 of its side, at least 1 px)."""
  width = max(1, round(image.shape[0] / 16))
  out = np.empty((image.shape[0] + 2 * width, image.shape[1] + 2 * width, 3), np.uint8)
  out[...] = color
  out[width:-width, width:-width] = image
  return out


def plot_retrieval_grid(query_images, db_images, topk_indices, relevance, path: str) -> None:
  """One row per query: the query (framed white), then its retrieved items framed green (relevant) or red.

  Every cell is the same size and shows its whole image at the same scale.

  Images are uint8 NHWC. `db_images` is either the whole database (indexed by `topk_indices`) or
  exactly the retrieved images in `topk_indices.reshape(-1)` order.
  """
  query_images, db_images = np.asarray(query_images), np.asarray(db_images)
  topk, relevance = np.asarray(topk_indices), np.asarray(relevance, bool)
  if query_images.ndim != 4 or db_images.ndim != 4 or query_images.dtype != np.uint8 or db_images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 NHWC, got {query_images.dtype}{query_images.shape} and "
                     f"{db_images.dtype}{db_images.shape}")
  if topk.shape != relevance.shape or topk.shape[0] != len(query_images):
    raise ValueError(f"topk_indices {topk.shape}, relevance {relevance.shape} and {len(query_images)} queries "
                     "do not match")
  retrieved = db_images.reshape(*topk.shape, *db_images.shape[1:]) if len(db_images) == topk.size else db_images[topk]
  rows, cols = topk.shape[0], topk.shape[1] + 1
  fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows), squeeze=False)
  for i in range(rows):
    axes[i, 0].imshow(_framed(query_images[i], _WHITE))
    axes[i, 0].set_title("query", fontsize=7)
    for j in range(topk.shape[1]):
      axes[i, j + 1].imshow(_framed(retrieved[i, j], _GREEN if relevance[i, j] else _RED))
  for ax in axes.ravel():
    ax.axis("off")
  fig.tight_layout()
  _save(fig, path, dpi=80)
