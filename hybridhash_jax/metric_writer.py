"""Metrics to `workdir/metrics.jsonl` and TensorBoard event files, from process 0 only."""

import json

from etils import epath
import jax
import numpy as np

from hybridhash_jax import files


class MetricWriter:
  """Appends one JSON line per write and mirrors scalars to TensorBoard (tensorboardX)."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    from tensorboardX import SummaryWriter
    self._path = epath.Path(workdir) / "metrics.jsonl"
    with files.writing(self._path):
      self._jsonl = self._path.open("a")
    self._tb_dir = epath.Path(workdir) / "tensorboard"
    self._tb = SummaryWriter(str(self._tb_dir))

  def write(self, step: int, scalars: dict) -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items() if np.ndim(v) == 0}
    with files.writing(self._path):  # a full disk stops the run naming this file
      self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
      self._jsonl.flush()
    with files.writing(self._tb_dir):
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    """Closes the files on every exit; a close that fails while an error is raised (a full disk) does not hide it."""
    try:
      self.close()
    except OSError:
      if exc_type is None:
        raise
