"""Bounded work in the server: at most `max_inflight` uploads in work (then 503 with Retry-After), and uploads
whose client goes away mid-body leave nothing behind (no slot, no file, no memory, no traceback)."""

import concurrent.futures
import copy
import gc
import io
import logging
import os
import socket
import threading
import time

import httpx
from fastapi.testclient import TestClient
from PIL import Image
import pytest

from hybridhash_jax import demo
from hybridhash_jax import webapp
from tests import helpers


def _png(seed: int = 0) -> bytes:
  out = io.BytesIO()
  Image.fromarray(demo.smooth_image(seed, 20, 24)).save(out, "PNG")
  return out.getvalue()


def _held_encoder(encoder):
  """A copy of `encoder` whose encode waits for `gate` once it is cleared (it is set during the app's start)."""
  held, gate, started = copy.copy(encoder), threading.Event(), threading.Event()
  gate.set()

  def encode(x):
    started.set()
    assert gate.wait(60)
    return encoder.encode(x)

  held.encode = encode
  return held, gate, started


def test_uploads_over_max_inflight_get_503(served):
  encoder, gate, started = _held_encoder(served.encoder)
  app = webapp.create_app(served.index, encoder, max_batch=2, max_inflight=2)
  upload = {"files": {"image": ("q.png", _png())}, "data": {"k": "3"}}
  with TestClient(app) as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
    gate.clear()
    pending = [pool.submit(client.post, "/api/search", **upload) for _ in range(2)]
    _wait(lambda: client.get("/api/info").json()["uploads"]["inflight"] == 2)
    busy = client.post("/api/search", **upload)
    assert busy.status_code == 503 and busy.headers["retry-after"] == str(webapp.RETRY_AFTER_S)
    assert "2 uploads are in work" in busy.json()["detail"]
    assert client.post("/api/search", json={"id": 3, "k": 2}).status_code == 200  # searches by id are not bounded
    gate.set()
    assert [p.result(60).status_code for p in pending] == [200, 200]
    assert client.get("/api/info").json()["uploads"] == {"max_inflight": 2, "inflight": 0}
    assert client.post("/api/search", **upload).status_code == 200


def test_failed_uploads_free_their_slot(served):
  app = webapp.create_app(served.index, served.encoder, max_upload_bytes=2**20, max_batch=2, max_inflight=1)
  with TestClient(app) as client:
    assert client.post("/api/search", files={"image": ("a.txt", b"not an image")}).status_code == 400
    assert client.post("/api/search", files={"image": ("a.png", _png())}, data={"k": "0"}).status_code == 422
    assert client.post("/api/search", files={"other": ("a.png", _png())}).status_code == 422
    chunks = (b"\0" * 65536 for _ in range(20))  # no Content-Length: over the limit while reading
    assert client.post("/api/search", content=chunks,
                       headers={"content-type": "multipart/form-data; boundary=x"}).status_code == 413
    assert client.get("/api/info").json()["uploads"]["inflight"] == 0
    assert client.post("/api/search", files={"image": ("a.png", _png())}).status_code == 200


def _wait(predicate, timeout: float = 30.0) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.02)


class _Errors(logging.Handler):
  def __init__(self):
    super().__init__(logging.ERROR)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def _abort_upload(port: int, sent: int) -> None:
  """Declares a larger multipart upload than it sends, sends `sent` bytes of its file, and hangs up."""
  head = (b'--xx\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
          b"Content-Type: image/png\r\n\r\n")
  with socket.create_connection(("127.0.0.1", port)) as conn:
    conn.sendall(b"POST /api/search HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
                 b"Content-Length: %d\r\n\r\n" % (len(head) + sent + 2**16) + head + b"\0" * sent)


def _rss_mb() -> float:
  with open("/proc/self/status", encoding="ascii") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


# Bytes sent before hanging up: under and over the form parser's 1 MB in-memory spool (then a temporary file).
SENT = (600_000, 1_500_000)


def _aborted_uploads_leave_nothing(served, n: int, rss_growth_mb: float | None) -> None:
  app = webapp.create_app(served.index, served.encoder, max_batch=2, max_inflight=1)
  with helpers.serving(app) as url:
    errors = _Errors()  # uvicorn's log of an exception in the app, after its start configured that logger
    logging.getLogger("uvicorn.error").addHandler(errors)
    port = int(url.rsplit(":", 1)[1])
    try:
      for i in range(10):  # warm-up: the spool's first files, the loop's buffers
        _abort_upload(port, SENT[i % 2])
      _wait(lambda: httpx.get(f"{url}/api/info").json()["uploads"]["inflight"] == 0)
      gc.collect()
      fds, rss = len(os.listdir("/proc/self/fd")), _rss_mb()
      for i in range(n):
        _abort_upload(port, SENT[i % 2])
      _wait(lambda: httpx.get(f"{url}/api/info").json()["uploads"]["inflight"] == 0)
      _wait(lambda: len(os.listdir("/proc/self/fd")) <= fds)  # no spooled temporary file, no connection left open
      gc.collect()
      growth = _rss_mb() - rss
      print(f"RSS {rss:.1f} MB, then {growth:+.1f} MB over {n} aborted uploads")
      if rss_growth_mb is not None:
        assert growth < rss_growth_mb, f"RSS grew by {growth:.1f} MB over {n} aborted uploads"
      assert errors.messages == []
      hits = httpx.post(f"{url}/api/search", files={"image": ("a.png", _png())}, timeout=60)
      assert hits.status_code == 200, hits.text  # the one slot is free
    finally:
      logging.getLogger("uvicorn.error").removeHandler(errors)


@pytest.mark.slow
def test_aborted_uploads_leave_nothing(served):
  """Over real HTTP: uploads cut off mid-body free their slot and files and log no traceback."""
  _aborted_uploads_leave_nothing(served, 30, None)


@pytest.mark.slow
def test_rss_stays_flat_over_1000_aborted_uploads(served):
  _aborted_uploads_leave_nothing(served, 1000, rss_growth_mb=30)

