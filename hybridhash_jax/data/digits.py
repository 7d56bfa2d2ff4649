"""scikit-learn's 8x8 handwritten digits: 1,797 real labelled images that ship with scikit-learn.

The offline quickstart dataset. The 0..16 grey levels become uint8 RGB; the pipeline upsamples
them (bilinearly, like CIFAR-10) to the model's size. Split per class like image folders.
"""

import numpy as np

from hybridhash_jax import errors
from hybridhash_jax.data import sources
from hybridhash_jax.data import splits

NUM_CLASSES = 10


def load() -> tuple[np.ndarray, np.ndarray]:
  """uint8 (1797, 8, 8, 3) images and their class ids."""
  from sklearn import datasets  # scikit-learn is only needed here
  digits = datasets.load_digits()
  gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return np.repeat(gray[..., None], 3, axis=-1), digits.target.astype(np.int64)


def build(data, workdir: str | None) -> dict:
  """{'query', 'train', 'database'} sources for `config.data`."""
  if data.num_classes not in (-1, NUM_CLASSES):
    raise errors.DataError(f"config.data.num_classes={data.num_classes}: digits has {NUM_CLASSES} classes")
  images, ids = load()
  meta = {"data.name": "digits", "data.split_seed": data.split_seed, "data.query_per_class": data.query_per_class,
          "data.train_per_class": data.train_per_class, "num_examples": len(ids)}
  rows = splits.load_or_make(workdir, meta, lambda: splits.per_class(
      ids, data.query_per_class, data.train_per_class, data.split_seed, where="digits"))
  onehot = np.eye(NUM_CLASSES, dtype=np.uint8)[ids]
  return {k: sources.ArraySource(f"digits/{k}", images[r], onehot[r]) for k, r in rows.items()}
