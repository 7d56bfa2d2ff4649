"""Multi-index hashing gives the flat kernels' answers on every query, ties included, for any number of tables."""

import numpy as np
import pytest

from hybridhash_jax import hamming_kernels
from hybridhash_jax import multi_index


def _codes(rng, n, nbytes, distinct=None):
  if distinct:  # a few distinct codes: every distance is heavily tied
    return rng.integers(0, 256, (distinct, nbytes), dtype=np.uint8)[rng.integers(0, distinct, n)]
  return rng.integers(0, 256, (n, nbytes), dtype=np.uint8)


@pytest.mark.parametrize("n,nbytes,distinct,tables", [(4000, 8, 40, None), (4000, 8, None, None), (3000, 8, None, 5),
                                                      (2000, 3, 20, 2), (300, 2, None, 1), (500, 16, None, None)])
def test_knn_and_radius_equal_flat(n, nbytes, distinct, tables):
  rng = np.random.default_rng(n + nbytes)
  codes = _codes(rng, n, nbytes, distinct)
  queries = np.concatenate([codes[:8], _codes(rng, 8, nbytes)])
  index = multi_index.MultiIndex.build(codes, 8 * nbytes, tables)
  for k in (1, 10, 300, n + 1):
    for rows in (queries, queries[:1]):  # a batch (parallel) and one query (serial)
      np.testing.assert_array_equal(index.knn(rows, k), hamming_kernels.knn(rows, codes, k))
  for radius in (0, 2, 9):
    for got, want in zip(index.radius_search(queries, radius), hamming_kernels.radius_search(queries, codes, radius)):
      np.testing.assert_array_equal(got, want)


def test_tables_follow_bits_and_n():
  """m = ceil(bits / log2 n): substrings of at most log2 n bits, so a table has at most about n buckets."""
  assert [multi_index.num_tables(64, n) for n in (10**5, 10**6, 10**7, 10**8, 10**9)] == [4, 4, 3, 3, 3]
  assert multi_index.num_tables(128, 10**6) == 7 and multi_index.num_tables(16, 10) == 5
  subs = multi_index.substrings(64, 3)
  assert subs.tolist() == [[0, 22], [22, 21], [43, 21]]
  index = multi_index.MultiIndex.build(_codes(np.random.default_rng(0), 1000, 8), 64)
  assert index.tables == 7 and index.offsets.shape == (7, 2**10 + 1)


def test_table_values_hold_the_ids_of_their_substrings():
  codes = _codes(np.random.default_rng(1), 500, 4)
  index = multi_index.MultiIndex.build(codes, 32, 4)
  value = codes[:, 1]  # substring 1: bits 8..15, byte 1
  for v in (0, 77, 255):
    np.testing.assert_array_equal(index.ids[1, index.offsets[1, v]:index.offsets[1, v + 1]], np.flatnonzero(value == v))


def test_too_few_tables_is_refused():
  with pytest.raises(ValueError, match=r"--nhash=1: 1000 codes of 64 bits need 1 to 64 tables"):
    multi_index.MultiIndex.build(np.zeros((1000, 8), np.uint8), 64, 1)
