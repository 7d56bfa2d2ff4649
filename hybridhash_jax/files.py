"""Workdir files, written whole or not at all, on local disks and cloud buckets alike.

A file written for later reading (results.json, the split, the figures) goes to a temporary name
in its own folder and is then renamed over the target, so a kill or a failure in the middle leaves
the previous file (rename is atomic on POSIX file systems; a bucket object appears only once its
upload is complete). Paths go through `etils.epath`, so a `gs://` workdir works like a local one.
A write that fails (a full disk, an I/O error, no permission) is an `errors.WriteError` naming the file.
"""

import contextlib
import json
from typing import Any, BinaryIO, Callable
import uuid

from etils import epath

from hybridhash_jax import errors
from hybridhash_jax import io_errors


@contextlib.contextmanager
def writing(path: epath.PathLike):
  """An OS error inside becomes a `WriteError` naming `path` (the run stops with one line, not a trace)."""
  try:
    yield
  except errors.WriteError:
    raise
  except OSError as e:
    io_errors.silence_leftovers()  # a file left open on the full disk fails once more at exit
    raise errors.WriteError(path, e) from e


def write_bytes(path: epath.PathLike, data: bytes) -> None:
  write_stream(path, lambda f: f.write(data))


def write_text(path: epath.PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: epath.PathLike, obj: Any, **dump_kwargs) -> None:
  """Serialises first, so an unserialisable value fails before anything is written."""
  write_text(path, json.dumps(obj, **dump_kwargs))


def read_json(path: epath.PathLike) -> Any:
  return json.loads(epath.Path(path).read_text())


def write_stream(path: epath.PathLike, write: Callable[[BinaryIO], Any]) -> None:
  """`write(f)` into a hidden file beside `path`, renamed over it once whole; for a writer that takes a binary
  file (np.save, pyarrow.parquet.write_table), a large file is streamed, not held in memory."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"  # hidden, and unique per writer
  try:
    with writing(path):
      with tmp.open("wb") as f:
        write(f)
      tmp.replace(path)
  except BaseException:
    with contextlib.suppress(OSError):
      tmp.unlink(missing_ok=True)
    raise
