"""grain random-access sources: one record per example, {'image', 'label', 'index'}.

'label' is the float32 multi-hot vector and 'index' the example's row in its split (the
memory-bank row for the training split). Each source has a short, stable `repr`: grain stores
it in the iterator checkpoint and refuses to restore into a pipeline whose source differs.
"""

import os

import numpy as np

from hybridhash_jax.data import images as images_lib


def _record(image, label: np.ndarray, index: int) -> dict:
  return {"image": image, "label": label.astype(np.float32), "index": np.int32(index)}


class ArraySource:
  """Images held in memory (CIFAR-10 archives, digits): uint8 (N, h, w, 3) and multi-hot (N, C)."""

  def __init__(self, name: str, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
    self.name, self.images, self.labels = name, images, labels

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict:
    return _record(self.images[i], self.labels[i], i)

  @property
  def num_classes(self) -> int:
    return self.labels.shape[1]

  def __repr__(self) -> str:
    return f"ArraySource({self.name}, n={len(self)})"


class FileSource:
  """Image files under `root`, decoded when read (so in grain's reader threads and worker processes).

  A file that cannot be decoded raises `BadImageError` naming it; with on_bad_image="skip" it is
  logged to `workdir/skipped_images.txt` instead and its record carries image=None, which the
  training pipeline filters out and evaluation masks. `valid` is False on the rows the check before
  training found bad (`data/check.py`): they give image=None without being read again.
  """

  def __init__(self, name: str, root: str, files: list[str], labels: np.ndarray,
               on_bad_image: str = "error", workdir: str | None = None):
    if len(files) != len(labels):
      raise ValueError(f"{name}: {len(files)} files but {len(labels)} labels")
    self.name, self.root, self.files, self.labels = name, root, list(files), labels
    self.on_bad_image, self.workdir = on_bad_image, workdir
    self.valid = np.ones(len(self.files), bool)

  def __len__(self) -> int:
    return len(self.files)

  def path(self, i: int) -> str:
    return os.path.join(self.root, self.files[i])

  def __getitem__(self, i: int) -> dict:
    path = self.path(i)
    if not self.valid[i]:
      return _record(None, self.labels[i], i)
    try:
      image = images_lib.decode(path)
    except images_lib.BadImageError as e:
      if self.on_bad_image != "skip":
        raise
      images_lib.log_skipped(self.workdir, path, str(e))
      image = None
    return _record(image, self.labels[i], i)

  @property
  def num_classes(self) -> int:
    return self.labels.shape[1]

  def __repr__(self) -> str:  # no root: a resumed run may read a moved copy of the images
    return f"FileSource({self.name}, n={len(self)})"
