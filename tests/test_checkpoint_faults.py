"""Damaged checkpoints: readers name the step, file and readable steps; a resumed run sets the step aside."""

import asyncio
import itertools
import json
import logging
import os
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hybridhash_jax import checkpoints
from hybridhash_jax import encoding
from hybridhash_jax import errors
from hybridhash_jax import evaluate
from hybridhash_jax import train
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]


def _params_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The OCDBT files of the step's params, largest first."""
  return sorted((step_dir / "params").rglob("d/*"), key=lambda p: -p.stat().st_size)


def _plain_restore(step_dir):
  with ocp.StandardCheckpointer() as c:
    return jax.tree.leaves(c.restore(step_dir / "params"))


def _data_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest params file a restore reads (which files those are varies from run to run)."""
  for f in _params_files(step_dir):
    f.rename(f.with_name("away"))
    try:
      _plain_restore(step_dir)
    except Exception:  # noqa: BLE001  # read: this is the one
      return f
    finally:
      f.with_name("away").rename(f)
  pytest.fail("no params file is read")


def _flip(path: pathlib.Path, offset: int) -> None:
  data = bytearray(path.read_bytes())
  for i in range(offset, offset + 64):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _flipped(step_dir):
  """64 bytes flipped where orbax alone reads them back changed, without an error: inside a compressed
  value (where the values lie among the OCDBT files varies from run to run, so it is looked for)."""
  clean = _plain_restore(step_dir)
  for f, where in itertools.product(_params_files(step_dir), np.linspace(0.05, 0.95, 19)):
    original = f.read_bytes()
    _flip(f, min(int(len(original) * where), len(original) - 64))
    try:
      if any(not np.array_equal(a, b) for a, b in zip(clean, _plain_restore(step_dir))):
        return
    except Exception:  # noqa: BLE001,S110  # orbax saw this one itself: try another place
      pass
    f.write_bytes(original)
  pytest.fail("no place found where flipped bytes pass orbax's own checks")


def _flipped_header(step_dir):  # a compressed frame's header: tensorstore's own error
  _flip(_data_file(step_dir), 0)


def _truncated(step_dir):
  f = _data_file(step_dir)
  os.truncate(f, 16)


def _missing(step_dir):
  _data_file(step_dir).unlink()


def _metadata(step_dir):
  f = step_dir / "params" / "_METADATA"
  f.write_bytes(f.read_bytes()[:100] + b"\xff" * 64 + f.read_bytes()[164:])


def _marker_only(step_dir):  # the step's commit marker, none of its items
  for p in step_dir.iterdir():
    if p.is_dir():
      shutil.rmtree(p)


DAMAGE = {"flipped": _flipped, "flipped_header": _flipped_header,
          "truncated": _truncated, "missing": _missing,
          "metadata": _metadata, "marker_only": _marker_only}
# The file each damage is reported in.
DAMAGED_ITEM = dict.fromkeys(DAMAGE, "params") | {"marker_only": "config"}


@pytest.fixture(scope="module")
def run(trained, tmp_path_factory):
  """The session's trained run without its last step: steps 4 and 8 of 12. Each test damages its own copy."""
  workdir = tmp_path_factory.mktemp("run") / "w"
  shutil.copytree(trained.workdir, workdir)
  shutil.rmtree(workdir / "checkpoints" / "12")
  return workdir


@pytest.fixture
def copy(run, tmp_path):
  shutil.copytree(run, tmp_path / "w")
  return tmp_path / "w"


def _no_eval(monkeypatch):
  monkeypatch.setattr(evaluate.Evaluator, "run", lambda self, params, splits, step, workdir, history, writer=None:
                      {"step": step})


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_reader_names_the_unreadable_step_its_file_and_the_readable_steps(copy, kind):
  DAMAGE[kind](copy / "checkpoints" / "8")
  with pytest.raises(errors.CheckpointError) as e:
    encoding.restore(str(copy / "checkpoints"), encoding.local_mesh(), helpers.tiny_config().to_dict())
  message = str(e.value)
  assert message.startswith(f"checkpoint step 8 is unreadable: {copy / 'checkpoints' / '8' / DAMAGED_ITEM[kind]}: ")
  assert message.endswith("Readable steps: 4") and "\n" not in message
  assert (copy / "checkpoints" / "8").is_dir()  # readers move nothing
  r = encoding.restore(str(copy / "checkpoints"), encoding.local_mesh(), step=4)  # the other step still reads
  assert r.step == 4


def test_a_failed_read_closes_its_event_loops_with_no_read_in_flight(copy, monkeypatch):
  """The reads of a step that fails on its first one still finish before orbax's loop closes: none of their
  callbacks lands on a closed loop ("Event loop is closed") and no failure is left to report at exit."""
  in_flight, close = [], asyncio.BaseEventLoop.close

  def counting_close(loop):
    in_flight.append(sum(not t.done() for t in asyncio.all_tasks(loop)))
    close(loop)

  monkeypatch.setattr(asyncio.BaseEventLoop, "close", counting_close)
  _flipped_header(copy / "checkpoints" / "8")
  with pytest.raises(errors.CheckpointError, match="checkpoint step 8 is unreadable"):
    encoding.restore(str(copy / "checkpoints"), encoding.local_mesh(), helpers.tiny_config().to_dict())
  assert in_flight and not any(in_flight), in_flight


def test_arrays_that_differ_from_their_digest_are_caught(copy):
  """What flipped bytes inside a compressed value give: arrays that read without an error, but changed."""
  digest = copy / "checkpoints" / "8" / "digest" / "metadata"
  saved = json.loads(digest.read_text())
  key = next(iter(saved["params"]))
  saved["params"][key]["crc32"] ^= 1
  digest.write_text(json.dumps(saved))
  with pytest.raises(errors.CheckpointError, match=r"DATA_LOSS: \S+ differs from the checksum written with it"):
    encoding.restore(str(copy / "checkpoints"), encoding.local_mesh())


def test_readers_see_committed_steps_only(copy):
  ckpt = copy / "checkpoints"
  shutil.copytree(ckpt / "8", ckpt / "12.orbax-checkpoint-tmp-1234")  # a save still in flight
  shutil.copytree(ckpt / "8", ckpt / "16.unreadable-20260101T000000Z")  # a step set aside
  assert encoding.restore(str(ckpt), encoding.local_mesh()).step == 8


def test_a_bug_is_not_taken_for_damage(copy):
  """A target that does not fit the saved arrays is a bug: its own error and trace, and nothing moved."""
  wrong = {"params": {"no_such_param": jax.ShapeDtypeStruct((3,), np.float32)}}
  with pytest.raises(Exception) as e:  # noqa: B017  # whatever orbax raises, as long as it is not ours
    checkpoints.restore(str(copy / "checkpoints"), lambda saved: wrong)
  assert not isinstance(e.value, errors.CheckpointError)


def _resume(workdir, config, monkeypatch, caplog):
  _no_eval(monkeypatch)
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, str(workdir))
  return [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.slow
def test_resume_sets_the_unreadable_step_aside_and_continues_from_the_one_before(trained, run, copy, kind,
                                                                                 monkeypatch, caplog):
  ckpt = copy / "checkpoints"
  DAMAGE[kind](ckpt / "8")
  logs = _resume(copy, trained.config, monkeypatch, caplog)
  warnings = [m for m in logs if "unreadable" in m]
  assert len(warnings) == 1 and warnings[0].startswith("Checkpoint step 8 is unreadable (")
  assert f"{ckpt / '8' / DAMAGED_ITEM[kind]}: " in warnings[0]
  assert f"Resumed from {ckpt} at step 4." in logs
  aside = [p.name for p in ckpt.iterdir() if p.name.startswith("8.unreadable-")]
  assert len(aside) == 1 and (ckpt / aside[0] / "params").exists() is (kind != "marker_only")  # kept, not deleted
  # Steps 5-12 trained again from step 4: the same params as the first time.
  for step in (8, 12):
    _, again, _ = helpers.restore_state(copy, step)
    _, first, _ = helpers.restore_state(trained.workdir, step)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(first)):
      np.testing.assert_array_equal(a, b)


def test_resume_with_no_readable_step_lists_them_and_moves_nothing(trained, copy, monkeypatch, caplog):
  ckpt = copy / "checkpoints"
  _truncated(ckpt / "8")
  _metadata(ckpt / "4")
  with pytest.raises(errors.CheckpointError) as e:
    _resume(copy, trained.config, monkeypatch, caplog)
  message = str(e.value)
  assert message.startswith(f"no readable checkpoint in {ckpt}: step 8: {ckpt / '8' / 'params'}: ")
  assert f"; step 4: {ckpt / '4' / 'params'}: UnicodeDecodeError" in message and "\n" not in message
  assert sorted(p.name for p in ckpt.iterdir()) == ["4", "8"]


def test_a_config_of_another_run_is_refused_not_set_aside(trained, copy, monkeypatch, caplog):
  with pytest.raises(errors.ConfigError, match=r"model\.bits"):
    _no_eval(monkeypatch)
    train.train_and_evaluate(trained.config_with(**{"model.bits": 32}), str(copy))
  assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["4", "8"]


@pytest.mark.slow
def test_eval_only_on_an_unreadable_step_is_one_error_line(trained, copy):
  _flipped_header(copy / "checkpoints" / "8")
  proc = trained.main(copy, "eval_only=True")
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  errors_ = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert errors_ == [line for line in proc.stderr.splitlines() if "unreadable" in line]
  assert len(errors_) == 1 and "checkpoint step 8 is unreadable" in errors_[0] and "Readable steps: 4" in errors_[0]
  assert helpers.foreign_log_lines(proc.stderr) == [], proc.stderr  # orbax's own reports stay quiet


@pytest.mark.slow
def test_a_resumed_run_warns_once_without_traces(trained, copy):
  _flipped_header(copy / "checkpoints" / "8")
  proc = trained.main(copy)
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr
  assert sum("unreadable" in line for line in proc.stderr.splitlines()) == 1
  assert f"Resumed from {copy / 'checkpoints'} at step 4." in proc.stderr
  assert helpers.foreign_log_lines(proc.stderr) == [], proc.stderr
