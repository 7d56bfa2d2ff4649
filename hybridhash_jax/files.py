"""Workdir files, written whole or not at all, on local disks and cloud buckets alike.

A file written for later reading (results.json, the split, the figures) goes to a temporary name
in its own folder and is then renamed over the target, so a kill or a failure in the middle leaves
the previous file (rename is atomic on POSIX file systems; a bucket object appears only once its
upload is complete). Paths go through `etils.epath`, so a `gs://` workdir works like a local one.
A write that fails (a full disk, an I/O error, no permission) is an `errors.WriteError` naming the file.
"""

import contextlib
import io
import json
from typing import Any, Callable
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
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"  # hidden, and unique per writer
  try:
    with writing(path):
      tmp.write_bytes(data)
      tmp.replace(path)
  except BaseException:
    with contextlib.suppress(OSError):
      tmp.unlink(missing_ok=True)
    raise


def write_with(path: epath.PathLike, write: Callable[[io.BytesIO], Any]) -> None:
  """`write(f)` into memory, then `write_bytes`: for writers that want a file object (np.save, parquet)."""
  buf = io.BytesIO()
  write(buf)
  write_bytes(path, buf.getvalue())


def write_text(path: epath.PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: epath.PathLike, obj: Any, **dump_kwargs) -> None:
  """Serialises first, so an unserialisable value fails before anything is written."""
  write_text(path, json.dumps(obj, **dump_kwargs))


def read_json(path: epath.PathLike) -> Any:
  return json.loads(epath.Path(path).read_text())
