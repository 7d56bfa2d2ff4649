"""Multi-index hashing's tables in table order, and its answers where the candidates are hardest to keep exact."""

import itertools
import json
import os

import numpy as np
import pytest

from hybridhash_jax import errors
from hybridhash_jax import hamming_index
from hybridhash_jax import hamming_kernels
from hybridhash_jax import index_build
from hybridhash_jax import multi_index


def _assert_like_flat(index, queries, codes, ks=(), radii=()):
  for k in ks:
    np.testing.assert_array_equal(index.knn(queries, k), hamming_kernels.knn(queries, codes, k))
    for q in queries[:2]:  # one query at a time: the serial path
      np.testing.assert_array_equal(index.knn(q[None], k), hamming_kernels.knn(q[None], codes, k))
  for radius in radii:
    for got, want in zip(index.radius_search(queries, radius), hamming_kernels.radius_search(queries, codes, radius)):
      np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("nbytes,tables", [(8, None), (8, 5), (16, 9), (3, 2)])
def test_each_table_holds_its_buckets_codes_in_its_order(nbytes, tables):
  rng = np.random.default_rng(nbytes)
  codes = rng.integers(0, 256, (50, nbytes), dtype=np.uint8)[rng.integers(0, 50, 3000)]  # ties: shared buckets
  index = multi_index.MultiIndex.build(codes, 8 * nbytes, tables)
  words = hamming_kernels.words(codes)
  assert index.table_codes.shape == (index.tables, 3000, words.shape[1]) and index.table_codes.dtype == np.uint64
  for j, (first, length) in enumerate(index.subs):
    ids, off = index.ids[j], index.offsets[j]
    assert sorted(ids.tolist()) == list(range(3000)) and off[0] == 0 and off[1 << length] == 3000
    np.testing.assert_array_equal(index.table_codes[j], words[ids])
    bits = np.unpackbits(codes, axis=1, bitorder="little")[:, first:first + length]
    values = bits.astype(np.int64) @ (1 << np.arange(length))
    for v in np.unique(values):
      np.testing.assert_array_equal(ids[off[v]:off[v + 1]], np.flatnonzero(values == v))  # ids ascending


def test_ties_across_bucket_boundaries_keep_the_least_ids():
  """Every code at distance 2 or 3 from the query, shuffled, with repeats: the k-th place falls inside a tie
  whose members lie in different buckets of every table and are found in no order of their ids."""
  rng = np.random.default_rng(3)
  pairs = [sum(1 << b for b in bs) for r in (2, 3) for bs in itertools.combinations(range(64), r)][:2500]
  values = np.asarray(pairs + pairs[:300], np.uint64)[rng.permutation(2800)]
  codes = values.view(np.uint8).reshape(-1, 8).copy()
  queries = np.concatenate([np.zeros((1, 8), np.uint8), codes[:3]])
  index = multi_index.MultiIndex.build(codes, 64, 4)
  _assert_like_flat(index, queries, codes, ks=(1, 7, 300, 2016, 2100, 2800), radii=(1, 2, 3))


def test_k_beyond_n_and_radius_beyond_bits_return_everything():
  rng = np.random.default_rng(4)
  codes = rng.integers(0, 256, (6, 8), dtype=np.uint8)
  index = multi_index.MultiIndex.build(codes, 64)
  queries = rng.integers(0, 256, (5, 8), dtype=np.uint8)
  _assert_like_flat(index, queries, codes, ks=(6, 50), radii=(0, 64, 100))
  assert index.knn(queries, 50)[1].shape == (5, 6)
  lims, _, _ = index.radius_search(queries, 64)
  assert np.diff(lims).tolist() == [6] * 5


def test_far_queries_and_many_candidates_equal_flat():
  """Clustered codes, queries near a cluster and far from all: candidate buffers that fill, compact and grow."""
  rng = np.random.default_rng(5)
  protos = rng.integers(0, 256, (4, 8), dtype=np.uint8)
  flips = np.packbits(rng.random((6000, 64)) < 0.05, axis=1, bitorder="little")
  codes = protos[rng.integers(0, 4, 6000)] ^ flips
  queries = np.concatenate([protos, ~protos, rng.integers(0, 256, (4, 8), dtype=np.uint8)])
  index = multi_index.MultiIndex.build(codes, 64)
  _assert_like_flat(index, queries, codes, ks=(10, 1000), radii=(4, 20))


def _multihash_index(tmp_path, codes):
  np.save(tmp_path / "codes.npy", codes)
  info = index_build.build_from_codes(str(tmp_path / "codes.npy"), str(tmp_path / "out"), kind="multihash", nhash=5)
  return str(tmp_path / "out"), info


def test_an_index_without_table_codes_rebuilds_its_tables_on_open(tmp_path):
  """Indexes of format 2 have no mih-codes file: open builds the tables in memory, with the index's table count."""
  codes = np.random.default_rng(6).integers(0, 256, (2000, 8), dtype=np.uint8)
  out, info = _multihash_index(tmp_path, codes)
  os.remove(os.path.join(out, info["files"].pop("mih_codes")))
  with open(os.path.join(out, hamming_index.INDEX_JSON), "w", encoding="utf-8") as f:
    json.dump({**info, "format": 2}, f)
  index = hamming_index.HammingIndex.open(out)
  assert not isinstance(index.searcher.table_codes, np.memmap) and index.searcher.tables == 5
  d, i = hamming_kernels.knn(codes[:4], codes, 10)
  assert [[(h.distance, h.id) for h in row] for row in index.search(codes[:4], k=10)] == [
      list(zip(dr, ir)) for dr, ir in zip(d.tolist(), i.tolist())]


def test_table_codes_of_another_index_are_refused(tmp_path):
  codes = np.random.default_rng(7).integers(0, 256, (500, 8), dtype=np.uint8)
  out, info = _multihash_index(tmp_path, codes)
  np.save(os.path.join(out, info["files"]["mih_codes"]), np.zeros((5, 499, 1), np.uint64))
  with pytest.raises(errors.DataError, match=r"mih-codes-.*\.npy: tables of another index \(\(5, 499, 1\), 5 "):
    hamming_index.HammingIndex.open(out)
