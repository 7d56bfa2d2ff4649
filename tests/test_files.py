"""Workdir files are written whole or not at all, through etils.epath."""

import builtins
import json
import os

from etils.epath import testing as epath_testing
import numpy as np
from PIL import Image
import pytest

from hybridhash_jax import evaluate
from hybridhash_jax import files
from hybridhash_jax import input_pipeline
from hybridhash_jax import sharding
from hybridhash_jax import train
from hybridhash_jax.data import splits as splits_lib
from tests.helpers import EVAL_ARTEFACTS, tiny_config


class _DiskFull:
  """A file whose first write stores half of its data, then fails: a kill or a full disk mid-write."""

  def __init__(self, f):
    self._f = f

  def write(self, data):
    self._f.write(data[:len(data) // 2])
    self._f.flush()
    raise OSError(28, "No space left on device")

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


def _fail_writes_to(monkeypatch, name):
  """Every write-mode `open` of `name` (or of a temporary name made from it) fails midway."""
  real = builtins.open

  def fake(path, mode="r", *args, **kwargs):
    f = real(path, mode, *args, **kwargs)
    base = os.path.basename(str(path))
    if "w" in mode and (base == name or base.startswith(f".{name}.")):
      return _DiskFull(f)
    return f

  monkeypatch.setattr(builtins, "open", fake)


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
  path = tmp_path / "r.json"
  files.write_json(path, {"map": 0.5})
  _fail_writes_to(monkeypatch, "r.json")
  with pytest.raises(OSError, match="No space"):
    files.write_json(path, {"map": 0.75, "padding": "x" * 1000})
  monkeypatch.undo()
  assert json.loads(path.read_text()) == {"map": 0.5}
  assert os.listdir(tmp_path) == ["r.json"]  # no temporary file left behind


def test_a_failed_split_write_leaves_no_split(tmp_path, monkeypatch):
  _fail_writes_to(monkeypatch, splits_lib.SPLITS_FILE)
  with pytest.raises(OSError):
    splits_lib.load_or_make(str(tmp_path), {"m": 1}, lambda: {k: np.arange(3) for k in splits_lib.SPLIT_NAMES})
  assert not os.listdir(tmp_path)  # the next run makes the split afresh instead of reading half of one


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """A workdir evaluated once, and params that give other results (a fresh init with another seed)."""
  workdir = tmp_path_factory.mktemp("w")
  config = tiny_config()
  splits = input_pipeline.build_splits(config, str(workdir))
  mesh = sharding.make_mesh(config.mesh)
  setup = train.build(config, splits, mesh)
  evaluator = evaluate.Evaluator(config, setup.model, mesh, setup.state_shardings.params)
  first, other = (train.initial_state(setup, tiny_config(seed=s)).params for s in (0, 1))
  evaluator.run(first, splits, 4, str(workdir), {})
  return workdir, evaluator, splits, other


@pytest.mark.parametrize("name", ["pr_curve.json", "retrieval_grid.png", "results.json"])
@pytest.mark.slow
def test_a_failed_eval_write_keeps_the_previous_file(evaluated, monkeypatch, name):
  workdir, evaluator, splits, other = evaluated
  before = (workdir / "eval" / name).read_bytes()
  _fail_writes_to(monkeypatch, name)
  with pytest.raises(OSError, match="No space"):
    evaluator.run(other, splits, 8, str(workdir), evaluate.load_history(str(workdir)))
  monkeypatch.undo()
  assert (workdir / "eval" / name).read_bytes() == before
  assert sorted(p.name for p in (workdir / "eval").iterdir()) == sorted(EVAL_ARTEFACTS)  # no temporary files
  for p in (workdir / "eval").iterdir():  # every file whole: the previous one or the new one
    if p.suffix == ".json":
      json.loads(p.read_text())
    else:
      with Image.open(p) as im:
        im.verify()
  assert evaluate.load_history(str(workdir))["step"] == 4  # what a resumed run reads back


@pytest.mark.slow
def test_every_workdir_file_goes_through_epath(trained, tmp_path):
  """What the run writes itself (not orbax's checkpoints nor tensorboardX's events) uses etils.epath,
  so a gs:// workdir works: every such file was opened through epath's (here recording) backend."""
  opened = set()

  def record(open_fn, path, *args, **kwargs):
    opened.add(os.path.realpath(str(path)))
    return open_fn(path, *args, **kwargs)

  def record_replace(replace_fn, path, dst):
    opened.add(os.path.realpath(str(dst)))
    return replace_fn(path, dst)

  with epath_testing.mock_epath(open=record, replace=record_replace):
    train.train_and_evaluate(trained.config_with(num_train_steps=2), str(tmp_path))
  written = {os.path.realpath(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path) for f in fs
             if not os.path.relpath(d, tmp_path).startswith(("checkpoints", "tensorboard"))}
  assert {os.path.basename(p) for p in written} >= {"splits.json", "metrics.jsonl", "results.json",
                                                     "retrieval_grid.png"}
  assert written <= opened, written - opened
