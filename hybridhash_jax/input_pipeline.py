"""Datasets -> grain pipelines of uint8 batches: shuffled and resumable for training, complete for evaluation.

Batches hold 'image' uint8 (b, S, S, 3) at S = config.model.img_size, 'label' float32 (b, C)
multi-hot and 'index' int32 (b,), the row in the split (the memory-bank row for training).
Images travel as uint8 (4x less host-to-device traffic); `normalize` runs on the device.

Transforms follow the reference: CIFAR-10 and digits are resized bilinearly to S; list files and
image folders are resized to round(S * 256/224) on the shorter side, then randomly cropped to S
and flipped for training, centre-cropped for evaluation. Decoding and transforms run in grain's
reader threads and worker processes.
"""

import dataclasses
import math

from etils import epath
import grain
import jax
import jax.numpy as jnp
import numpy as np

from hybridhash_jax import errors
from hybridhash_jax.data import check
from hybridhash_jax.data import cifar10
from hybridhash_jax.data import digits
from hybridhash_jax.data import folder
from hybridhash_jax.data import images
from hybridhash_jax.data import listfile

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as the reference normalises
STD = (0.229, 0.224, 0.225)
_BUILDERS = {"cifar10": cifar10.build, "listfile": listfile.build, "folder": folder.build, "digits": digits.build}
_CROPPED = ("listfile", "folder")  # resize + crop (+ flip for training); the others are only resized
_READ_THREADS = 4  # reader threads per process: file sources decode there (PIL releases the GIL)
_EVAL_READ_BATCHES = 4  # evaluation reads whole batches, this many at once per process


@dataclasses.dataclass(frozen=True)
class Splits:
  """The three random-access sources of a dataset and what evaluation needs to know about them."""
  train: grain.sources.RandomAccessDataSource
  query: grain.sources.RandomAccessDataSource
  database: grain.sources.RandomAccessDataSource
  num_classes: int
  top_k: int  # mAP@top_k, resolved: config -1 means len(database)
  name: str


def _check(ok: bool, field: str, value, why: str) -> None:
  if not ok:
    raise errors.ConfigError(f"config.data.{field}={value!r}: {why}")


def validate(data) -> None:
  """Fails early on `config.data` values no dataset can use, naming the field."""
  _check(data.name in _BUILDERS, "name", data.name, f"not one of {tuple(_BUILDERS)}")
  _check(data.on_bad_image in ("error", "skip"), "on_bad_image", data.on_bad_image, "not one of ('error', 'skip')")
  _check(data.top_k == -1 or data.top_k > 0, "top_k", data.top_k, "must be > 0, or -1 for the whole database")
  _check(data.num_workers >= 0, "num_workers", data.num_workers, "must be >= 0")
  _check(data.prefetch_buffer_size >= 0, "prefetch_buffer_size", data.prefetch_buffer_size, "must be >= 0")
  if data.name == "cifar10":
    _check(data.protocol in cifar10.PROTOCOLS, "protocol", data.protocol, f"not one of {tuple(cifar10.PROTOCOLS)}")
    _check(data.source in ("tfds", "archive"), "source", data.source, "not one of ('tfds', 'archive')")
    _check(data.source != "archive" or data.root, "root", data.root, "the CIFAR-10 archive is needed")
    _check(data.num_classes == cifar10.NUM_CLASSES, "num_classes", data.num_classes, "CIFAR-10 has 10 classes")
  if data.name == "listfile":
    _check(bool(data.list_dir), "list_dir", data.list_dir, "the folder of train.txt, test.txt, database.txt")
    _check(data.num_classes > 0, "num_classes", data.num_classes, "the width of the label vectors is needed")
  if data.name == "folder":
    _check(bool(data.root), "root", data.root, "the folder of class sub-folders is needed")
  if data.name in ("folder", "digits"):
    _check(data.query_per_class > 0, "query_per_class", data.query_per_class, "must be > 0")
    whole = data.name == "folder"  # folders draw training images from the database: -1 takes all of it
    _check(data.train_per_class > 0 or (whole and data.train_per_class == -1), "train_per_class",
           data.train_per_class, "must be > 0" + (", or -1 for the whole database" if whole else ""))


def build_splits(config, workdir: str | None = None) -> Splits:
  """Checks `config.data`, reads the lists/folders/archives, and splits (saving the split in `workdir`).

  With `data.check_images`, every image file is decoded once here (`data/check.py`).
  """
  data = config.data
  validate(data)
  if workdir:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  sources = _BUILDERS[data.name](data, workdir)
  if data.check_images:  # every file decodes, before any work that a bad one could waste
    check.check_images(sources, data.on_bad_image, workdir, progress=jax.process_index() == 0)
  db = sources["database"]
  return Splits(train=sources["train"], query=sources["query"], database=db,
                num_classes=sources["train"].num_classes,
                top_k=len(db) if data.top_k == -1 else min(data.top_k, len(db)),
                name=data.name if data.name != "cifar10" else data.protocol)


def normalize(images_uint8):
  """uint8 NHWC -> float32, (x/255 - mean) / std per channel (torchvision's ToTensor + Normalize)."""
  x = jnp.asarray(images_uint8, jnp.float32) / 255.0
  return (x - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)


def steps_per_epoch(config, splits: Splits) -> int:
  steps = len(splits.train) // config.batch_size
  if steps < 1:
    raise errors.ConfigError(
        f"config.batch_size={config.batch_size} is larger than the {len(splits.train)} training images")
  return steps


def crops(data_name: str) -> bool:
  """Whether a dataset kind's images are resized and cropped (list files, folders) or only resized."""
  return data_name in _CROPPED


def eval_image(image: np.ndarray, size: int, crop: bool) -> np.ndarray:
  """The evaluation transform of one decoded RGB uint8 image: (H, W, 3) -> (size, size, 3)."""
  if crop:
    return images.center_crop(images.resize_shorter(image, images.resize_size(size)), size)
  return images.resize(image, size, size)


class _DropSkipped(grain.transforms.Filter):
  """Training drops the records of skipped images (on_bad_image="skip"), so batches stay full."""

  def filter(self, element) -> bool:
    return element["image"] is not None


class _TrainTransform(grain.transforms.RandomMap):

  def __init__(self, size: int, crop: bool):
    self.size, self.crop = size, crop

  def random_map(self, element, rng: np.random.Generator):
    image = element["image"]
    if self.crop:
      image = images.random_crop_flip(images.resize_shorter(image, images.resize_size(self.size)), self.size, rng)
    else:
      image = images.resize(image, self.size, self.size)
    return {**element, "image": np.ascontiguousarray(image)}


class _EvalTransform(grain.transforms.Map):
  """The eval transform; a skipped image or a padding row becomes a blank row with mask False."""

  def __init__(self, size: int, crop: bool):
    self.size, self.crop = size, crop

  def map(self, element):
    if element["image"] is None:
      return {**element, "image": np.zeros((self.size, self.size, 3), np.uint8), "mask": np.False_}
    return {**element, "image": eval_image(element["image"], self.size, self.crop), "mask": element["mask"]}


def train_loader(config, splits: Splits, *, seed: int, process_index: int = 0, process_count: int = 1,
                 local_batch_size: int, worker_count: int | None = None) -> grain.DataLoader:
  """An endless loader of shuffled training batches; `iter()` of it checkpoints with get_state/set_state.

  Every process walks one global order (a fresh permutation of the split each epoch, from `seed`):
  global position k goes to process k % process_count, and each process batches its positions.
  So the processes' batches are disjoint, and with 0 or 1 worker they are together the batch a single
  process would read with the global batch size. Augmentation draws from grain's per-position rng,
  so it does not depend on the number of processes either. With W > 1 workers, worker w batches the
  positions w, w+W, ... of its process; the order then depends on W, which a checkpoint records and
  checks. An "epoch" is `steps_per_epoch` batches; a batch may straddle two epochs' permutations.
  """
  src = splits.train
  if local_batch_size * process_count > len(src):
    raise errors.ConfigError(f"the global batch {local_batch_size}x{process_count} is larger than the {len(src)} "
                     "training images (config.batch_size)")
  crop = config.data.name in _CROPPED
  return grain.DataLoader(
      data_source=src,
      sampler=grain.samplers.IndexSampler(len(src), shuffle=True, seed=seed, num_epochs=None),
      operations=[_DropSkipped(), _TrainTransform(config.model.img_size, crop),
                  grain.transforms.Batch(local_batch_size, drop_remainder=True)],
      worker_count=config.data.num_workers if worker_count is None else worker_count,
      worker_buffer_size=max(config.data.prefetch_buffer_size, 1),
      shard_options=grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True),
      read_options=grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=2 * local_batch_size))


class _ProcessRows:
  """This process's rows of the padded evaluation order, one local batch after another.

  Global batch g covers source rows [g*B, (g+1)*B), B = b * process_count, and process p takes
  [g*B + p*b, g*B + (p+1)*b). Rows past the end are padding (image None, so mask False).
  """

  def __init__(self, source, local_batch_size: int, process_index: int, process_count: int):
    self.source, self.b, self.p, self.n = source, local_batch_size, process_index, process_count
    self.num_batches = math.ceil(len(source) / (local_batch_size * process_count))

  def __len__(self) -> int:
    return self.num_batches * self.b

  def __getitem__(self, j: int) -> dict:
    row = (j // self.b) * self.b * self.n + self.p * self.b + j % self.b
    if row < len(self.source):
      return {**self.source[row], "mask": np.True_}
    return {"image": None, "label": np.zeros(self.source.num_classes, np.float32), "index": np.int32(row),
            "mask": np.False_}

  def __repr__(self) -> str:
    return f"_ProcessRows({self.source!r}, b={self.b}, process={self.p}/{self.n})"


def eval_batches(config, source, *, local_batch_size: int, process_index: int = 0, process_count: int = 1):
  """Every example of `source` once, in batches of `local_batch_size` with a 'mask', eval transform.

  Every process yields the same number of batches (layout in `_ProcessRows`). 'index' is the source
  row; padding rows carry rows >= len(source) and mask False, and so do images skipped under
  on_bad_image="skip". So `codes[index[mask]] = out[mask]` puts every code in source order.
  """
  crop = config.data.name in _CROPPED
  rows = _ProcessRows(source, local_batch_size, process_index, process_count)
  ds = grain.MapDataset.source(rows).map(_EvalTransform(config.model.img_size, crop)).batch(local_batch_size)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=_EVAL_READ_BATCHES, prefetch_buffer_size=_EVAL_READ_BATCHES))
  if config.data.num_workers > 0:  # whole batches go to the workers, so the order stays the source's
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return ds


def eval_images(config, source, rows) -> np.ndarray:
  """The evaluation view (uint8 (n, S, S, 3)) of some rows of `source`, e.g. for a retrieval grid."""
  transform = _EvalTransform(config.model.img_size, config.data.name in _CROPPED)
  return np.stack([transform.map({**source[int(r)], "mask": np.True_})["image"] for r in np.asarray(rows)])
