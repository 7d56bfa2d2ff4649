"""grain pipelines: epochs, resume from a saved iterator state, per-process shards, complete evaluation."""

import numpy as np
import orbax.checkpoint as ocp
import pytest

import grain
from hybridhash_jax import config_lib
from hybridhash_jax import input_pipeline
from tests import data_fixtures


@pytest.fixture(scope="module")
def folder_config(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("imgs"))
  data_fixtures.write_folder(root, {"a": 10, "b": 10, "c": 11})
  c = config_lib.base_config()
  c.model.img_size = 16
  c.data.update(name="folder", root=root, num_classes=-1, query_per_class=2, train_per_class=4, num_workers=0)
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_epochs_are_fresh_permutations(folder_config):
  splits = input_pipeline.build_splits(folder_config)
  assert len(splits.train) == 12
  folder_config.batch_size = 4
  assert input_pipeline.steps_per_epoch(folder_config, splits) == 3
  batches = _take(iter(input_pipeline.train_loader(folder_config, splits, seed=1, local_batch_size=4)), 6)
  epochs = [np.concatenate([b["index"] for b in batches[i:i + 3]]) for i in (0, 3)]
  for e in epochs:
    assert sorted(e) == list(range(12))
  assert not np.array_equal(epochs[0], epochs[1])
  again = _take(iter(input_pipeline.train_loader(folder_config, splits, seed=1, local_batch_size=4)), 6)
  _assert_batches_equal(batches, again)
  other = next(iter(input_pipeline.train_loader(folder_config, splits, seed=2, local_batch_size=4)))
  assert not np.array_equal(other["index"], batches[0]["index"])


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])  # 1: a worker process
def test_resume_from_saved_state(folder_config, tmp_path, workers):
  splits = input_pipeline.build_splits(folder_config)
  make = lambda s: iter(input_pipeline.train_loader(folder_config, s, seed=0, local_batch_size=5,
                                                    worker_count=workers))
  reference = _take(make(splits), 7)
  it = make(splits)
  _take(it, 4)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:  # the lead's path: orbax + grain's args
    mngr.save(4, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  fresh = make(input_pipeline.build_splits(folder_config))
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.restore(4, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_batches_equal(_take(fresh, 3), reference[4:])
  plain = make(splits)
  plain.set_state(it.get_state())
  _assert_batches_equal(_take(plain, 3), reference[4:])


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_two_processes_split_the_global_batch(folder_config, workers):
  splits = input_pipeline.build_splits(folder_config)
  one = _take(iter(input_pipeline.train_loader(folder_config, splits, seed=0, local_batch_size=6,
                                               worker_count=workers)), 4)
  two = [_take(iter(input_pipeline.train_loader(folder_config, splits, seed=0, local_batch_size=3,
                                                process_index=p, process_count=2, worker_count=workers)), 4)
         for p in (0, 1)]
  for g, (a, b) in zip(one, zip(*two)):
    assert not set(a["index"]) & set(b["index"])
    merged = {k: np.concatenate([a[k], b[k]]) for k in g}
    order, ref_order = np.argsort(merged["index"]), np.argsort(g["index"])
    for k in g:  # same examples, same augmentation
      np.testing.assert_array_equal(merged[k][order], g[k][ref_order], err_msg=k)


@pytest.mark.parametrize("process_count,local_batch,workers",
                         [(1, 4, 0), (2, 3, 0), pytest.param(3, 2, 1, marks=pytest.mark.slow)])
def test_eval_covers_every_example_once(folder_config, process_count, local_batch, workers):
  folder_config.data.num_workers = workers
  splits = input_pipeline.build_splits(folder_config)
  db = splits.database  # 31 - 18 = 13 rows
  per_process = [list(input_pipeline.eval_batches(folder_config, db, local_batch_size=local_batch,
                                                  process_index=p, process_count=process_count))
                 for p in range(process_count)]
  folder_config.data.num_workers = 0
  num_global = -(-len(db) // (local_batch * process_count))
  assert [len(b) for b in per_process] == [num_global] * process_count
  rows = []
  for g in range(num_global):  # process p holds the p-th slice of global batch g
    for p in range(process_count):
      b = per_process[p][g]
      assert b["image"].shape == (local_batch, 16, 16, 3) and b["mask"].dtype == bool
      np.testing.assert_array_equal(b["index"], g * local_batch * process_count + p * local_batch
                                    + np.arange(local_batch))
      rows += [(int(i), bool(m)) for i, m in zip(b["index"], b["mask"])]
  assert [i for i, m in rows if m] == list(range(len(db)))
  assert all(i >= len(db) for i, m in rows if not m)
  masked = {int(i): (img, lab) for bs in per_process for b in bs
            for i, img, lab, m in zip(b["index"], b["image"], b["label"], b["mask"]) if m}
  expect = input_pipeline.eval_images(folder_config, db, np.arange(len(db)))
  for i in range(len(db)):
    np.testing.assert_array_equal(masked[i][0], expect[i])
    np.testing.assert_array_equal(masked[i][1], db[i]["label"])


def test_digits_train_resizes_without_augmentation():
  c = config_lib.base_config()
  c.model.img_size = 16
  c.data.update(name="digits", query_per_class=5, train_per_class=20, num_workers=0)
  splits = input_pipeline.build_splits(c)
  batch = next(iter(input_pipeline.train_loader(c, splits, seed=0, local_batch_size=8)))
  for img, i in zip(batch["image"], batch["index"]):
    np.testing.assert_array_equal(img, input_pipeline.eval_images(c, splits.train, [i])[0])
  with pytest.raises(ValueError, match="global batch 128x2 is larger than the 200 training images"):
    input_pipeline.train_loader(c, splits, seed=0, local_batch_size=128, process_count=2)
