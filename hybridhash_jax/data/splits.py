"""Seeded per-class splits, written to the workdir once and reused from it.

Reuse is what makes evaluation, resumed runs and other hosts see the split that training saw,
even if the seeded draw or the files on disk change later. The seed drives
`numpy.random.default_rng`, so a seed gives the same split on any machine.
"""

from typing import Callable

from etils import epath
import numpy as np

from hybridhash_jax import errors
from hybridhash_jax import files

SPLITS_FILE = "splits.json"
SPLIT_NAMES = ("query", "train", "database")


def per_class(classes: np.ndarray, query_per_class: int, train_per_class: int, seed: int,
              database: str = "rest", *, where: str = "dataset", class_names=None) -> dict[str, np.ndarray]:
  """Rows of each split: per class, a seeded permutation gives `query_per_class` queries, then
  `train_per_class` training rows (-1: all the rest), then the rest. `database` is "rest",
  "train+rest" (the training rows are drawn from the database, as DeepHash's NUS-WIDE protocol
  does) or "train" (the database is the training set). Each split lists its rows in ascending order.
  """
  if train_per_class == -1 and database == "rest":
    raise errors.ConfigError(f"{where}: train_per_class=-1 takes every image but the queries, so the database must "
                     "include the training images")
  rng = np.random.default_rng(seed)
  num_classes = int(classes.max()) + 1
  train_need = 1 if train_per_class == -1 else train_per_class
  need = query_per_class + train_need + (database == "rest")
  parts = {name: [] for name in ("query", "train", "rest")}
  for c in range(num_classes):
    rows = np.flatnonzero(classes == c)
    if len(rows) < need:
      name = class_names[c] if class_names is not None else c
      raise errors.DataError(
          f"{where}: class {name!r} has {len(rows)} images, fewer than the {need} the split needs "
          f"(config.data.query_per_class={query_per_class}, config.data.train_per_class={train_per_class}"
          f"{', and one for the database' if database == 'rest' else ''}); "
          + (f"lower config.data.query_per_class to at most {len(rows) - 1}" if train_per_class == -1 else
             f"lower the two to at most {len(rows) - (database == 'rest')} together")
          + ", or add images to that class")
    rows = rng.permutation(rows)
    end = len(rows) if train_per_class == -1 else query_per_class + train_per_class
    parts["query"].append(rows[:query_per_class])
    parts["train"].append(rows[query_per_class:end])
    parts["rest"].append(rows[end:])
  query, train, rest = (np.sort(np.concatenate(parts[k])) for k in ("query", "train", "rest"))
  db = {"rest": rest, "train+rest": np.sort(np.concatenate([train, rest])), "train": train}[database]
  return {"query": query, "train": train, "database": db}


def load_or_make(workdir: str | None, meta: dict, make: Callable[[], dict]) -> dict:
  """`workdir/splits.json` if present (after checking it was made for `meta`), else `make()` saved there.

  Split entries are whatever `make` returns per split (row numbers or relative file paths).
  """
  if not workdir:
    return make()
  path = epath.Path(workdir) / SPLITS_FILE
  if path.exists():
    saved = files.read_json(path)
    diffs = [f"{k}: {path} has {saved['meta'].get(k)!r}, config has {v!r}"
             for k, v in meta.items() if saved["meta"].get(k) != v]
    if diffs:
      raise errors.DataError(f"the saved split {path} was made for other data; use a fresh workdir or delete it:\n  "
                       + "\n  ".join(diffs))
    return {k: np.asarray(saved[k]) for k in SPLIT_NAMES}
  splits = make()
  path.parent.mkdir(parents=True, exist_ok=True)
  # Whole or not at all; hosts sharing the workdir write the same bytes.
  files.write_json(path, {"meta": meta, **{k: np.asarray(splits[k]).tolist() for k in SPLIT_NAMES}})
  return splits
