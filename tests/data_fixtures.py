"""Generators of small datasets in the formats users bring: CIFAR-10 archives, list files, image folders.

Generated CIFAR-10 images carry their merged row (train batches, then the test batch) in the first
pixel (R = row % 256, G = row // 256) and their class in its blue channel; class = row % 10.
"""

import functools
import io
import os
import pickle
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image

CIFAR_N = 60_000


@functools.cache
def cifar_images() -> tuple[np.ndarray, np.ndarray]:
  """uint8 (60000, 32, 32, 3) images and their classes, in merged-row order (read-only, shared)."""
  rows = np.arange(CIFAR_N)
  classes = rows % 10
  images = np.zeros((CIFAR_N, 32, 32, 3), np.uint8)
  images[:, 0, 0, 0], images[:, 0, 0, 1], images[:, 0, 0, 2] = rows % 256, rows // 256, classes
  images[:, 1:, :, 1] = (classes * 25)[:, None, None]
  images.flags.writeable = classes.flags.writeable = False
  return images, classes


def _batches(images, classes):
  flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # official layout: all R, then G, then B
  names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
  return [(n, flat[k * 10_000:(k + 1) * 10_000], classes[k * 10_000:(k + 1) * 10_000]) for k, n in enumerate(names)]


def write_cifar(root: str, kind: str = "py", as_tar: bool = False) -> str:
  """The official python ("py") or binary ("bin") layout under `root`; returns the folder or the .tar.gz."""
  folder = "cifar-10-batches-py" if kind == "py" else "cifar-10-batches-bin"
  files = {}
  for name, data, labels in _batches(*cifar_images()):
    if kind == "py":
      files[name] = pickle.dumps({b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data},
                                 protocol=2)
    else:
      files[name + ".bin"] = np.concatenate([labels.astype(np.uint8)[:, None], data], axis=1).tobytes()
  if as_tar:
    path = os.path.join(root, f"cifar-10-{'python' if kind == 'py' else 'binary'}.tar.gz")
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
      for name, blob in files.items():
        info = tarfile.TarInfo(f"{folder}/{name}")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    return path
  os.makedirs(os.path.join(root, folder), exist_ok=True)
  for name, blob in files.items():
    with open(os.path.join(root, folder, name), "wb") as f:
      f.write(blob)
  return root


def pattern_image(seed: int, height: int, width: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_image(path: str, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def write_listfile(root: str, splits: dict[str, int], num_classes: int, size=(30, 40)) -> dict:
  """PNG images and train.txt/test.txt/database.txt under `root`; returns {split: [(rel path, labels)]}."""
  lists = {"train": "train.txt", "query": "test.txt", "database": "database.txt"}
  out, seed = {}, 0
  for split, n in splits.items():
    rows = []
    for i in range(n):
      rel = f"img/{split}_{i}.png"
      write_image(os.path.join(root, rel), pattern_image(seed, *size))
      labels = np.zeros(num_classes, np.uint8)
      labels[[seed % num_classes, (seed * 7 + 3) % num_classes]] = 1
      rows.append((rel, labels))
      seed += 1
    with open(os.path.join(root, lists[split]), "w", encoding="utf-8") as f:
      f.writelines(f"{rel} {' '.join(map(str, lab))}\n" for rel, lab in rows)
    out[split] = rows
  return out


def write_folder(root: str, per_class: dict[str, int], size=(20, 24)) -> None:
  """`root/<class>/<i>.png` with the given number of images per class (plus a non-image file to ignore)."""
  seed = 0
  for name, n in per_class.items():
    for i in range(n):
      write_image(os.path.join(root, name, f"{i:03d}.png"), pattern_image(seed, *size))
      seed += 1
    with open(os.path.join(root, name, "notes.txt"), "w", encoding="utf-8") as f:
      f.write("not an image\n")


def _chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb_png(path: str, side: int = 20_000) -> None:
  """A tiny PNG whose header claims side x side pixels, past PIL's decompression-bomb limit."""
  ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def write_digits_folder(root: str) -> None:
  """scikit-learn's 8x8 digits as `root/<digit>/<i>.png` RGB files: a real class-folder tree."""
  from hybridhash_jax.data import digits
  images, ids = digits.load()
  for i, (image, c) in enumerate(zip(images, ids)):
    write_image(os.path.join(root, f"digit_{c}", f"{i:04d}.png"), image)
