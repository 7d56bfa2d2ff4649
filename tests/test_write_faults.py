"""Failed writes (a full disk, an I/O error): one error line naming the file; what was written before stays."""

import contextlib
import errno
import logging
import os
import pathlib
import re
import shutil
import subprocess
import uuid

from etils import epath
import numpy as np
import pytest

from hybridhash_jax import errors
from hybridhash_jax import files
from hybridhash_jax import hamming_index
from hybridhash_jax import index as index_cli
from hybridhash_jax import index_build
from hybridhash_jax import metric_writer
from hybridhash_jax import train
from hybridhash_jax import workdir_lock
from tests import helpers


@contextlib.contextmanager
def _tmpfs(size: str):
  """A small tmpfs (mounting needs root); the test is skipped where mounting is refused."""
  root = pathlib.Path("/tmp") / f"hybridhash-tmpfs-{uuid.uuid4().hex[:8]}"
  root.mkdir()
  try:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(root)], capture_output=True,
                          text=True)
  except FileNotFoundError:
    proc = None
  if proc is None or proc.returncode:
    root.rmdir()
    pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() if proc else 'no mount command'}")
  try:
    yield root
  finally:
    subprocess.run(["umount", "--lazy", str(root)], check=False)  # files a failed writer left open keep it busy
    root.rmdir()


def _fill(root: pathlib.Path, leave: int = 0) -> pathlib.Path:
  """Fills the file system but `leave` bytes (about); returns the filler to delete to free the space."""
  filler = root / "filler"
  with open(filler, "wb", buffering=0) as f:
    with contextlib.suppress(OSError):
      while True:
        f.write(b"\0" * 4096)
  if leave:
    os.truncate(filler, max(0, filler.stat().st_size - leave))
  return filler


@pytest.fixture
def small_disk():
  with _tmpfs("8m") as root:
    yield root


def test_a_full_disk_is_a_write_error_naming_the_file_and_the_old_file_stays(small_disk):
  path = small_disk / "results.json"
  files.write_json(path, {"map": 0.5})
  _fill(small_disk)
  with pytest.raises(errors.WriteError) as e:
    files.write_json(path, {"map": 0.9, "pad": "x" * 100_000})
  assert str(e.value) == f"cannot write {path}: No space left on device"
  assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
  assert files.read_json(path) == {"map": 0.5}
  assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "results.json"]  # no temporary left


@pytest.mark.parametrize("code", [errno.EIO, errno.EACCES])
def test_other_os_errors_name_the_file_too(tmp_path, monkeypatch, code):
  def fail(self, *args, **kwargs):
    raise OSError(code, os.strerror(code))

  monkeypatch.setattr(type(epath.Path(tmp_path)), "open", fail)
  with pytest.raises(errors.WriteError, match=f"cannot write {tmp_path / 'x.png'}: {os.strerror(code)}$"):
    files.write_bytes(tmp_path / "x.png", b"png")


def test_a_metrics_line_on_a_full_disk(small_disk):
  with pytest.raises(errors.WriteError, match=f"cannot write {small_disk}/(metrics.jsonl|tensorboard): "
                                             "No space left on device$"):
    with metric_writer.MetricWriter(str(small_disk)) as writer:  # its close on the full disk hides nothing
      writer.write(1, {"loss": 1.0})
      _fill(small_disk)
      for step in range(2, 10_000):  # until a buffer is flushed
        writer.write(step, {"loss": 1.0, "pad": 0.0})


def test_a_lock_on_a_full_disk_is_a_write_error_and_leaves_no_lock(small_disk):
  """An empty lock left by the failed write would refuse the rerun as a run 'of PID ?'."""
  (small_disk / "w").mkdir()
  _fill(small_disk)
  with pytest.raises(errors.WriteError, match=f"^cannot write {small_disk / 'w' / 'run.lock'}: No space left"):
    workdir_lock.acquire(str(small_disk / "w"))
  assert not (small_disk / "w" / "run.lock").exists()


@pytest.fixture
def disk_at_step_4(trained, small_disk):
  """The session's trained run on the small disk, up to its checkpoint at step 4."""
  shutil.copytree(trained.workdir, small_disk / "w", ignore=lambda d, names: {"8", "12"} & set(names))
  return small_disk


@pytest.mark.slow
@pytest.mark.parametrize("leave", [20_000, 200_000])  # the save fails in its JSON items or in its arrays
def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_the_rerun_resumes(trained, disk_at_step_4, leave,
                                                                                 caplog):
  workdir = disk_at_step_4 / "w"
  filler = _fill(disk_at_step_4, leave)
  proc = trained.main(workdir, "num_train_steps=8")
  assert proc.returncode == 1
  lines = proc.stderr.splitlines()
  assert [line for line in lines if line.startswith("error: ")] == [
      f"error: cannot write {workdir / 'checkpoints'}: No space left on device"]
  assert "Traceback" not in proc.stderr
  assert not [line for line in lines if re.match(r"E\d{4} ", line)], proc.stderr  # orbax's own error logs
  filler.unlink()
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(trained.config_with(num_train_steps=8), str(workdir))
  assert f"Resumed from {workdir / 'checkpoints'} at step 4." in caplog.messages
  assert helpers.restore_state(workdir)[0] == 8


def _index_files(out: pathlib.Path) -> list[str]:
  return sorted(p.name for p in out.iterdir() if p.name != index_build.STAGING)


@pytest.mark.parametrize("when", ["staging", "commit"])
def test_a_full_disk_during_an_index_build_keeps_the_old_index_and_the_staged_chunks(indexed, small_disk, monkeypatch,
                                                                                      when):
  """The disk fills after the first new chunk is staged, or once all are (while the new version is written)."""
  src, out, encoder = small_disk / "imgs", small_disk / "out", indexed["encoder"]
  db = sorted((indexed["root"] / "db").rglob("*.png"))
  helpers.copy_images(indexed["root"] / "db", src, db[:24])
  index_build.build(encoder, str(src), str(out), kind="multihash", chunk_size=4, progress=False)
  old_files, old_codes = _index_files(out), hamming_index.HammingIndex.open(str(out)).codes
  helpers.copy_images(indexed["root"] / "db", src, db[24:48])
  fillers = []
  if when == "staging":
    write = index_build._Staging.write

    def write_then_fill(self, *args):
      path = write(self, *args)
      fillers.append(fillers[0] if fillers else _fill(small_disk))
      return path

    monkeypatch.setattr(index_build._Staging, "write", write_then_fill)
  else:
    commit = index_build._commit
    monkeypatch.setattr(index_build, "_commit", lambda *args: (fillers.append(_fill(small_disk)), commit(*args))[1])
  argv = ["build", f"--workdir={indexed['workdir']}", f"--images={src}", f"--index={out}", "--kind=multihash",
          "--chunk=4"]
  with pytest.raises(SystemExit) as e:
    index_cli.main(argv)
  assert re.fullmatch(f"error: cannot write {out}/\\S+: No space left on device", e.value.code), e.value.code
  assert _index_files(out) == old_files  # the old version, and nothing of the new one
  np.testing.assert_array_equal(hamming_index.HammingIndex.open(str(out)).codes, old_codes)
  staged = [p for p in (out / index_build.STAGING).iterdir() if p.suffix == ".npz"]
  assert len(staged) == (1 if when == "staging" else 6)
  fillers[0].unlink()
  monkeypatch.undo()
  info = index_build.build(encoder, str(src), str(out), kind="multihash", chunk_size=4, progress=False)
  assert info["count"] == 48 and info["build"] == dict(info["build"], encoded=24 - 4 * len(staged), resumed=4 * len(
      staged))
  fresh = index_build.build(encoder, str(src), str(small_disk / "fresh"), kind="multihash", progress=False)
  np.testing.assert_array_equal(hamming_index.HammingIndex.open(str(out)).codes,
                                hamming_index.HammingIndex.open(str(small_disk / "fresh")).codes)
  assert fresh["count"] == 48
