"""Indexes of packed codes: build --codes, lazy open (memory maps), exact search per kind, item tables, bad input."""

import json
import os

import numpy as np
import pytest

from hybridhash_jax import files
from hybridhash_jax import hamming_index
from hybridhash_jax import hamming_kernels
from hybridhash_jax import index as index_cli
from hybridhash_jax import index_build
from hybridhash_jax import index_io
from hybridhash_jax.hamming_index import pa, pq


@pytest.fixture(scope="module")
def codes_file(tmp_path_factory):
  root = tmp_path_factory.mktemp("codes")
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 256, (30, 8), dtype=np.uint8)[rng.integers(0, 30, 3000)]  # ties everywhere
  np.save(root / "codes.npy", codes)
  pq.write_table(pa.table({"path": [f"img/{i}.jpg" for i in range(3000)], "label": [str(i % 7) for i in range(3000)]}),
                 root / "items.parquet")
  return root, codes


@pytest.mark.parametrize("kind", hamming_index.KINDS)
def test_build_from_codes_opens_mapped_and_searches_exactly(codes_file, tmp_path, kind):
  root, codes = codes_file
  info = index_build.build_from_codes(str(root / "codes.npy"), str(tmp_path), kind=kind,
                                      items=str(root / "items.parquet"))
  assert info["count"] == 3000 and info["bits"] == 64 and info["build"]["codes_per_s"] > 0
  kind_files = {"multihash": {"mih_ids", "mih_offsets", "mih_codes"}, "ivf": {"faiss"}}.get(kind, set())
  assert set(info["files"]) == {"codes", "items"} | kind_files
  index = hamming_index.HammingIndex.open(str(tmp_path))
  assert isinstance(index.codes, np.memmap) and isinstance(index._items, pq.ParquetFile)  # nothing read whole yet
  if kind == "multihash":
    assert isinstance(index.searcher.ids, np.memmap) and isinstance(index.searcher.table_codes, np.memmap)
    assert index.searcher.tables == info["params"]["tables"]
  np.testing.assert_array_equal(index.codes, codes)
  hits = index.search(codes[:5], k=20)
  assert hits[0][0].path == f"img/{hits[0][0].id}.jpg" and hits[0][0].label == str(hits[0][0].id % 7)
  if kind != "ivf":  # exact kinds: the flat kernel's answer, ties included
    d, i = hamming_kernels.knn(codes[:5], codes, 20)
    assert [[(h.distance, h.id) for h in row] for row in hits] == [list(zip(dr, ir)) for dr, ir in zip(d.tolist(),
                                                                                                        i.tolist())]
    lims, d, i = hamming_kernels.radius_search(codes[:5], codes, 3)
    assert [[h.id for h in row] for row in index.search(codes[:5], radius=3)] == [
        i[a:b].tolist() for a, b in zip(lims[:-1], lims[1:])]


def test_codes_alone_have_no_paths_and_export(codes_file, tmp_path):
  root, codes = codes_file
  index_build.build_from_codes(str(root / "codes.npy"), str(tmp_path / "out"))
  index = hamming_index.HammingIndex.open(str(tmp_path / "out"))
  assert index.items is None and index.item(4) == {"id": 4, "path": None, "label": None}
  assert index.search(codes[4:5], k=1)[0][0].path is None
  with pytest.raises(KeyError, match="holds codes, not images"):
    index.item_path(4)
  written = index_io.export(index, str(tmp_path / "x.parquet"), "parquet")
  table = pq.read_table(written[0])
  assert table.column("code")[9].as_py() == codes[9].tobytes() and table.column("path")[9].as_py() is None


def test_cli_build_codes_then_search(codes_file, tmp_path, capsys):
  root, codes = codes_file
  out = str(tmp_path / "out")
  index_cli.main(["build", f"--codes={root / 'codes.npy'}", f"--items={root / 'items.parquet'}", f"--index={out}",
                  "--kind=multihash"])
  assert "3000 codes indexed (multihash, 64 bits)" in capsys.readouterr().out
  index_cli.main(["search", f"--index={out}", "--id", "3", "--k=4", "--format=json"])
  row = json.loads(capsys.readouterr().out)
  d, i = hamming_kernels.knn(codes[3:4], codes, 4)
  assert [r["id"] for r in row["results"]] == i[0].tolist() and row["results"][0]["path"] == f"img/{i[0, 0]}.jpg"


def test_bad_codes_and_items_name_the_file(codes_file, tmp_path):
  root, _ = codes_file
  np.save(tmp_path / "real.npy", np.zeros((4, 64), np.float32))
  with pytest.raises(SystemExit, match=r"error: --codes=.*real\.npy: packed codes are uint8 \(n, bits / 8\); this "
                     r"file holds float32 \(4, 64\)"):
    index_cli.main(["build", f"--codes={tmp_path / 'real.npy'}", f"--index={tmp_path / 'o'}"])
  pq.write_table(pa.table({"path": ["a"]}), tmp_path / "short.parquet")
  with pytest.raises(SystemExit, match=r"error: --items=.*short\.parquet: 1 rows, but the codes file has 3000"):
    index_cli.main(["build", f"--codes={root / 'codes.npy'}", f"--items={tmp_path / 'short.parquet'}",
                    f"--index={tmp_path / 'o'}"])
  with pytest.raises(SystemExit, match=r"error: --codes are indexed as they are"):
    index_cli.main(["build", f"--codes={root / 'codes.npy'}", "--encoder=e.npz", f"--index={tmp_path / 'o'}"])
  assert not os.path.exists(tmp_path / "o" / hamming_index.INDEX_JSON)


def test_write_stream_is_whole_or_nothing(tmp_path):
  target = tmp_path / "a.npy"
  files.write_stream(target, lambda f: np.save(f, np.arange(3)))

  def fails(f):
    f.write(b"half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError):
    files.write_stream(target, fails)
  np.testing.assert_array_equal(np.load(target), np.arange(3))
  assert os.listdir(tmp_path) == ["a.npy"]
