"""Workdir files, written whole or not at all, on local disks and cloud buckets alike.

A file written for later reading (results.json, the split, the figures) goes to a temporary name
in its own folder and is then renamed over the target, so a kill or a failure in the middle leaves
the previous file (rename is atomic on POSIX file systems; a bucket object appears only once its
upload is complete). Paths go through `etils.epath`, so a `gs://` workdir works like a local one.
"""

import json
from typing import Any, BinaryIO, Callable
import uuid

from etils import epath


def write_bytes(path: epath.PathLike, data: bytes) -> None:
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"  # hidden, and unique per writer
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def write_text(path: epath.PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: epath.PathLike, obj: Any, **dump_kwargs) -> None:
  """Serialises first, so an unserialisable value fails before anything is written."""
  write_text(path, json.dumps(obj, **dump_kwargs))


def read_json(path: epath.PathLike) -> Any:
  return json.loads(epath.Path(path).read_text())


def write_stream(path: epath.PathLike, write: Callable[[BinaryIO], Any]) -> None:
  """As `write_bytes`, for a writer that takes a binary file (np.save, pyarrow.parquet.write_table), so a large
  file is streamed, not held in memory whole."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
  try:
    with tmp.open("wb") as f:
      write(f)
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise
