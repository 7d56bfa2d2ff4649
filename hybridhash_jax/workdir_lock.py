"""One training run per workdir: `WORKDIR/run.lock` names the run that holds it (host, PID, start time).

On a local or mounted file system the lock is created with O_CREAT|O_EXCL, so of two runs starting
together exactly one gets it. On gs:// (through `etils.epath`) there is no create-if-absent: the lock is
written when absent and read back, the last writer keeping it, so two runs started within the same
second may both pass; a run started later is always refused.
A lock whose PID is gone on this host (a killed run) is taken over with a warning. A lock of another
host cannot be checked from here: the error says which host and PID hold it, and the file is deleted by
hand once that run is known to be gone. In a multi-host run, process 0 holds the lock for all of them.
"""

import contextlib
import json
import os
import socket
import time

from absl import logging
from etils import epath
import jax

from hybridhash_jax import errors
from hybridhash_jax import files

LOCK_NAME = "run.lock"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _read(path: epath.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, ValueError):
    return {}  # released meanwhile, or half written by a run killed at that moment


def _create(path: epath.Path, holder: dict) -> bool:
  text = json.dumps(holder)
  if "://" not in str(path):  # a local or mounted file system: O_EXCL makes the create atomic
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    try:
      with files.writing(path), os.fdopen(fd, "w") as f:
        f.write(text)
    except errors.WriteError:  # a full disk: no empty lock left to refuse the rerun
      path.unlink(missing_ok=True)
      raise
    return True
  if path.exists():  # a bucket: written, then read back to see which writer came last
    return False
  with files.writing(path):
    path.write_text(text)
  return _read(path) == holder


def acquire(workdir: str) -> epath.Path:
  """Takes the workdir's lock, or raises `WorkdirBusyError` naming the run that holds it."""
  path = epath.Path(workdir) / LOCK_NAME
  me = {"host": socket.gethostname(), "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  if _create(path, me):
    return path
  held = _read(path)
  if held.get("host") == me["host"] and not _alive(int(held.get("pid", -1))):
    logging.warning("Taking over %s: its run (PID %s, started %s) is gone.", path, held.get("pid"),
                    held.get("started"))
    path.unlink(missing_ok=True)
    if _create(path, me):
      return path
    held = _read(path)
  raise errors.WorkdirBusyError(
      f"workdir {workdir} is in use by the run of PID {held.get('pid', '?')} on host {held.get('host', '?')} "
      f"(started {held.get('started', '?')}). Use another workdir, or, if that run is gone, delete {path}")


def release(path: epath.Path) -> None:
  """Deletes the lock if it is still this process's."""
  held = _read(path)
  if held.get("host") == socket.gethostname() and held.get("pid") == os.getpid():
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def held(workdir: str):
  """The workdir's lock for the duration of a training run (held by process 0)."""
  path = acquire(workdir) if jax.process_index() == 0 else None
  try:
    yield
  finally:
    if path is not None:
      release(path)
