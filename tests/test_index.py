"""Search your images: index codes = evaluator codes, search = metrics.top_indices, kills, increments, bad input."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from hybridhash_jax import demo
from hybridhash_jax import encoding
from hybridhash_jax import export
from hybridhash_jax import exported
from hybridhash_jax import hamming_index
from hybridhash_jax import index_build
from hybridhash_jax import index as index_cli
from hybridhash_jax import metrics
from hybridhash_jax.data import images
from tests import data_fixtures
from tests import helpers
from tests.helpers import REPO, cli_env, copy_images

ENV = cli_env(1)


def test_end_to_end_codes_search_self_and_precision(indexed):
  index = hamming_index.HammingIndex.open(indexed["out"])
  order, n = indexed["order"], len(indexed["order"])
  assert len(index) == n == 1547 and indexed["info"]["build"]["encoded"] == n
  # The index's codes are the evaluator's, bit for bit (id i is database row order[i]).
  np.testing.assert_array_equal(index.codes_of(np.arange(n)), hamming_index.pack(indexed["db_codes"][order]))
  # Held-out queries, from their PNG files through the encoder: the evaluator's codes again.
  qfiles = sorted(str(p) for p in (indexed["root"] / "queries").rglob("*.png"))
  enc = indexed["encoder"]
  q = enc.encode(np.stack([enc.preprocess(images.decode(f)) for f in qfiles]))
  np.testing.assert_array_equal(metrics.pack_codes(q), metrics.pack_codes(indexed["q_codes"][indexed["q_order"]]))
  np.testing.assert_allclose(q, indexed["q_codes"][indexed["q_order"]], atol=1e-6)
  # search == metrics.top_indices on the same codes, distances == metrics' popcount distances.
  hits = index.search(q, k=10)
  db_perm = indexed["db_codes"][order]
  top = metrics.top_indices(q, db_perm, 10)
  np.testing.assert_array_equal([[h.id for h in row] for row in hits], top)
  bits_q = (q >= 0)[:, None]
  dist = ((db_perm >= 0)[None] != bits_q).sum(-1)
  assert all(h.distance == dist[i, h.id] for i, row in enumerate(hits) for h in row)
  # Every indexed image finds itself at distance 0.
  some = np.arange(0, n, 97)
  assert all(row[0].distance == 0 for row in index.search(index.codes_of(some), k=1))
  assert all(i in [h.id for h in row] for i, row in zip(some, index.search(index.codes_of(some), radius=0)))
  # Precision@10 by class label == metrics' precision_at_n at 10 on the same codes and order.
  q_label = np.asarray([int(pathlib.Path(f).parent.name) for f in qfiles])
  ours = np.mean([[h.label == str(q_label[i]) for h in row] for i, row in enumerate(hits)])
  m = metrics.retrieval_metrics(indexed["q_codes"][indexed["q_order"]], indexed["db_codes"][order],
                                indexed["q_labels"][indexed["q_order"]], indexed["db_labels"][order], cutoffs=(10,))
  assert ours == pytest.approx(float(m["precision_at_n"]["precision"][0]), abs=1e-12)
  assert 0.0 < ours <= 1.0


def test_cli_search_table_json_grid_and_id(indexed, capsys, tmp_path):
  qfile = sorted((indexed["root"] / "queries").rglob("*.png"))[0]
  grid = tmp_path / "grid.png"
  index_cli.main(["search", f"--index={indexed['out']}", "--query", str(qfile), "--k=5", "--format=json",
                  f"--grid={grid}", f"--workdir={indexed['workdir']}"])
  rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert rows[0]["query"] == str(qfile) and [r["rank"] for r in rows[0]["results"]] == [1, 2, 3, 4, 5]
  assert set(rows[0]["results"][0]) == {"rank", "id", "path", "distance", "label"}
  assert grid.stat().st_size > 0
  index_cli.main(["search", f"--index={indexed['out']}", "--id", "3", "--radius=0"])  # the index's own encoder
  out = capsys.readouterr().out
  assert out.startswith("query 3:") and " 3    0 " in out


@pytest.mark.slow
def test_relative_workdir_is_recorded_absolute_and_reopens(indexed, monkeypatch):
  """An index built from `--workdir=rel` must reopen its encoder from anywhere: the path is made absolute."""
  workdir = pathlib.Path(indexed["workdir"])
  monkeypatch.chdir(workdir.parent)
  encoder = encoding.Encoder.from_workdir(workdir.name)
  assert encoder.info["checkpoint"] == str(workdir / "checkpoints")
  monkeypatch.chdir("/")
  again = encoding.open_encoder(index_info={"checkpoint": encoder.info["checkpoint"], "step": encoder.info["step"]})
  images_ = np.zeros((2, encoder.img_size, encoder.img_size, 3), np.uint8)
  np.testing.assert_array_equal(again.encode(images_), indexed["encoder"].encode(images_))
  # os.path.abspath would have made "/<cwd>/gs:/bucket/..." of a cloud workdir.
  assert encoding._absolute("gs://bucket/w/checkpoints") == "gs://bucket/w/checkpoints"


@pytest.mark.slow
def test_other_kinds_give_true_distances_and_exact_radius(indexed, tmp_path):
  flat = hamming_index.HammingIndex.open(indexed["out"])
  queries = flat.codes_of(np.arange(0, len(flat), 151))
  for kind in ("multihash", "ivf"):
    index_build.build(indexed["encoder"], str(indexed["root"] / "db"), str(tmp_path / kind), kind=kind,
                        progress=False)
    other = hamming_index.HammingIndex.open(str(tmp_path / kind))
    assert other.info["kind"] == kind and len(other) == len(flat)
    np.testing.assert_array_equal(other.codes_of(np.arange(len(flat))), flat.codes_of(np.arange(len(flat))))
    for row in other.search(queries, k=10):
      assert len(row) == 10 and row[0].distance == 0
      assert [(h.distance, h.id) for h in row] == sorted((h.distance, h.id) for h in row)
  multihash = hamming_index.HammingIndex.open(str(tmp_path / "multihash"))
  # Once the tables yield k candidates, the range search up to the k-th distance makes k-NN exact too.
  assert ([[h.id for h in r] for r in multihash.search(queries, k=10)]
          == [[h.id for h in r] for r in flat.search(queries, k=10)])
  for radius in (0, 2, 5):  # multi-index hashing with enough flips is exact within a radius
    assert ([[h.id for h in r] for r in multihash.search(queries, radius=radius)]
            == [[h.id for h in r] for r in flat.search(queries, radius=radius)])


def test_incremental_add_change_delete(indexed, tmp_path):
  src = tmp_path / "imgs"
  copy_images(indexed["root"] / "db", src, sorted((indexed["root"] / "db").rglob("*.png"))[:40])
  out = str(tmp_path / "out")
  first = index_build.build(indexed["encoder"], str(src), out, progress=False)
  before = hamming_index.HammingIndex.open(out)
  old = {before.item(i)["path"]: before.codes_of([i])[0] for i in range(len(before))}
  files = sorted(str(p.relative_to(src)) for p in src.rglob("*.png"))
  deleted, changed = files[0], files[1]
  os.remove(src / deleted)
  data_fixtures.write_image(str(src / changed), np.full((8, 8, 3), 255, np.uint8))
  os.utime(src / changed, ns=(0, 1))  # a different mtime even on coarse clocks
  data_fixtures.write_image(str(src / "new" / "a.png"), np.zeros((8, 8, 3), np.uint8))
  second = index_build.build(indexed["encoder"], str(src), out, progress=False)
  assert first["count"] == 40 and second["count"] == 40 and second["build"]["encoded"] == 2
  after = hamming_index.HammingIndex.open(out)
  paths = [after.item(i)["path"] for i in range(len(after))]
  assert deleted not in paths and os.path.join("new", "a.png") in paths and changed in paths
  enc = indexed["encoder"]
  for i, p in enumerate(paths):
    want = old[p] if p in old and p != changed else hamming_index.pack(enc.encode(enc.preprocess(
        images.decode(str(src / p)))[None]))[0]
    np.testing.assert_array_equal(after.codes_of([i])[0], want, err_msg=p)
  assert after.item(paths.index(os.path.join("new", "a.png")))["label"] == "new"
  assert len(os.listdir(out)) == 3  # index.json and one version of the codes and items; no staging left
  third = index_build.build(indexed["encoder"], str(src), out, progress=False)
  assert third["build"]["encoded"] == 0


def test_unreadable_files_are_skipped_and_listed(indexed, tmp_path, capsys):
  src = tmp_path / "imgs"
  data_fixtures.write_image(str(src / "a" / "good.png"), np.zeros((8, 8, 3), np.uint8))
  (src / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  data_fixtures.write_bomb_png(str(src / "a" / "bomb.png"))
  listing = tmp_path / "list.txt"
  listing.write_text("imgs/a/good.png\nimgs/a/broken.png\nimgs/a/missing.png\n")
  info = index_build.build(indexed["encoder"], str(src), str(tmp_path / "out"), progress=False)
  assert info["count"] == 1 and sorted(os.path.basename(p) for p, _ in info["skipped"]) == ["bomb.png", "broken.png"]
  info = index_build.build(indexed["encoder"], str(listing), str(tmp_path / "out2"), progress=False)
  assert info["count"] == 1
  assert sorted(os.path.basename(p) for p, _ in info["skipped"]) == ["broken.png", "missing.png"]
  assert hamming_index.HammingIndex.open(str(tmp_path / "out2")).item(0)["path"] == os.path.join("imgs", "a",
                                                                                                  "good.png")


_SLOW_ENCODE = """
import time
from hybridhash_jax import encoding
_encode = encoding.Encoder.encode
encoding.Encoder.encode = lambda self, x: (time.sleep(0.3), _encode(self, x))[1]
"""


@pytest.mark.slow
def test_sigkill_during_build_keeps_old_index_and_resumes_exactly(indexed, tmp_path):
  out = tmp_path / "out"
  shutil.copytree(indexed["out"], out)  # the previous index, from other images
  old = hamming_index.HammingIndex.open(str(out))
  src = tmp_path / "imgs"
  copy_images(indexed["root"] / "db", src, sorted((indexed["root"] / "db").rglob("*.png"))[:300])
  slow = tmp_path / "slow"
  slow.mkdir()
  (slow / "sitecustomize.py").write_text(_SLOW_ENCODE)  # makes the build slow enough to kill in the middle
  env = dict(ENV, PYTHONPATH=f"{slow}{os.pathsep}{REPO}")
  cmd = [sys.executable, "-m", "hybridhash_jax.index", "build", f"--workdir={indexed['workdir']}", f"--images={src}",
         f"--index={out}", "--chunk=16"]
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  staging = out / index_build.STAGING
  deadline = time.time() + 300
  while time.time() < deadline and len(list(staging.glob("*.npz"))) < 3:
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  staged = len(list(staging.glob("*.npz")))
  assert 3 <= staged < 300 // 16
  kept = hamming_index.HammingIndex.open(str(out))  # the previous index, intact
  assert kept.info == old.info
  np.testing.assert_array_equal(kept.codes_of(np.arange(len(kept))), old.codes_of(np.arange(len(old))))
  resumed = index_build.build(indexed["encoder"], str(src), str(out), chunk_size=16, progress=False)
  assert resumed["build"]["resumed"] >= 3 * 16 and resumed["build"]["encoded"] == 300 - resumed["build"]["resumed"]
  clean = index_build.build(indexed["encoder"], str(src), str(tmp_path / "clean"), progress=False)
  a, b = hamming_index.HammingIndex.open(str(out)), hamming_index.HammingIndex.open(str(tmp_path / "clean"))
  assert resumed["count"] == clean["count"] == 300
  assert [a.item(i)["path"] for i in range(300)] == [b.item(i)["path"] for i in range(300)]
  np.testing.assert_array_equal(a.codes_of(np.arange(300)), b.codes_of(np.arange(300)))


@pytest.mark.slow
def test_two_processes_build_the_single_process_index(indexed, tmp_path):
  src = tmp_path / "imgs"
  copy_images(indexed["root"] / "db", src, sorted((indexed["root"] / "db").rglob("*.png"))[::10])
  port = demo.free_port()
  cmd = [sys.executable, "-m", "hybridhash_jax.index", "build", f"--workdir={indexed['workdir']}", f"--images={src}",
         f"--index={tmp_path / 'multi'}", "--chunk=16", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2"]
  procs = [subprocess.Popen(cmd + [f"--process_id={i}"], env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n\n".join(outs)
  assert "(process 1)" in outs[1]  # process 1 encoded its share
  assert [helpers.foreign_log_lines(o) for o in outs] == [[], []]  # other libraries stay off the console
  single = index_build.build(indexed["encoder"], str(src), str(tmp_path / "single"), progress=False)
  a = hamming_index.HammingIndex.open(str(tmp_path / "multi"))
  b = hamming_index.HammingIndex.open(str(tmp_path / "single"))
  assert len(a) == len(b) == single["count"] == 155
  np.testing.assert_array_equal(a.codes_of(np.arange(len(a))), b.codes_of(np.arange(len(b))))


_NO_FLAX = """
import sys
for name in ("flax", "optax", "orbax", "orbax.checkpoint", "grain", "tensorflow_datasets", "ml_collections"):
  sys.modules[name] = None  # importing any of them now fails
import numpy as np
from hybridhash_jax import exported
encode, info = exported.load(sys.argv[1])
np.save(sys.argv[3], encode(np.load(sys.argv[2])))
assert not any(m.split(".")[0] in ("flax", "optax", "orbax", "grain") for m in sys.modules if sys.modules[m])
print(info["platforms"])
"""


@pytest.fixture(scope="module")
def exported_encoder(indexed, tmp_path_factory):
  """The shared model exported, and the PNG queries through the checkpoint's encoder: (path, views, codes)."""
  path = str(tmp_path_factory.mktemp("exported") / "encoder.npz")
  info = export.export_encoder(indexed["workdir"], path)
  assert "cpu" in info["platforms"] and "cuda" in info["platforms"]
  enc = indexed["encoder"]
  views = np.stack([enc.preprocess(images.decode(str(p)))
                    for p in sorted((indexed["root"] / "queries").rglob("*.png"))])
  return path, views, enc.encode(views)


def test_exported_encoder_gives_the_codes_and_builds_the_same_index(indexed, exported_encoder, tmp_path):
  path, views, want = exported_encoder
  encode, _ = exported.load(path)
  codes = np.asarray(encode(views))
  np.testing.assert_array_equal(codes >= 0, want >= 0)
  np.testing.assert_allclose(codes, want, rtol=1e-5, atol=1e-5)  # one device against four
  # `--encoder=PATH` builds the same index as the checkpoint.
  small = tmp_path / "imgs"
  copy_images(indexed["root"] / "db", small, sorted((indexed["root"] / "db").rglob("*.png"))[:20])
  index_cli.main(["build", f"--encoder={path}", f"--images={small}", f"--index={tmp_path / 'out'}"])
  a = hamming_index.HammingIndex.open(str(tmp_path / "out"))
  b = hamming_index.HammingIndex.open(indexed["out"])
  ids = [int(np.argmax([b.item(j)["path"] == a.item(i)["path"] for j in range(len(b))])) for i in range(len(a))]
  np.testing.assert_array_equal(a.codes_of(np.arange(len(a))), b.codes_of(ids))
  assert a.info["encoder"] == os.path.abspath(path)


@pytest.mark.slow
def test_exported_encoder_without_flax_gives_the_codes(exported_encoder, tmp_path):
  path, views, want = exported_encoder
  np.save(tmp_path / "views.npy", views)
  script = tmp_path / "run.py"
  script.write_text(_NO_FLAX)
  proc = subprocess.run([sys.executable, str(script), path, str(tmp_path / "views.npy"), str(tmp_path / "codes.npy")],
                        env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  codes = np.load(tmp_path / "codes.npy")
  np.testing.assert_array_equal(codes >= 0, want >= 0)
  np.testing.assert_allclose(codes, want, rtol=1e-5, atol=1e-5)  # one device against four


def test_export_parquet_and_npy_round_trip(indexed, tmp_path, capsys):
  index = hamming_index.HammingIndex.open(indexed["out"])
  n = len(index)
  index_cli.main(["export", f"--index={indexed['out']}", "--format=parquet", f"--output={tmp_path / 'x.parquet'}"])
  index_cli.main(["export", f"--index={indexed['out']}", "--format=npy", f"--output={tmp_path / 'npy'}"])
  assert str(tmp_path / "x.parquet") in capsys.readouterr().out
  table = pq.read_table(tmp_path / "x.parquet")
  assert table.schema.field("code").type.byte_width == index.bits // 8
  codes = np.frombuffer(b"".join(table.column("code").to_pylist()), np.uint8).reshape(n, -1)
  np.testing.assert_array_equal(codes, index.codes_of(np.arange(n)))
  assert table.column("id").to_pylist() == list(range(n))
  assert table.column("path").to_pylist() == [index.item(i)["path"] for i in range(n)]
  # The documented bit order: unpacking little-endian gives the signs of the real codes.
  signs = np.unpackbits(codes, axis=1, bitorder="little").astype(bool)
  np.testing.assert_array_equal(signs, indexed["db_codes"][indexed["order"]] >= 0)
  npy = tmp_path / "npy"
  np.testing.assert_array_equal(np.load(npy / "codes.npy"), codes)
  np.testing.assert_array_equal(np.load(npy / "ids.npy"), np.arange(n))
  assert np.load(npy / "paths.npy").tolist() == table.column("path").to_pylist()
  assert json.loads((npy / "index.json").read_text())["bit_order"] == hamming_index.BIT_ORDER


def _cli_error(argv) -> str:
  with pytest.raises(SystemExit) as e:
    index_cli.main(argv)
  assert isinstance(e.value.code, str) and e.value.code.startswith("error: "), e.value.code
  return e.value.code


def test_bad_inputs_are_named(indexed, tmp_path):
  out = tmp_path / "out"
  shutil.copytree(indexed["out"], out)
  info = json.loads((out / "index.json").read_text())
  (tmp_path / "notes.png").write_text("not an image")
  assert str(tmp_path / "notes.png") in _cli_error(["search", f"--index={out}", "--query", str(tmp_path / "notes.png")])
  assert str(tmp_path / "nope" / "index.json") in _cli_error(["search", f"--index={tmp_path / 'nope'}", "--id", "0"])
  assert "no item 99999" in _cli_error(["search", f"--index={out}", "--id", "99999"])
  # An encoder of another model than the index's is refused, naming the fields.
  other = tmp_path / "other"
  shutil.copytree(out, other)
  changed = dict(info, model=dict(info["model"], embed_dims=[8, 16, 24], token_layout="spatial"))
  (other / "index.json").write_text(json.dumps(changed))
  qfile = sorted((indexed["root"] / "queries").rglob("*.png"))[0]
  msg = _cli_error(["search", f"--index={other}", "--query", str(qfile), f"--workdir={indexed['workdir']}"])
  assert "model.embed_dims: index has [8, 16, 24], encoder has [8, 16, 16]" in msg and "model.token_layout" in msg
  enc = indexed["encoder"]
  wider = encoding.Encoder(lambda x: None, dict(enc.info, bits=32, model=dict(enc.info["model"], bits=32)), 8)
  with pytest.raises(ValueError, match=r"(?s)bits: index has 16, encoder has 32.*model\.bits"):
    hamming_index.HammingIndex.open(indexed["out"]).check_encoder(wider)
  # Corrupt or missing index files, each named.
  items_file = out / info["files"]["items"]
  items_file.write_bytes(b"garbage")
  assert str(items_file) in _cli_error(["search", f"--index={out}", "--id", "0"])
  items_file.unlink()
  assert str(items_file) in _cli_error(["search", f"--index={out}", "--id", "0"])
  (out / "index.json").write_text("{not json")
  assert str(out / "index.json") in _cli_error(["search", f"--index={out}", "--id", "0"])
  codes_file = other / info["files"]["codes"]
  codes_file.write_bytes(b"garbage")
  assert str(codes_file) in _cli_error(["search", f"--index={other}", "--id", "0"])
  assert "--kind='lsh'" in _cli_error(["build", f"--workdir={indexed['workdir']}", f"--images={tmp_path}",
                                       f"--index={tmp_path / 'k'}", "--kind=lsh"])
  assert str(tmp_path / "absent") in _cli_error(["build", f"--workdir={indexed['workdir']}",
                                                  f"--images={tmp_path / 'absent'}", f"--index={tmp_path / 'k'}"])
  assert "not an exported encoder" in _cli_error(["search", f"--index={indexed['out']}", "--query", str(qfile),
                                                  f"--encoder={tmp_path / 'notes.png'}"])


@pytest.mark.slow
def test_cli_error_has_no_traceback(tmp_path):
  (tmp_path / "q.jpg").write_bytes(b"\xff\xd8 truncated")
  proc = subprocess.run([sys.executable, "-m", "hybridhash_jax.index", "search", f"--index={tmp_path}", "--id", "0"],
                        env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'index.json'}: no index there (build one with "
                                                  "python -m hybridhash_jax.index build)")


def test_decode_bytes_shares_decode(tmp_path):
  path = str(tmp_path / "a.png")
  data_fixtures.write_image(path, data_fixtures.pattern_image(0, 5, 7))
  with open(path, "rb") as f:
    np.testing.assert_array_equal(images.decode_bytes(f.read(), "upload.png"), images.decode(path))
  with pytest.raises(images.BadImageError, match=r"^upload\.bin: cannot decode image"):
    images.decode_bytes(b"nope", "upload.bin")


@pytest.mark.slow
def test_stable_order_fixes_faiss_tie_order():
  """faiss returns some of the items tied at the k-th distance in its own order; search returns top_indices'."""
  rng = np.random.default_rng(0)
  real = rng.choice(np.float32([-1, 1]), (20_000, 16))
  real[:, 6:] = 1  # 64 distinct codes: every distance is heavily tied
  codes = hamming_index.pack(real)
  items = {"path": [str(i) for i in range(len(codes))], "label": [None] * len(codes)}
  top = metrics.top_indices(real[:64], real, 500)
  for kind in ("flat", "multihash", "ivf"):
    ours = hamming_index.HammingIndex.in_memory(codes, 16, kind, items, nlist=8)
    if kind == "ivf":
      ours.searcher.nprobe = 8  # every list: exact distances, so only the tie order can differ
      assert (ours.searcher.search(codes[:64], 500)[1] != top).any()  # faiss's own order is not the stable one...
    np.testing.assert_array_equal([[h.id for h in row] for row in ours.search(real[:64], k=500)], top)  # ...ours is
