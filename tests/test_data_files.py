"""List files, image folders and digits: labels, decoding, transforms, and every bad input named."""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from hybridhash_jax import config_lib
from hybridhash_jax import input_pipeline
from hybridhash_jax.data import check
from hybridhash_jax.data import images
from tests import data_fixtures


def _config(name, root="", list_dir="", num_classes=5, img=16, **data):
  c = config_lib.base_config()
  c.model.img_size = img
  c.data.update(name=name, root=root, list_dir=list_dir, num_classes=num_classes, num_workers=0, **data)
  return c


@pytest.fixture
def listset(tmp_path):
  rows = data_fixtures.write_listfile(str(tmp_path), {"train": 6, "query": 3, "database": 7}, num_classes=5)
  return str(tmp_path), rows


def test_listfile_labels_shapes_and_eval_transform(listset, tmp_path):
  root, rows = listset
  c = _config("listfile", root, root)
  splits = input_pipeline.build_splits(c, str(tmp_path / "w"))
  assert (len(splits.train), len(splits.query), len(splits.database)) == (6, 3, 7)
  assert splits.num_classes == 5 and splits.top_k == 7
  batches = list(input_pipeline.eval_batches(c, splits.database, local_batch_size=4))
  assert [b["image"].shape for b in batches] == [(4, 16, 16, 3)] * 2
  for b in batches:
    for img, label, index, mask in zip(b["image"], b["label"], b["index"], b["mask"]):
      if not mask:
        continue
      rel, want = rows["database"][index]
      np.testing.assert_array_equal(label, want.astype(np.float32))
      # Hand-computed torchvision geometry for 30x40 at S=16: shorter side 18 (round(16*256/224)),
      # longer int(18*40/30)=24, centre crop offsets round(2/2)=1 and round(8/2)=4.
      ref = np.asarray(Image.open(os.path.join(root, rel)).convert("RGB").resize((24, 18), Image.BILINEAR))
      np.testing.assert_array_equal(img, ref[1:17, 4:20])


def test_listfile_train_crops_come_from_the_resized_image(listset):
  root, rows = listset
  c = _config("listfile", root, root)
  splits = input_pipeline.build_splits(c)
  batch = next(iter(input_pipeline.train_loader(c, splits, seed=3, local_batch_size=6)))
  assert sorted(batch["index"]) == list(range(6)) and batch["label"].dtype == np.float32
  for img, index in zip(batch["image"], batch["index"]):
    rel, want = rows["train"][index]
    np.testing.assert_array_equal(batch["label"][list(batch["index"]).index(index)], want)
    full = np.asarray(Image.open(os.path.join(root, rel)).convert("RGB").resize((24, 18), Image.BILINEAR))
    crops = [full[t:t + 16, l:l + 16] for t in range(3) for l in range(9)]
    assert any(np.array_equal(img, w) or np.array_equal(img, w[:, ::-1]) for w in crops)


def test_normalize_matches_numpy():
  x = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  ref = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  out = np.asarray(input_pipeline.normalize(x))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_folder_split_labels_and_reuse(tmp_path):
  root = str(tmp_path / "imgs")
  data_fixtures.write_folder(root, {"cat": 7, "ant": 6, "dog": 8})
  c = _config("folder", root, num_classes=-1, query_per_class=2, train_per_class=3)
  splits = input_pipeline.build_splits(c, str(tmp_path / "w"))
  assert splits.num_classes == 3  # classes sorted: ant, cat, dog
  # DeepHash's NUS-WIDE protocol: queries held out, training images drawn from the database.
  assert (len(splits.query), len(splits.train), len(splits.database)) == (6, 9, 21 - 6)
  for split in (splits.query, splits.train, splits.database):
    for i in range(len(split)):
      cls = split.files[i].split("/")[0]
      assert np.argmax(split[i]["label"]) == ["ant", "cat", "dog"].index(cls) and split[i]["label"].sum() == 1
  assert not set(splits.query.files) & set(splits.database.files)
  assert set(splits.train.files) <= set(splits.database.files)
  data_fixtures.write_folder(root, {"cat": 9})  # new files do not move a saved split
  again = input_pipeline.build_splits(c, str(tmp_path / "w"))
  assert again.train.files == splits.train.files
  other = input_pipeline.build_splits(c.copy_and_resolve_references(), None)
  c2 = _config("folder", root, num_classes=-1, query_per_class=2, train_per_class=3, split_seed=9)
  assert input_pipeline.build_splits(c2).train.files != other.train.files


def test_folder_trains_on_the_whole_database_and_names_a_small_class(tmp_path):
  root = str(tmp_path / "imgs")
  data_fixtures.write_folder(root, {"cat": 7, "ant": 3})
  splits = input_pipeline.build_splits(_config("folder", root, num_classes=-1, query_per_class=2, train_per_class=-1))
  assert (len(splits.query), len(splits.train)) == (4, 6) and splits.train.files == splits.database.files
  with pytest.raises(ValueError, match=r"class 'ant' has 3 images.*query_per_class=3.*"
                     r"lower config.data.query_per_class to at most 2"):
    input_pipeline.build_splits(_config("folder", root, num_classes=-1, query_per_class=3, train_per_class=-1))
  with pytest.raises(ValueError, match=r"train_per_class=-1.*must be > 0"):
    input_pipeline.build_splits(_config("digits", num_classes=10, query_per_class=3, train_per_class=-1))


def test_digits_split():
  c = _config("digits", num_classes=10, query_per_class=20, train_per_class=100)
  splits = input_pipeline.build_splits(c)
  assert (len(splits.query), len(splits.train), len(splits.database)) == (200, 1000, 1797 - 1200)
  rec = splits.train[0]
  assert rec["image"].shape == (8, 8, 3) and rec["image"].dtype == np.uint8 and rec["image"].max() <= 255
  counts = np.sum([splits.train[i]["label"] for i in range(len(splits.train))], axis=0)
  np.testing.assert_array_equal(counts, [100] * 10)


def test_decode_modes(tmp_path):
  gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
  rgb = data_fixtures.pattern_image(1, 6, 8)
  cases = {
      "l.png": (Image.fromarray(gray), np.repeat(gray[..., None], 3, -1)),
      "la.png": (Image.fromarray(np.stack([gray, gray], -1)), np.repeat(gray[..., None], 3, -1)),
      "rgba.png": (Image.fromarray(np.concatenate([rgb, gray[..., None]], -1)), rgb),
      "p.png": (Image.fromarray(rgb).quantize(16), None),
      "i16.png": (Image.fromarray(gray.astype(np.uint16) * 257), np.repeat(gray[..., None], 3, -1)),
      "cmyk.tif": (Image.fromarray(rgb).convert("CMYK"),
                   np.asarray(Image.fromarray(rgb).convert("CMYK").convert("RGB"))),
  }
  for name, (img, want) in cases.items():
    img.save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == name.split(".")[0].upper().replace("I16", "I;16"), name
    out = images.decode(str(tmp_path / name))
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8, name
    if want is None:
      want = np.asarray(Image.open(tmp_path / name).convert("RGB"))
    np.testing.assert_array_equal(out, want, err_msg=name)


def _bad_files(folder):
  os.makedirs(folder, exist_ok=True)
  good = data_fixtures.pattern_image(0, 30, 40)
  data_fixtures.write_image(os.path.join(folder, "whole.png"), good)
  blob = open(os.path.join(folder, "whole.png"), "rb").read()
  with open(os.path.join(folder, "truncated.png"), "wb") as f:
    f.write(blob[:len(blob) // 2])
  with open(os.path.join(folder, "garbage.jpg"), "wb") as f:
    f.write(b"this is not an image at all" * 10)
  data_fixtures.write_bomb_png(os.path.join(folder, "bomb.png"))
  return ("truncated.png", "garbage.jpg", "bomb.png")


@pytest.mark.parametrize("name", ["truncated.png", "garbage.jpg", "bomb.png", "missing.png"])
def test_bad_image_named_on_read(tmp_path, name):
  _bad_files(str(tmp_path))
  with pytest.raises(images.BadImageError, match=f"{tmp_path / name}: cannot decode image"):
    images.decode(str(tmp_path / name))
  if name == "bomb.png":
    with pytest.raises(images.BadImageError, match="DecompressionBombError"):
      images.decode(str(tmp_path / name))


def _write_list(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in lines))


@pytest.mark.parametrize("lines,message", [
    (["img/train_0.png 1 0 0 0 0", "img/train_1.png 0 1 0 0"], r"train.txt:2: 4 label values, expected .*=5"),
    (["img/train_0.png 1 0 x 0 0"], r"train.txt:1: non-numeric label"),
    (["img/train_0.png 1 0 2 0 0"], r"train.txt:1: label values must be 0 or 1"),
    (["", "   "], r"train.txt: empty list file"),
    (["img/train_0.png 1 0 0 0 0", "", "img/nowhere.png 0 1 0 0 0"], r"train.txt:3: image .*nowhere.png not found"),
])
def test_list_errors_name_file_and_line(listset, lines, message):
  root, _ = listset
  _write_list(os.path.join(root, "train.txt"), lines)
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    input_pipeline.build_splits(_config("listfile", root, root))


def test_missing_list_and_empty_class_folder(listset, tmp_path):
  root, _ = listset
  os.remove(os.path.join(root, "database.txt"))
  with pytest.raises(FileNotFoundError, match="database.txt: list file not found"):
    input_pipeline.build_splits(_config("listfile", root, root))
  folder = str(tmp_path / "f")
  data_fixtures.write_folder(folder, {"a": 4, "b": 4})
  os.makedirs(os.path.join(folder, "empty"))
  with pytest.raises(ValueError, match=f"{folder}/empty: class folder with no images"):
    input_pipeline.build_splits(_config("folder", folder, num_classes=-1, query_per_class=1, train_per_class=1))


@pytest.mark.slow
def test_bad_image_errors_at_first_read_in_a_worker(listset):
  root, rows = listset
  with open(os.path.join(root, rows["train"][2][0]), "wb") as f:
    f.write(b"corrupt")
  c = _config("listfile", root, root, check_images=False)  # no check before training: found when read
  splits = input_pipeline.build_splits(c)
  it = iter(input_pipeline.train_loader(c, splits, seed=0, local_batch_size=6, worker_count=1))
  with pytest.raises(Exception, match=r"train_2.png: cannot decode image"):
    next(it)


@pytest.mark.parametrize("check_images", [True, False])
def test_skip_mode_drops_logs_and_masks(listset, tmp_path, check_images):
  root, rows = listset
  bad = [rows["train"][1][0], rows["train"][4][0], rows["database"][5][0]]
  for rel in bad[:2]:
    with open(os.path.join(root, rel), "wb") as f:
      f.write(b"corrupt")
  os.remove(os.path.join(root, bad[2]))
  workdir = str(tmp_path / "w")
  c = _config("listfile", root, root, on_bad_image="skip", check_images=check_images)
  splits = input_pipeline.build_splits(c, workdir)
  it = iter(input_pipeline.train_loader(c, splits, seed=0, local_batch_size=4))
  seen = np.concatenate([next(it)["index"] for _ in range(4)])  # 16 images = 4 epochs of the 4 good ones
  np.testing.assert_array_equal(np.bincount(seen, minlength=6), [4, 0, 4, 4, 0, 4])
  masks = {int(i): bool(m) for b in input_pipeline.eval_batches(c, splits.database, local_batch_size=4)
           for i, m in zip(b["index"], b["mask"])}
  assert masks == {i: i not in (5, 7) for i in range(8)}  # row 5 skipped, row 7 padding
  assert sorted(images.skipped_files(workdir)) == sorted(os.path.join(root, r) for r in bad)


def _corrupt(root, rel):
  with open(os.path.join(root, rel), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n truncated")


def test_check_names_a_bad_database_image_before_training(listset):
  root, rows = listset
  _corrupt(root, rows["database"][5][0])
  _corrupt(root, rows["query"][0][0])
  with pytest.raises(images.BadImageError) as e:
    input_pipeline.build_splits(_config("listfile", root, root))
  assert str(e.value).startswith(os.path.join(root, rows["query"][0][0]) + ": cannot decode image")
  assert "1 more bad images" in str(e.value) and "config.data.on_bad_image=skip" in str(e.value)
  input_pipeline.build_splits(_config("listfile", root, root, check_images=False))  # the switch turns it off


def test_check_decodes_in_parallel_with_a_progress_bar(listset, monkeypatch, capsys):
  root, rows = listset
  threads, real = set(), images.decode

  def slow_decode(path):
    threads.add(threading.get_ident())
    time.sleep(0.02)
    return real(path)

  monkeypatch.setattr(images, "decode", slow_decode)
  splits = input_pipeline.build_splits(_config("listfile", root, root))
  assert len(threads) > 1
  err = capsys.readouterr().err
  assert "checking images" in err and "16/16" in err  # train 6, query 3, database 7 files
  assert check.valid_rows(splits.database).all()


def test_check_skips_bad_images_up_front(listset, tmp_path, monkeypatch):
  root, rows = listset
  bad = os.path.join(root, rows["database"][2][0])
  _corrupt(root, rows["database"][2][0])
  workdir = str(tmp_path / "w")
  splits = input_pipeline.build_splits(_config("listfile", root, root, on_bad_image="skip"), workdir)
  np.testing.assert_array_equal(check.valid_rows(splits.database), np.arange(7) != 2)
  assert check.valid_rows(splits.train).all() and images.skipped_files(workdir) == [bad]
  decoded = []
  monkeypatch.setattr(images, "decode", lambda p: decoded.append(p))
  assert splits.database[2]["image"] is None and decoded == []  # marked bad: never read again
  splits.database[3]
  assert decoded == [os.path.join(root, rows["database"][3][0])]


@pytest.mark.slow
def test_bad_image_ends_main_with_one_error_line_before_training(tmp_path):
  root = str(tmp_path / "images")
  data_fixtures.write_folder(root, {"a": 4, "b": 4})
  _corrupt(root, "b/003.png")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "hybridhash_jax.main", "--config=tests/configs/tiny_train.py",
       f"--workdir={tmp_path / 'w'}", "--config.data.name=folder", f"--config.data.root={root}",
       "--config.data.num_classes=-1", "--config.data.query_per_class=1", "--config.data.train_per_class=2",
       "--config.batch_size=4"],
      cwd=repo, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  error = proc.stderr[proc.stderr.index("\nerror: "):].strip()
  assert error.startswith(f"error: {root}/b/003.png: cannot decode image"), error
  assert not (tmp_path / "w" / "checkpoints").exists()  # stopped before the first step
