"""The index a running server searches, swapped for a newly committed one without a restart.

A build commits by replacing `index.json` (`os.replace`), so a new (inode, size, mtime) of that file
means a new commit. `LiveIndex.check` then opens the new index beside the old one and swaps it in
with one reference assignment: a request takes `LiveIndex.current` once and uses it throughout, so
requests in flight finish on the old index and new ones see the new one (the old one is freed with
its last request). A new index is refused, with a log line, while the old one keeps serving, when it
cannot be opened or when its codes are not the server encoder's: other encoder fields (bits, model,
transform: `HammingIndex.check_encoder`), or another checkpoint, step or export than the index the
server started with (the server's uploads would be encoded by another model state). A refused
commit is not retried until `index.json` changes again. A watcher thread checks every `reload_s`
seconds, and at once on `wake()` (the server's SIGHUP).
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
import time

from absl import logging

from hybridhash_jax import hamming_index

# Besides `hamming_index.ENCODER_FIELDS`: what says which model state encoded an index's codes.
SOURCE_FIELDS = ("checkpoint", "step", "encoder")


def _now() -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def version(info: dict) -> str:
  """A short hash of an index's `index.json` contents: different for every commit (each names new files)."""
  return hashlib.sha256(json.dumps(info, sort_keys=True).encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Loaded:
  """One opened index and what /api/info says of it."""
  index: hamming_index.HammingIndex
  version: str
  loaded: str  # UTC time of the swap (or of the server's start)

  def describe(self) -> dict:
    return {"version": self.version, "built": self.index.info.get("built"), "size": len(self.index),
            "loaded": self.loaded}


class LiveIndex:
  """The current `Loaded` index of one directory, searched with `encoder`; see the module docstring."""

  def __init__(self, index: hamming_index.HammingIndex, encoder, reload_s: float | None = None):
    self.encoder, self.reload_s = encoder, reload_s
    self.directory = index.directory
    self._source = {f: index.info.get(f) for f in SOURCE_FIELDS}
    self._seen = self._stat()  # taken before the next open, so a commit racing it is seen at the next check
    self.current = Loaded(index, version(index.info), _now())
    self.reloads = 0
    self.refused: dict | None = None  # the last refused commit: {"at", "reason"}
    self._lock = threading.Lock()
    self._wake = threading.Event()
    self._stop = False

  def _stat(self):
    try:
      st = os.stat(os.path.join(self.directory, hamming_index.INDEX_JSON))
    except FileNotFoundError:
      return None
    return st.st_ino, st.st_size, st.st_mtime_ns

  def _open(self) -> hamming_index.HammingIndex:
    index = hamming_index.HammingIndex.open(self.directory)
    index.check_encoder(self.encoder)
    source = {f: index.info.get(f) for f in SOURCE_FIELDS}
    if source != self._source:
      diffs = [f"{f}: index has {source[f]!r}, the server's encoder {self._source[f]!r}" for f in SOURCE_FIELDS
               if source[f] != self._source[f]]
      raise ValueError(f"the index {self.directory} was encoded by another model state than the server's "
                       "encoder (restart the server to serve it with its own):\n  " + "\n  ".join(diffs))
    return index

  def check(self) -> bool:
    """Swaps to a newly committed index; False when there is none or it is refused."""
    with self._lock:
      seen = self._stat()
      if seen is None or seen == self._seen:
        return False
      self._seen = seen
      try:
        index = self._open()
      except (OSError, ValueError) as e:
        reason = str(e).replace("\n  ", "; ")
        self.refused = {"at": _now(), "reason": reason}
        logging.warning("refused the index committed in %s: %s; still serving version %s", self.directory, reason,
                        self.current.version)
        return False
      new = version(index.info)
      if new == self.current.version:
        return False
      self.current = Loaded(index, new, _now())
      self.reloads += 1
      logging.info("now serving index version %s of %s: %d items, built %s", new, self.directory, len(index),
                      index.info.get("built"))
      return True

  def wake(self) -> None:
    """Checks at once (safe to call from a signal handler: it only sets an event)."""
    self._wake.set()

  def _watch(self) -> None:
    while True:
      self._wake.wait(self.reload_s)
      self._wake.clear()
      if self._stop:
        return
      try:
        self.check()
      except Exception:  # noqa: BLE001  # a bug here must not stop the server: logged with its traceback
        logging.exception("checking %s for a new index failed", self.directory)

  @contextlib.contextmanager
  def watching(self):
    """Runs the watcher thread (every `reload_s` seconds, None: on `wake()` only) while the context lasts."""
    self._stop = False
    thread = threading.Thread(target=self._watch, name="index-watcher", daemon=True)
    thread.start()
    try:
      yield self
    finally:
      self._stop = True
      self._wake.set()
      thread.join()
