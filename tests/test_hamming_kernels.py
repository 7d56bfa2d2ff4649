"""The compiled flat kernels give a NumPy scan's stable order, ties included, and are metrics.top_indices."""

import numpy as np
import pytest

from hybridhash_jax import hamming_kernels
from hybridhash_jax import metrics


def _scan(queries, codes):
  """The NumPy reference: every distance, then a stable sort (distance, then id)."""
  d = np.bitwise_count(queries[:, None] ^ codes[None]).sum(-1)
  return d, np.argsort(d, axis=1, kind="stable")


def _tied(rng, n, nbytes, distinct):
  """Codes drawn from a few distinct ones: every distance is heavily tied."""
  pool = rng.integers(0, 256, (distinct, nbytes), dtype=np.uint8)
  return pool[rng.integers(0, distinct, n)]


@pytest.mark.parametrize("n,nbytes,nq", [(3000, 8, 40), (20_000, 8, 1), (20_000, 16, 3), (700, 3, 9), (50, 2, 5)])
def test_knn_is_the_stable_order(n, nbytes, nq):
  """Batched (query groups) and few queries (database parts, n > 2 * _MIN_PART), 1, 2 and padded words."""
  rng = np.random.default_rng(n + nbytes)
  codes = _tied(rng, n, nbytes, 40)
  queries = np.concatenate([codes[:nq - nq // 2], rng.integers(0, 256, (nq // 2, nbytes), dtype=np.uint8)])
  d, order = _scan(queries, codes)
  for k in (1, 10, 257, n + 5):
    dist, ids = hamming_kernels.knn(queries, codes, k)
    want = order[:, :min(k, n)]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(dist, np.take_along_axis(d, want, 1))


def test_metrics_top_indices_is_the_kernel_on_real_codes():
  """Evaluation's top_indices packs real codes (uint32 words) and runs the kernel: the stable order of real codes."""
  rng = np.random.default_rng(1)
  real = rng.choice(np.float32([-1, 1]), (5000, 24))
  real[:, 5:] = 1  # 32 distinct codes
  d = (real[:30, None] != real[None]).sum(-1)
  np.testing.assert_array_equal(metrics.top_indices(real[:30], real, 300), np.argsort(d, 1, kind="stable")[:, :300])
  words = metrics.pack_codes(real)
  np.testing.assert_array_equal(metrics.top_indices(words[:30], words, 300, num_bits=24),
                                np.argsort(d, 1, kind="stable")[:, :300])


def test_all_codes_equal_keeps_the_first_ids():
  """Every item ties with every other: the candidate buffer fills and is compacted again and again."""
  codes = np.full((10_000, 8), 7, np.uint8)
  dist, ids = hamming_kernels.knn(codes[:2], codes, 100)
  np.testing.assert_array_equal(ids, np.tile(np.arange(100), (2, 1)))
  assert not dist.any()


@pytest.mark.parametrize("n,nq", [(3000, 25), (20_000, 1)])
def test_radius_is_every_hit_in_the_stable_order(n, nq):
  rng = np.random.default_rng(n)
  codes = _tied(rng, n, 8, 300)
  queries = codes[:nq]
  d, _ = _scan(queries, codes)
  for radius in (0, 20, 64):
    lims, dist, ids = hamming_kernels.radius_search(queries, codes, radius)
    for q in range(nq):
      want = np.flatnonzero(d[q] <= radius)
      want = want[np.argsort(d[q][want], kind="stable")]
      np.testing.assert_array_equal(ids[lims[q]:lims[q + 1]], want)
      np.testing.assert_array_equal(dist[lims[q]:lims[q + 1]], d[q][want])


@pytest.mark.slow
def test_memory_mapped_codes_are_searched_in_place(tmp_path):
  codes = np.random.default_rng(2).integers(0, 256, (1000, 8), dtype=np.uint8)
  np.save(tmp_path / "codes.npy", codes)
  mapped = np.load(tmp_path / "codes.npy", mmap_mode="r")
  assert np.shares_memory(hamming_kernels.words(mapped), mapped)
  np.testing.assert_array_equal(hamming_kernels.knn(codes[:4], mapped, 10)[1], _scan(codes[:4], codes)[1][:, :10])


def test_empty_inputs():
  codes = np.zeros((0, 8), np.uint8)
  assert hamming_kernels.knn(np.zeros((2, 8), np.uint8), codes, 5)[1].shape == (2, 0)
  lims, _, ids = hamming_kernels.radius_search(np.zeros((2, 8), np.uint8), codes, 3)
  assert lims.tolist() == [0, 0, 0] and len(ids) == 0
