"""A tiny searchable setup for the web app's tests: PNGs, a random checkpoint, its encoder, an index; a live server."""

import contextlib
import dataclasses
import os
import socket
import threading
import time

import jax
import numpy as np
from PIL import Image
import uvicorn

from hybridhash_jax import checkpoints
from hybridhash_jax import encoding
from hybridhash_jax import hamming_index
from hybridhash_jax import index_build
from hybridhash_jax import models
from tests import data_fixtures
from tests.test_train import tiny_config

CLASSES = {"cat": 6, "dog": 6, "owl": 6}


@dataclasses.dataclass
class Served:
  root: str  # the indexed folder: root/<class>/<i>.png
  workdir: str  # holds checkpoints/ of a random tiny model
  out: str  # the index directory
  encoder: encoding.Encoder
  index: hamming_index.HammingIndex


def write_checkpoint(workdir: str, config=None) -> None:
  """A random model (by default the tiny one: 16 px, 16 bits) saved as a step-7 checkpoint of a folder dataset.

  Its params are drawn with NumPy, scaled by fan-in like an init (compiling flax's init takes longer
  than all the tests that use it), so different images get different codes.
  """
  config = tiny_config() if config is None else config
  config.data.name = "folder"
  rng = np.random.default_rng(0)

  def draw(path, a):
    name = path[-1].key
    if name in ("scale", "bias"):
      return np.full(a.shape, name == "scale", a.dtype)
    return (rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]) if a.ndim > 1 else 1)).astype(a.dtype)

  params = jax.tree_util.tree_map_with_path(draw, models.abstract_params(models.from_config(config.model)))
  checkpoints.save_params(os.path.join(workdir, "checkpoints"), params, config.to_dict(), step=7)


def smooth_image(seed: int, height: int, width: int) -> np.ndarray:
  """A random 3 x 3 colour grid, bilinearly enlarged: images that differ in their layout of colour."""
  grid = np.random.default_rng(seed).integers(0, 256, (3, 3, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(grid).resize((width, height), Image.BILINEAR))


def make(tmp: str, classes: dict[str, int] = CLASSES, size=(20, 24), config=None) -> Served:
  """Writes the images (`classes`: name -> count) and the checkpoint under `tmp`, and indexes them in tmp/index."""
  root, workdir, out = os.path.join(tmp, "images"), os.path.join(tmp, "work"), os.path.join(tmp, "index")
  seed = 0
  for name, n in classes.items():
    for i in range(n):
      data_fixtures.write_image(os.path.join(root, name, f"{i:03d}.png"), smooth_image(seed, *size))
      seed += 1
  write_checkpoint(workdir, config)
  encoder = encoding.Encoder.from_workdir(workdir)
  index_build.build(encoder, root, out, progress=False)
  return Served(root, workdir, out, encoder, hamming_index.HammingIndex.open(out))


@contextlib.contextmanager
def serving(app, timeout: float = 60.0):
  """Runs `app` on uvicorn in a thread, on a free loopback port; yields its base URL."""
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + timeout
  while not server.started:
    if not thread.is_alive() or time.monotonic() > deadline:
      raise RuntimeError("the test server did not start")
    time.sleep(0.02)
  try:
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
  finally:
    server.should_exit = True
    thread.join(timeout)
    sock.close()
