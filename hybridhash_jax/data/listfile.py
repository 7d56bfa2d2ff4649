"""DeepHash-style list files: `train.txt`, `test.txt` (the queries) and `database.txt`.

Each line is `relative/path.jpg 0 1 0 ... 1`: an image under `config.data.root` and its multi-hot
label vector of `config.data.num_classes` entries. The lists are checked whole before training:
a wrong width, a non-numeric or non-0/1 label, an empty list or (with on_bad_image="error") a
missing image is an error naming the file and line.
"""

import os

import numpy as np

from hybridhash_jax import errors
from hybridhash_jax.data import sources

# The DeepHash protocols' sizes; `database=None` is "the rest" of each set's official lists.
PRESETS = {
    "nuswide_21": dict(num_classes=21, top_k=5000, train=10_500, query=2_100, database=None),
    "nuswide_81_m": dict(num_classes=81, top_k=5000, train=10_000, query=5_000, database=None),
    "coco": dict(num_classes=80, top_k=5000, train=10_000, query=5_000, database=None),
    "imagenet": dict(num_classes=100, top_k=1000, train=13_000, query=5_000, database=128_503),
}
LIST_FILES = {"query": "test.txt", "train": "train.txt", "database": "database.txt"}


def parse(path: str, num_classes: int) -> tuple[list[str], np.ndarray, list[int]]:
  """Files, uint8 multi-hot labels (N, num_classes) and the line number of each entry."""
  if not os.path.isfile(path):
    raise errors.NotFoundError(f"{path}: list file not found (config.data.list_dir)")
  files, labels, lines = [], [], []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) - 1 != num_classes:
        raise errors.DataError(f"{path}:{n}: {len(fields) - 1} label values, expected config.data.num_classes="
                         f"{num_classes}")
      try:
        values = [float(v) for v in fields[1:]]
      except ValueError as e:
        raise errors.DataError(f"{path}:{n}: non-numeric label value ({e})") from e
      if any(v not in (0.0, 1.0) for v in values):
        raise errors.DataError(f"{path}:{n}: label values must be 0 or 1 (a multi-hot vector), got {fields[1:]}")
      files.append(fields[0])
      labels.append(values)
      lines.append(n)
  if not files:
    raise errors.DataError(f"{path}: empty list file")
  return files, np.asarray(labels, np.uint8), lines


def build(data, workdir: str | None) -> dict:
  """{'query', 'train', 'database'} sources for `config.data`."""
  out = {}
  for split, filename in LIST_FILES.items():
    path = os.path.join(data.list_dir, filename)
    files, labels, lines = parse(path, data.num_classes)
    if data.on_bad_image == "error":  # a missing image fails now, not hours into the run
      for f, n in zip(files, lines):
        if not os.path.isfile(os.path.join(data.root, f)):
          raise errors.NotFoundError(f"{path}:{n}: image {os.path.join(data.root, f)} not found (config.data.root)")
    out[split] = sources.FileSource(f"listfile/{split}", data.root, files, labels, data.on_bad_image, workdir)
  return out
