"""CIFAR-10 protocols at full size on generated official-format archives, and through TFDS's mock."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from hybridhash_jax import config_lib
from hybridhash_jax import input_pipeline
from hybridhash_jax.data import cifar10
from hybridhash_jax.data import splits as splits_lib
from tests import data_fixtures

# protocol: (query, train, database) sizes and per-class counts, from the deep-hashing protocols' table.
EXPECTED = {
    "cifar10": ((1000, 5000, 54000), (100, 500, 5400)),
    "cifar10-1": ((1000, 5000, 59000), (100, 500, 5900)),
    "cifar10-2": ((10000, 50000, 50000), (1000, 5000, 5000)),
}


@pytest.fixture(scope="module")
def py_archive(tmp_path_factory):
  return data_fixtures.write_cifar(str(tmp_path_factory.mktemp("cifar_py")), "py")


def _config(protocol="cifar10", source="archive", root="", seed=0):
  c = config_lib.base_config()
  c.model.img_size = 32
  c.data.update(name="cifar10", protocol=protocol, source=source, root=root, split_seed=seed, num_workers=0)
  return c


def _rows(source) -> np.ndarray:
  """The merged row each record comes from, read back from the generated first pixel."""
  if isinstance(source, cifar10.TfdsSource):
    return source.rows
  return source.images[:, 0, 0, 0].astype(np.int64) + 256 * source.images[:, 0, 0, 1].astype(np.int64)


def _check_protocol(splits, protocol):
  sizes, per_class = EXPECTED[protocol]
  rows = {k: _rows(getattr(splits, k)) for k in ("query", "train", "database")}
  assert tuple(len(rows[k]) for k in ("query", "train", "database")) == sizes
  for k, n in zip(("query", "train", "database"), per_class):
    assert np.all(np.bincount(rows[k] % 10, minlength=10) == n), k
    assert len(np.unique(rows[k])) == len(rows[k]), k
  assert not set(rows["query"]) & set(rows["train"])
  assert not set(rows["query"]) & set(rows["database"])
  train_in_db = set(rows["train"]) <= set(rows["database"])
  assert train_in_db == (protocol != "cifar10")
  if protocol == "cifar10":
    assert len(set(rows["query"]) | set(rows["train"]) | set(rows["database"])) == data_fixtures.CIFAR_N
  if protocol == "cifar10-2":
    assert set(rows["train"]) == set(rows["database"])
  assert splits.num_classes == 10 and splits.top_k == sizes[2]


@pytest.mark.parametrize("protocol", sorted(EXPECTED))
@pytest.mark.slow
def test_protocols_on_python_archive(py_archive, protocol):
  splits = input_pipeline.build_splits(_config(protocol, root=py_archive))
  _check_protocol(splits, protocol)
  rec = splits.train[3]
  row = int(_rows(splits.train)[3])
  assert rec["label"].dtype == np.float32 and np.argmax(rec["label"]) == row % 10 and rec["label"].sum() == 1
  assert rec["index"] == 3
  np.testing.assert_array_equal(rec["image"], data_fixtures.cifar_images()[0][row])


@pytest.mark.slow
def test_binary_archive_reads_as_python_one(py_archive, tmp_path):
  root = data_fixtures.write_cifar(str(tmp_path), "bin")
  images, classes = cifar10.load_archive(root)
  ref_images, ref_classes = data_fixtures.cifar_images()
  assert np.array_equal(images, ref_images) and np.array_equal(classes, ref_classes)
  a = input_pipeline.build_splits(_config("cifar10-1", root=root))
  b = input_pipeline.build_splits(_config("cifar10-1", root=py_archive))
  for k in ("query", "train", "database"):
    np.testing.assert_array_equal(_rows(getattr(a, k)), _rows(getattr(b, k)))


@pytest.mark.slow
def test_python_tar_archive(tmp_path):
  images, classes = cifar10.load_archive(data_fixtures.write_cifar(str(tmp_path), "py", as_tar=True))
  ref_images, ref_classes = data_fixtures.cifar_images()
  assert np.array_equal(images, ref_images) and np.array_equal(classes, ref_classes)


@pytest.mark.slow
def test_seeds_and_saved_split(py_archive, tmp_path):
  a = input_pipeline.build_splits(_config(root=py_archive, seed=1), str(tmp_path / "a"))
  b = input_pipeline.build_splits(_config(root=py_archive, seed=1), str(tmp_path / "b"))
  c = input_pipeline.build_splits(_config(root=py_archive, seed=2))
  np.testing.assert_array_equal(_rows(a.query), _rows(b.query))
  np.testing.assert_array_equal(_rows(a.train), _rows(b.train))
  assert not np.array_equal(_rows(a.train), _rows(c.train))
  # The saved split wins over a fresh draw: edit it and the sources follow.
  path = tmp_path / "a" / splits_lib.SPLITS_FILE
  saved = json.loads(path.read_text())
  np.testing.assert_array_equal(saved["train"], _rows(a.train))
  saved["train"] = saved["train"][::-1]
  path.write_text(json.dumps(saved))
  again = input_pipeline.build_splits(_config(root=py_archive, seed=1), str(tmp_path / "a"))
  np.testing.assert_array_equal(_rows(again.train), _rows(a.train)[::-1])
  with pytest.raises(ValueError, match=r"data\.protocol.*'cifar10'.*'cifar10-2'"):
    input_pipeline.build_splits(_config("cifar10-2", root=py_archive, seed=1), str(tmp_path / "a"))


def test_split_logic_against_labels():
  classes = np.repeat(np.arange(3), [7, 9, 8])
  rows = splits_lib.per_class(classes, 2, 3, seed=5, database="rest")
  for c in range(3):
    assert [np.sum(classes[rows[k]] == c) for k in ("query", "train", "database")] == [2, 3, np.sum(classes == c) - 5]
  assert sorted(np.concatenate(list(rows.values()))) == list(range(len(classes)))
  with pytest.raises(ValueError, match="class 0 has 7 images.*query_per_class=4.*train_per_class=5"):
    splits_lib.per_class(classes, 4, 5, seed=0)


class _PerClassMock:
  """What a mocked `tfds.data_source` split returns: class = merged row % 10, row in the first pixel."""

  def __init__(self, offset, n):
    self.offset, self.n = offset, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    row = self.offset + i
    image = np.zeros((32, 32, 3), np.uint8)
    image[0, 0, :2] = row % 256, row // 256
    return {"image": image, "label": row % 10, "id": f"{row}"}


def _as_data_source(self, split, **kwargs):
  del self, kwargs
  return _PerClassMock(0, 50_000) if split == "train" else _PerClassMock(50_000, 10_000)


@pytest.mark.parametrize("protocol", sorted(EXPECTED))
def test_tfds_source_protocols(tmp_path, protocol):
  with tfds.testing.mock_data(as_data_source_fn=_as_data_source):
    splits = input_pipeline.build_splits(_config(protocol, source="tfds"), str(tmp_path))
    _check_protocol(splits, protocol)
    rec = splits.database[7]
    row = int(splits.database.rows[7])
    assert int(rec["image"][0, 0, 0]) + 256 * int(rec["image"][0, 0, 1]) == row and np.argmax(rec["label"]) == row % 10
    batch = next(iter(input_pipeline.train_loader(_config(protocol, source="tfds"), splits, seed=0,
                                                  local_batch_size=4)))
    assert batch["image"].shape == (4, 32, 32, 3)


@pytest.mark.slow
def test_tfds_default_mock_source(tmp_path):
  """The default TFDS mock (random labels, an ArrayRecord-like source) through the real `tfds.data_source`."""
  with tfds.testing.mock_data(num_examples=30_000):
    splits = input_pipeline.build_splits(_config("cifar10", source="tfds"), str(tmp_path))
    assert (len(splits.query), len(splits.train), len(splits.database)) == (1000, 5000, 54000)
    labels = np.stack([splits.train[i]["label"] for i in range(0, 5000, 50)])
    assert labels.shape == (100, 10) and np.all(labels.sum(1) == 1)


def test_tfds_missing_dataset_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds_data_dir.*ArrayRecord"):
    c = _config(source="tfds")
    c.data.tfds_data_dir = str(tmp_path)
    input_pipeline.build_splits(c)


def test_bad_archive_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.root"):
    input_pipeline.build_splits(_config(root=str(tmp_path)))
  folder = tmp_path / "cifar-10-batches-bin"
  folder.mkdir()
  for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    (folder / name).write_bytes(b"\0" * 3074)
  with pytest.raises(ValueError, match="data_batch_1.bin: 3074 bytes"):
    cifar10.load_archive(str(tmp_path))


def test_unknown_fields_are_named():
  for field, value in (("protocol", "cifar10-3"), ("source", "web"), ("name", "mnist"), ("on_bad_image", "ignore")):
    c = _config()
    c.data[field] = value
    with pytest.raises(ValueError, match=f"config.data.{field}"):
      input_pipeline.build_splits(c)


def test_refuses_code_in_pickles(tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    (folder / name).write_bytes(
        b"cos\nsystem\n(S'echo pwned'\ntR.")  # a pickle that would call os.system
  with pytest.raises(ValueError, match="data_batch_1: not a CIFAR-10 python batch.*refusing to load"):
    cifar10.load_archive(str(tmp_path))
  assert os.path.isdir(folder)
