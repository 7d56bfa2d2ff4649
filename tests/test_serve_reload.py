"""A server that swaps to a newly committed index: by its poll and by SIGHUP, atomically for requests in flight,
refusing an index of another model, and showing the version it serves in /api/info."""

import concurrent.futures
import copy
import dataclasses
import io
import json
import logging
import os
import shutil
import signal
import threading
import time

import httpx
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
import pytest

from hybridhash_jax import encoding
from hybridhash_jax import hamming_index
from hybridhash_jax import index_build
from hybridhash_jax import demo
from hybridhash_jax import webapp
from hybridhash_jax.data import images
from tests import data_fixtures
from tests import helpers
from tests.helpers import tiny_config


@pytest.fixture
def own(served, tmp_path):
  """A copy of the served images and index that a test may rebuild (the shared one stays as it is)."""
  root, out = str(tmp_path / "images"), str(tmp_path / "index")
  shutil.copytree(served.root, root)  # with the files' mtimes: a rebuild keeps their codes
  shutil.copytree(served.out, out)
  _commit_edited(out, lambda info: info.update(images=root))
  return dataclasses.replace(served, root=root, out=out, index=hamming_index.HammingIndex.open(out))


def _rebuild(own, added: int = 4, encoder=None) -> dict:
  """Adds images to a new last class folder until it holds `added`, and rebuilds the index; returns index.json."""
  for i in range(added):
    path = os.path.join(own.root, "zebra", f"{i:03d}.png")
    if not os.path.exists(path):
      data_fixtures.write_image(path, demo.smooth_image(500 + i, 20, 24))
  return index_build.build(encoder or own.encoder, own.root, own.out, progress=False)


def _commit_edited(out: str, edit) -> None:
  """Commits a copy of OUT's index.json changed by `edit(info)`, replacing it as a build does."""
  path = os.path.join(out, hamming_index.INDEX_JSON)
  with open(path, encoding="utf-8") as f:
    info = json.load(f)
  edit(info)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(info, f)
  os.replace(path + ".tmp", path)


def _until(predicate, timeout: float = 30.0):
  deadline = time.monotonic() + timeout
  while not (value := predicate()):
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.05)
  return value


class _Refusals(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.lines = []

  def emit(self, record):
    if record.getMessage().startswith("refused the index"):
      self.lines.append(record.getMessage())


@pytest.fixture
def refusals():
  handler = _Refusals()
  logging.getLogger("absl").addHandler(handler)
  yield handler.lines
  logging.getLogger("absl").removeHandler(handler)


def test_a_new_commit_is_served_after_a_check(own):
  app = webapp.create_app(own.index, own.encoder, max_batch=2)
  with TestClient(app) as client:
    before = client.get("/api/info").json()
    assert before["size"] == 18 and before["version"]["size"] == 18 and before["reload"]["reloads"] == 0
    assert before["version"]["built"] == own.index.info["built"] and before["version"]["loaded"]
    assert client.post("/api/search", json={"id": 20}).status_code == 404
    assert not app.state.live.check()  # nothing new committed
    new = _rebuild(own)
    assert client.get("/api/info").json()["size"] == 18  # until the next check
    assert app.state.live.check()
    after = client.get("/api/info").json()
    assert (after["size"], after["version"]["size"], after["reload"]["reloads"]) == (22, 22, 1)
    assert after["version"]["version"] != before["version"]["version"] and after["index"] == new
    result = client.post("/api/search", json={"id": 20, "k": 3}).json()
    assert result["query"]["name"].startswith("zebra") and result["version"] == after["version"]["version"]
    assert not app.state.live.check()  # the same commit is not loaded twice


def test_the_poll_and_wake_pick_up_a_commit(own):
  app = webapp.create_app(own.index, own.encoder, max_batch=2, reload_s=0.2)
  with TestClient(app) as client:
    assert client.get("/api/info").json()["reload"]["every_s"] == 0.2
    _rebuild(own)
    _until(lambda: client.get("/api/info").json()["size"] == 22)
  app = webapp.create_app(hamming_index.HammingIndex.open(own.out), own.encoder, max_batch=2)  # no poll
  with TestClient(app) as client:
    _rebuild(own, added=6)
    time.sleep(0.5)
    assert client.get("/api/info").json()["size"] == 22
    app.state.live.wake()
    _until(lambda: client.get("/api/info").json()["size"] == 24)


def test_requests_in_flight_finish_on_the_old_index(own):
  """An upload held in its encode while the index is swapped answers from the old index; new requests
  see the new one meanwhile."""
  gate, started = threading.Event(), threading.Event()
  gate.set()
  held = copy.copy(own.encoder)

  def encode(x):
    started.set()
    assert gate.wait(60)
    return own.encoder.encode(x)

  held.encode = encode
  app = webapp.create_app(own.index, held, max_batch=2)
  path = own.index.item_path(5)
  with TestClient(app) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
    old_version = client.get("/api/info").json()["version"]["version"]
    gate.clear()
    started.clear()
    with open(path, "rb") as f:
      data = f.read()
    pending = pool.submit(client.post, "/api/search", files={"image": ("q.png", data)}, data={"k": "30"})
    assert started.wait(60)
    _rebuild(own)
    assert app.state.live.check()
    assert client.post("/api/search", json={"id": 21, "k": 30}).json()["total"] == 22  # new requests: new index
    gate.set()
    result = pending.result(60).json()
  assert result["version"] == old_version and result["total"] == 18  # the old index's 18 items
  code = own.encoder.encode(own.encoder.preprocess(images.decode(path))[None])
  assert result["hits"] == [dataclasses.asdict(h) for h in own.index.search(code, k=30)[0]]


@pytest.mark.parametrize("edit, field", [
    (lambda info: info["model"].update(embed_dims=[8, 16, 32]), "model.embed_dims"),
    (lambda info: info["transform"].update(img_size=32), "transform.img_size"),
    (lambda info: info.update(step=9), "step"),
    (lambda info: info.update(checkpoint="/elsewhere/checkpoints"), "checkpoint"),
])
def test_an_index_of_another_model_is_refused(own, refusals, edit, field):
  app = webapp.create_app(own.index, own.encoder, max_batch=2)
  with TestClient(app) as client:
    version = client.get("/api/info").json()["version"]["version"]
    _rebuild(own)
    _commit_edited(own.out, edit)
    assert not app.state.live.check()
    info = client.get("/api/info").json()
    assert info["size"] == 18 and info["version"]["version"] == version  # the old index serves on
    assert client.post("/api/search", json={"id": 3, "k": 2}).status_code == 200
    assert field in info["reload"]["refused"]["reason"]
    assert len(refusals) == 1 and refusals[0].startswith(f"refused the index committed in {own.out}: ")
    assert field in refusals[0] and f"still serving version {version}" in refusals[0]
    assert not app.state.live.check() and len(refusals) == 1  # a refused commit is not retried, nor logged again
    _rebuild(own, added=5)  # the next good commit is served
    assert app.state.live.check() and client.get("/api/info").json()["size"] == 23


@pytest.mark.slow  # restores and compiles a second model
def test_a_rebuild_with_other_bits_is_refused(own, tmp_path, refusals):
  other = str(tmp_path / "work32")
  demo.write_random_checkpoint(other, tiny_config(**{"model.bits": 32}))
  app = webapp.create_app(own.index, own.encoder, max_batch=2)
  with TestClient(app) as client:
    _rebuild(own, encoder=encoding.Encoder.from_workdir(other))
    assert not app.state.live.check()
    info = client.get("/api/info").json()
    assert info["bits"] == 16 and info["size"] == 18
    assert "bits: index has 32, encoder has 16" in refusals[0]


@pytest.mark.parametrize("damage", ["truncated", "missing_file"])
def test_an_unreadable_commit_is_refused(own, refusals, damage):
  app = webapp.create_app(own.index, own.encoder, max_batch=2)
  with TestClient(app) as client:
    path = os.path.join(own.out, hamming_index.INDEX_JSON)
    if damage == "truncated":
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write('{"format": 1, "bits"')
      os.replace(path + ".tmp", path)
    else:
      _commit_edited(own.out, lambda info: info["files"].update(codes="codes-gone.npy"))
    assert not app.state.live.check()
    assert client.get("/api/info").json()["size"] == 18
    assert client.post("/api/search", json={"id": 1}).status_code == 200
    assert ("corrupt index file" if damage == "truncated" else "codes-gone.npy") in refusals[0]


def test_item_images_follow_the_swap(own):
  """Ids are renumbered by a rebuild: an id's thumbnail is revalidated (ETag), and a changed file's is redrawn."""
  app = webapp.create_app(own.index, own.encoder, max_batch=2)
  with TestClient(app) as client:
    first = client.get("/api/items/0/image")
    assert first.headers["cache-control"] == "no-cache"
    etag = first.headers["etag"]
    assert client.get("/api/items/0/image", headers={"if-none-match": etag}).status_code == 304
    path = own.index.item_path(0)
    data_fixtures.write_image(path, np.full((20, 24, 3), 200, np.uint8))  # item 0 changes, keeping its path
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)
    _rebuild(own, added=0)
    assert app.state.live.check()
    again = client.get("/api/items/0/image", headers={"if-none-match": etag})
    assert again.status_code == 200 and again.headers["etag"] != etag
    assert np.asarray(Image.open(io.BytesIO(again.content))).mean() > 190  # not the cached old thumbnail


@pytest.mark.slow
def test_cli_reloads_on_sighup(own):
  port = demo.free_port()
  proc = helpers.serve_cli(f"--index={own.out}", f"--port={port}", "--max_batch=1", "--reload_s=0")
  url = f"http://127.0.0.1:{port}"
  try:
    proc.stdout.readline()

    def info():
      try:
        return httpx.get(f"{url}/api/info").json()
      except httpx.TransportError:
        assert proc.poll() is None, proc.stderr.read()
        return None

    before = _until(info, 120)
    assert before["reload"]["every_s"] is None and before["size"] == 18
    _rebuild(own)
    time.sleep(0.5)
    assert info()["size"] == 18  # no poll
    proc.send_signal(signal.SIGHUP)
    after = _until(lambda: (i := info()) and i["size"] == 22 and i)
    assert after["version"]["version"] != before["version"]["version"] and proc.poll() is None
  finally:
    proc.terminate()
    proc.wait(30)
