"""A folder of labelled images: `root/<class_name>/<image>`, one sub-folder per class.

Classes are the sorted sub-folder names (their index is the label). As in DeepHash's NUS-WIDE
protocol, each class is split with a seeded permutation into `config.data.query_per_class` held-out
queries and a database of the rest, from which `train_per_class` training images are drawn (-1:
train on the whole database). The split is saved as relative paths in `workdir/splits.json`, so
images added later do not shift it. Files without an image extension and hidden files are ignored.
"""

import os

import numpy as np

from hybridhash_jax import errors
from hybridhash_jax.data import images
from hybridhash_jax.data import sources
from hybridhash_jax.data import splits


def scan(root: str) -> tuple[list[str], list[str], np.ndarray]:
  """Sorted class names, image paths relative to `root`, and each image's class id."""
  if not os.path.isdir(root):
    raise errors.NotFoundError(f"config.data.root={root!r}: not a folder")
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
  if not classes:
    raise errors.DataError(f"config.data.root={root!r}: no class sub-folders")
  files, ids = [], []
  for c, name in enumerate(classes):
    found = sorted(e.name for e in os.scandir(os.path.join(root, name))
                   if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(images.EXTENSIONS))
    if not found:
      raise errors.DataError(
          f"{os.path.join(root, name)}: class folder with no images ({', '.join(images.EXTENSIONS)})")
    files += [f"{name}/{f}" for f in found]
    ids += [c] * len(found)
  return classes, files, np.asarray(ids, np.int64)


def build(data, workdir: str | None) -> dict:
  """{'query', 'train', 'database'} sources for `config.data`."""
  classes, files, ids = scan(data.root)
  if data.num_classes not in (-1, len(classes)):
    raise errors.DataError(f"config.data.num_classes={data.num_classes} but {data.root} has {len(classes)} class "
                     "folders; set it to -1 (count the folders) or to their number")
  meta = {"data.name": "folder", "data.split_seed": data.split_seed, "data.query_per_class": data.query_per_class,
          "data.train_per_class": data.train_per_class, "classes": classes}

  def make():
    rows = splits.per_class(ids, data.query_per_class, data.train_per_class, data.split_seed, "train+rest",
                            where=f"config.data.root={data.root!r}", class_names=classes)
    return {k: [files[r] for r in v] for k, v in rows.items()}

  index = {c: i for i, c in enumerate(classes)}
  out = {}
  for split, paths in splits.load_or_make(workdir, meta, make).items():
    paths = [str(p) for p in paths]
    if data.on_bad_image == "error":
      for p in paths:
        if not os.path.isfile(os.path.join(data.root, p)):
          raise errors.NotFoundError(f"{os.path.join(data.root, p)}: image of the saved {split} split not found")
    labels = np.zeros((len(paths), len(classes)), np.uint8)
    labels[np.arange(len(paths)), [index[p.split("/", 1)[0]] for p in paths]] = 1
    out[split] = sources.FileSource(f"folder/{split}", data.root, paths, labels, data.on_bad_image, workdir)
  return out
