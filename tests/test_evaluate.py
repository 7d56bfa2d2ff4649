"""Evaluation from a checkpoint alone, in a new process, against the training process's own."""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from hybridhash_jax import evaluate
from hybridhash_jax import input_pipeline
from hybridhash_jax import models
from hybridhash_jax import sharding
from hybridhash_jax import train
from tests import data_fixtures
from tests.helpers import EVAL_ARTEFACTS, tiny_config


def _fresh_eval(trained, tmp_path):
  """A copy of the trained workdir without its evaluation files, so that a new evaluation must write them."""
  workdir = tmp_path / "w"
  shutil.copytree(trained.workdir, workdir)
  for name in EVAL_ARTEFACTS:
    (workdir / "eval" / name).unlink()
  return workdir


def _check_eval(workdir, trained, tolerance):
  for name in EVAL_ARTEFACTS:
    assert (workdir / "eval" / name).stat().st_size > 0, name
  restored = json.loads((workdir / "eval" / "results.json").read_text())
  assert restored["step"] == trained.results["step"] == 12
  assert abs(restored["map"] - trained.results["map"]) <= tolerance, (restored["map"], trained.results["map"])
  assert (restored["num_query"], restored["num_database"]) == (50, 1547)
  assert 0.0 < restored["map"] <= 1.0


def test_eval_from_the_checkpoint_matches_training(trained, tmp_path):
  """Same device count: the numbers of the evaluation in training, exactly."""
  workdir = _fresh_eval(trained, tmp_path)
  evaluate.evaluate_checkpoint(trained.config_with(eval_only=True), str(workdir))
  _check_eval(workdir, trained, 0.0)


@pytest.mark.slow
def test_eval_in_a_new_process_matches_training(trained, tmp_path):
  """One device in a new process: the same up to float32 summation order."""
  workdir = _fresh_eval(trained, tmp_path)
  proc = trained.main(workdir, "eval_only=True")
  assert proc.returncode == 0, proc.stderr
  _check_eval(workdir, trained, 1e-6)


@pytest.mark.slow
def test_encode_covers_every_example_in_source_order(tmp_path):
  """Padded, sharded batches come back complete and in order: compare with a plain per-batch apply."""
  config = tiny_config(eval_batch_size=12)  # 50 queries: 4 full batches and a padded one, on 4 devices
  splits = input_pipeline.build_splits(config, str(tmp_path))
  mesh = sharding.make_mesh(config.mesh)
  setup = train.build(config, splits, mesh)
  params = train.initial_state(setup, config).params
  codes, labels, valid = evaluate.Evaluator(config, setup.model, mesh, setup.state_shardings.params).encode(
      params, splits.query)
  images = input_pipeline.eval_images(config, splits.query, np.arange(len(splits.query)))
  expected = models.from_config(config.model).apply({"params": params}, input_pipeline.normalize(images))
  np.testing.assert_allclose(codes, expected, atol=1e-5)
  want_labels = np.stack([np.asarray(splits.query[i]["label"]) for i in range(len(splits.query))])
  np.testing.assert_array_equal(labels, want_labels)
  assert valid.all()


def _listfile_config(root, **data):
  config = tiny_config(**{"data.name": "listfile", "data.num_classes": 5, "data.list_dir": root, "data.root": root,
                          "data.top_k": -1, **{f"data.{k}": v for k, v in data.items()}})
  return config


def _evaluate(config, workdir):
  splits = input_pipeline.build_splits(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  setup = train.build(config, splits, mesh)
  params = train.initial_state(setup, config).params
  return evaluate.Evaluator(config, setup.model, mesh, setup.state_shardings.params).run(
      params, splits, 0, workdir, {})


@pytest.mark.slow
def test_skipped_images_leave_the_ranking(tmp_path):
  """A database (and query set) with a corrupt image gives exactly the mAP of the same sets without it."""
  sizes = {"train": 8, "query": 6, "database": 24}
  full, clean = str(tmp_path / "full"), str(tmp_path / "clean")
  rows = data_fixtures.write_listfile(full, sizes, num_classes=5)
  data_fixtures.write_listfile(clean, sizes, num_classes=5)
  bad = {"query": 1, "database": 3}
  for split, i in bad.items():
    with open(os.path.join(full, rows[split][i][0]), "wb") as f:
      f.write(b"not an image")
    name = "test.txt" if split == "query" else "database.txt"
    lines = pathlib.Path(clean, name).read_text().splitlines(keepends=True)
    pathlib.Path(clean, name).write_text("".join(lines[:i] + lines[i + 1:]))
  with_bad = _evaluate(_listfile_config(full, on_bad_image="skip"), str(tmp_path / "a"))
  without = _evaluate(_listfile_config(clean), str(tmp_path / "b"))
  assert (with_bad["num_query"], with_bad["num_database"]) == (without["num_query"], without["num_database"]) == (5, 23)
  assert (with_bad["num_query_skipped"], with_bad["num_database_skipped"]) == (1, 1)
  assert (without["num_query_skipped"], without["num_database_skipped"]) == (0, 0)
  assert with_bad["top_k"] == without["top_k"] == 23
  for key in ("map", "map_tie_aware", "precision_at_radius_2"):
    assert with_bad[key] == without[key], key
