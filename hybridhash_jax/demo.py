"""A searchable demo without a dataset or training: synthetic images, a random checkpoint, its encoder, an index.

The search server's load test and the web app's tests use it: what they measure or check is the serving, not
what the model learnt, so random weights (different images still get different codes) do.
"""

import dataclasses
import os
import socket

import jax
import numpy as np
from PIL import Image

from hybridhash_jax import checkpoints
from hybridhash_jax import encoding
from hybridhash_jax import hamming_index
from hybridhash_jax import index_build
from hybridhash_jax import models

CLASSES = {"cat": 6, "dog": 6, "owl": 6}


@dataclasses.dataclass
class Demo:
  root: str  # the indexed folder: root/<class>/<i>.png
  workdir: str  # holds checkpoints/ of the random model
  out: str  # the index directory
  encoder: encoding.Encoder
  index: hamming_index.HammingIndex


def write_random_checkpoint(workdir: str, config, step: int = 7) -> None:
  """A random model of `config.model`, saved as a params-only checkpoint of a folder dataset.

  Its params are drawn with NumPy, scaled by fan-in like an init (compiling flax's init takes longer than the
  rest of a small demo), so different images get different codes.
  """
  config = config.copy_and_resolve_references()
  config.data.name = "folder"
  rng = np.random.default_rng(0)

  def draw(path, a):
    name = path[-1].key
    if name in ("scale", "bias"):
      return np.full(a.shape, name == "scale", a.dtype)
    return (rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]) if a.ndim > 1 else 1)).astype(a.dtype)

  params = jax.tree_util.tree_map_with_path(draw, models.abstract_params(models.from_config(config.model)))
  checkpoints.save_params(os.path.join(workdir, "checkpoints"), params, config.to_dict(), step=step)


def smooth_image(seed: int, height: int, width: int) -> np.ndarray:
  """A random 3 x 3 colour grid, bilinearly enlarged: images that differ in their layout of colour."""
  grid = np.random.default_rng(seed).integers(0, 256, (3, 3, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(grid).resize((width, height), Image.BILINEAR))


def write_images(root: str, classes: dict[str, int], size: tuple[int, int]) -> None:
  """`root/<class>/<i>.png`: `classes` maps a name to its count; each image is a `smooth_image` of `size`."""
  seed = 0
  for name, n in classes.items():
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(n):
      Image.fromarray(smooth_image(seed, *size)).save(os.path.join(root, name, f"{i:03d}.png"))
      seed += 1


def make(tmp: str, config, classes: dict[str, int] = CLASSES, size=(20, 24)) -> Demo:
  """Writes the images and a random checkpoint of `config`'s model under `tmp`, and indexes them in tmp/index."""
  root, workdir, out = os.path.join(tmp, "images"), os.path.join(tmp, "work"), os.path.join(tmp, "index")
  write_images(root, classes, size)
  write_random_checkpoint(workdir, config)
  encoder = encoding.Encoder.from_workdir(workdir)
  index_build.build(encoder, root, out, progress=False)
  return Demo(root, workdir, out, encoder, hamming_index.HammingIndex.open(out))


def free_port() -> int:
  """A loopback port free now (the OS picks it), for a server started next."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
