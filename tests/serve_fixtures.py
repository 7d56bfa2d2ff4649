"""A tiny searchable setup for the web app's tests: PNGs, a random-init checkpoint, its encoder and an index."""

import contextlib
import dataclasses
import os
import socket
import threading
import time

import jax
import numpy as np
import uvicorn

from hybridhash_jax import checkpoints
from hybridhash_jax import encoding
from hybridhash_jax import models
from hybridhash_jax.data import images
from tests import data_fixtures
from tests.test_train import tiny_config

CLASSES = {"cat": 6, "dog": 6, "owl": 6}


@dataclasses.dataclass
class Served:
  root: str  # the indexed folder: root/<class>/<i>.png
  workdir: str  # holds checkpoints/ of a random-init tiny model
  encoder: encoding.Encoder
  index: object


def write_checkpoint(workdir: str) -> None:
  """A random-init tiny model (16 px, 16 bits) saved as a step-7 params checkpoint of a folder dataset."""
  config = tiny_config()
  config.data.name = "folder"
  model = models.from_config(config.model)
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
  checkpoints.save_params(os.path.join(workdir, "checkpoints"), params, config.to_dict(), step=7)


@dataclasses.dataclass
class Hit:
  rank: int
  id: int
  path: str
  distance: int
  label: str | None


class FakeIndex:
  """The contract's HammingIndex over a folder, in NumPy (until the index library lands)."""

  def __init__(self, root: str, encoder):
    self.root = root
    self.paths = sorted(os.path.relpath(os.path.join(d, f), root)
                        for d, _, fs in os.walk(root) for f in fs if f.endswith(".png"))
    batch = np.stack([encoder.preprocess(images.decode(os.path.join(root, p))) for p in self.paths])
    self.bits = encoder.bits
    self.codes = np.packbits(encoder.encode(batch) >= 0, axis=1, bitorder="little")
    self.info = {"kind": "flat", "bits": self.bits, "count": len(self.paths)}

  def __len__(self):
    return len(self.paths)

  def item(self, id):  # pylint: disable=redefined-builtin
    if not 0 <= id < len(self):
      raise KeyError(id)
    return {"id": id, "path": self.paths[id], "size": 0, "mtime": 0, "label": self.paths[id].split("/")[0]}

  def item_path(self, id):  # pylint: disable=redefined-builtin
    return os.path.join(self.root, self.item(id)["path"])

  def codes_of(self, ids):
    return self.codes[np.asarray(ids)]

  def search(self, codes, k=None, radius=None):
    if codes.dtype != np.uint8:
      codes = np.packbits(codes >= 0, axis=1, bitorder="little")
    out = []
    for q in codes:
      d = np.unpackbits(q[None] ^ self.codes, axis=1).sum(1)
      order = np.argsort(d, kind="stable")
      order = order[:k] if k is not None else order[d[order] <= radius]
      out.append([Hit(r, int(i), self.paths[i], int(d[i]), self.paths[i].split("/")[0]) for r, i in enumerate(order)])
    return out


def make(tmp: str) -> Served:
  root, workdir = os.path.join(tmp, "images"), os.path.join(tmp, "work")
  data_fixtures.write_folder(root, CLASSES, size=(20, 24))
  write_checkpoint(workdir)
  encoder = encoding.Encoder.from_workdir(workdir)
  return Served(root, workdir, encoder, FakeIndex(root, encoder))


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
