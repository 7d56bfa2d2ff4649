"""CIFAR-10 under the deep-hashing protocols: train and test merged (60,000), split per class.

Two sources (`config.data.source`):
- "tfds": a prepared TFDS dataset, read with `tfds.data_source` (no TensorFlow needed to read).
  It must be prepared in the random-access ArrayRecord format, once, where TensorFlow is installed:
      tfds build cifar10 --file_format=array_record [--data_dir=DIR]
  or  python -c "import tensorflow_datasets as tfds; \
          tfds.builder('cifar10', file_format='array_record').download_and_prepare()"
  then point `config.data.tfds_data_dir` at DIR (empty: TFDS's default, ~/tensorflow_datasets).
- "archive": the official archive from https://www.cs.toronto.edu/~kriz/cifar.html at
  `config.data.root`: the .tar.gz itself, the extracted `cifar-10-batches-py` / `cifar-10-batches-bin`
  folder, or the folder that holds either. The binary version is read with NumPy alone. The python
  version is a set of pickles, the official format; pickle can run code, so they are read with an
  unpickler that only lets NumPy arrays through. Still, only use archives from a source you trust.

Rows are train (0..49,999) then test (50,000..59,999), in each source's own order, so the two
sources give different splits for the same seed. Images stay 32x32 here; the pipeline resizes.
"""

import io
import os
import pickle
import tarfile

import numpy as np

from hybridhash_jax import errors
from hybridhash_jax.data import sources
from hybridhash_jax.data import splits

NUM_CLASSES = 10
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
TFDS_BUILD = "tfds build cifar10 --file_format=array_record --data_dir=DIR"
NUM_TRAIN, NUM_TEST = 50_000, 10_000
# protocol: (query per class, train per class, which rows form the database), as the deep-hashing protocols define them.
PROTOCOLS = {
    "cifar10": (100, 500, "rest"),
    "cifar10-1": (100, 500, "train+rest"),
    "cifar10-2": (1000, 5000, "train"),
}
_PY_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
_BIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
_RECORD = 1 + 32 * 32 * 3


class _ArrayUnpickler(pickle.Unpickler):
  """Refuses every global but the ones a pickled NumPy array needs (`_codecs.encode`: protocol-2 bytes)."""
  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 pickle")
    return super().find_class(module, name)


def _chw_to_hwc(flat: np.ndarray) -> np.ndarray:
  return flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _parse_py(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    d = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    flat, labels = np.asarray(d[b"data"], np.uint8), np.asarray(d[b"labels"], np.int64)
  except Exception as e:  # noqa: BLE001  # any failure means "not a CIFAR-10 batch"
    raise errors.DataError(f"{where}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
  if flat.ndim != 2 or flat.shape[1] != _RECORD - 1 or len(labels) != len(flat):
    raise errors.DataError(f"{where}: expected data (N, 3072) and N labels, got {flat.shape} and {len(labels)}")
  return _chw_to_hwc(flat), labels


def _parse_bin(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
  if len(data) % _RECORD:
    raise errors.DataError(f"{where}: {len(data)} bytes is not a whole number of {_RECORD}-byte records")
  rec = np.frombuffer(data, np.uint8).reshape(-1, _RECORD)
  return _chw_to_hwc(rec[:, 1:]), rec[:, 0].astype(np.int64)


def _read_members(root: str) -> tuple[list[bytes], list[str], bool]:
  """The six batch files' bytes, their names, and whether they are the python version."""
  if os.path.isfile(root) and tarfile.is_tarfile(root):
    with tarfile.open(root) as tar:
      names = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
      for files, is_py in ((_PY_FILES, True), (_BIN_FILES, False)):
        if all(f in names for f in files):
          return [tar.extractfile(names[f]).read() for f in files], [f"{root}:{f}" for f in files], is_py
    raise errors.NotFoundError(f"{root}: no CIFAR-10 batches ({', '.join(_PY_FILES)} or the .bin files) in the archive")
  for folder in (root, os.path.join(root, "cifar-10-batches-py"), os.path.join(root, "cifar-10-batches-bin")):
    for files, is_py in ((_PY_FILES, True), (_BIN_FILES, False)):
      paths = [os.path.join(folder, f) for f in files]
      if all(os.path.isfile(p) for p in paths):
        out = []
        for p in paths:
          with open(p, "rb") as f:
            out.append(f.read())
        return out, paths, is_py
  raise errors.NotFoundError(
      f"config.data.root={root!r}: no CIFAR-10 archive (cifar-10-python.tar.gz, cifar-10-binary.tar.gz, or a folder "
      f"with cifar-10-batches-py/ or cifar-10-batches-bin/). Download it from {ARCHIVE_URL} and point "
      "--config.data.root at it.")


def load_archive(root: str) -> tuple[np.ndarray, np.ndarray]:
  """All 60,000 images, uint8 (N, 32, 32, 3), and class ids, train batches then the test batch."""
  blobs, names, is_py = _read_members(root)
  parse = _parse_py if is_py else _parse_bin
  images, labels = zip(*(parse(b, n) for b, n in zip(blobs, names)))
  images, labels = np.concatenate(images), np.concatenate(labels)
  if len(images) != NUM_TRAIN + NUM_TEST or labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise errors.DataError(f"{root}: expected {NUM_TRAIN + NUM_TEST} images with labels 0..9, got {len(images)} "
                     f"with labels {labels.min()}..{labels.max()}")
  return images, labels


def open_tfds(data_dir: str) -> list:
  """The prepared TFDS train and test splits as random-access sources."""
  try:
    import tensorflow_datasets as tfds  # only this source needs it: the `tfds` extra
  except ImportError as e:
    raise errors.ConfigError("config.data.source='tfds' needs tensorflow-datasets: pip install 'hybridhash-jax[tfds]' "
                             "(or --config.data.source=archive)") from e
  try:
    return [tfds.data_source("cifar10", split=s, data_dir=data_dir or None, download=False) for s in ("train", "test")]
  except Exception as e:  # noqa: BLE001  # TFDS raises several types for "not prepared"
    raise errors.NotFoundError(
        f"config.data.tfds_data_dir={data_dir!r}: TFDS cifar10 is not prepared there in ArrayRecord format. "
        f"Prepare it once, where TensorFlow is installed: `{TFDS_BUILD}`, or use the official archive "
        f"({ARCHIVE_URL}) with --config.data.source=archive --config.data.root=PATH. ({type(e).__name__})") from e


def tfds_classes(parts: list) -> np.ndarray:
  """Class ids of the merged rows (TFDS decodes every image on the way; done once per workdir)."""
  return np.asarray([int(p[i]["label"]) for p in parts for i in range(len(p))], np.int64)


class TfdsSource:
  """Rows of the merged TFDS train+test splits; TFDS decodes each image when it is read."""

  def __init__(self, name: str, parts: list, rows: np.ndarray):
    self.name, self.parts, self.rows = name, parts, np.asarray(rows)

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int) -> dict:
    row, n = int(self.rows[i]), len(self.parts[0])
    ex = self.parts[0][row] if row < n else self.parts[1][row - n]
    label = np.zeros(NUM_CLASSES, np.float32)
    label[int(ex["label"])] = 1.0
    return {"image": np.asarray(ex["image"], np.uint8), "label": label, "index": np.int32(i)}

  @property
  def num_classes(self) -> int:
    return NUM_CLASSES

  def __repr__(self) -> str:
    return f"TfdsSource({self.name}, n={len(self)})"


def build(data, workdir: str | None) -> dict:
  """{'query', 'train', 'database'} sources for `config.data` (split saved to / reused from `workdir`)."""
  query, train, database = PROTOCOLS[data.protocol]
  meta = {"data.name": "cifar10", "data.source": data.source, "data.protocol": data.protocol,
          "data.split_seed": data.split_seed, "num_examples": NUM_TRAIN + NUM_TEST}
  if data.source == "archive":
    images, classes = load_archive(data.root)
  else:
    parts = open_tfds(data.tfds_data_dir)
    if sum(len(p) for p in parts) != NUM_TRAIN + NUM_TEST:
      raise errors.DataError(f"config.data.tfds_data_dir={data.tfds_data_dir!r}: cifar10 has "
                       f"{[len(p) for p in parts]} train/test examples, expected {[NUM_TRAIN, NUM_TEST]}")
    classes = None

  def make():
    c = classes if classes is not None else tfds_classes(parts)
    return splits.per_class(c, query, train, data.split_seed, database, where=f"cifar10 ({data.source})")
  rows = splits.load_or_make(workdir, meta, make)
  name = f"cifar10/{data.protocol}"
  if data.source == "archive":
    onehot = np.eye(NUM_CLASSES, dtype=np.uint8)[classes]
    return {k: sources.ArraySource(f"{name}/{k}", images[r], onehot[r]) for k, r in rows.items()}
  return {k: TfdsSource(f"{name}/{k}", parts, r) for k, r in rows.items()}
