"""Metrics to `workdir/metrics.jsonl` and TensorBoard event files, from process 0 only."""

import contextlib
import json
import time

from etils import epath
import jax
import numpy as np
from tensorboardX import event_file_writer
from tensorboardX import record_writer
from tensorboardX import summary
from tensorboardX.proto import event_pb2

from hybridhash_jax import files


class MetricWriter:
  """Appends one JSON line per write and mirrors scalars to TensorBoard (tensorboardX).

  Events are written in the caller's thread (tensorboardX's `EventsWriter`, not its `SummaryWriter`,
  whose writer thread would meet a full disk on its own: a traceback at exit, or a queue that fills)."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    self._path = epath.Path(workdir) / "metrics.jsonl"
    with files.writing(self._path):
      self._jsonl = self._path.open("a")
    self._tb_dir = epath.Path(workdir) / "tensorboard"
    with files.writing(self._tb_dir):
      record_writer.directory_check(str(self._tb_dir))
      self._tb = event_file_writer.EventsWriter(str(self._tb_dir / "events"))

  def write(self, step: int, scalars: dict) -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items() if np.ndim(v) == 0}
    with files.writing(self._path):  # a full disk stops the run naming this file
      self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
      self._jsonl.flush()
    with files.writing(self._tb_dir):
      for k, v in scalars.items():
        self._tb.write_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary.scalar(k, v)))
      self._tb.flush()

  def close(self) -> None:
    if self._active:
      with contextlib.ExitStack() as closing:  # both, even when the first fails
        closing.callback(self._tb.close)
        closing.callback(self._jsonl.close)

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    """Closes the files on every exit; a close that fails while an error is raised (a full disk) does not hide it."""
    try:
      self.close()
    except OSError:
      if exc_type is None:
        raise
