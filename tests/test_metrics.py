"""The ranking metrics against a straightforward NumPy reading of the definitions, hand cases, and brute force."""

import itertools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from hybridhash_jax import metrics


def _reference(q_codes, db_codes, q_labels, db_labels, top_k, cutoffs):
  """Per-query stable argsort, exactly as the definition reads."""
  bits = q_codes.shape[1]
  k = len(db_codes) if top_k in (None, -1) else min(top_k, len(db_codes))
  out = dict(ap=[], pn=[], hist=[], rel_hist=[], precision=[], recall=[])
  for i in range(len(q_codes)):
    d = ((q_codes[i] >= 0) != (db_codes >= 0)).sum(1)
    rel = (q_labels[i] @ db_labels.T) > 0
    ranked = rel[np.argsort(d, kind="stable")]
    pos = np.flatnonzero(ranked[:k]) + 1
    out["ap"].append(np.mean(np.arange(1, len(pos) + 1) / pos) if len(pos) else 0.0)
    out["pn"].append([ranked[:n].sum() / n for n in cutoffs])
    out["hist"].append(np.bincount(d, minlength=bits + 1))
    out["rel_hist"].append(np.bincount(d[rel], minlength=bits + 1))
    within = d[None] <= np.arange(bits + 1)[:, None]
    hits = (within & rel).sum(1)
    out["precision"].append(np.where(within.sum(1) > 0, hits / np.maximum(within.sum(1), 1), 0.0))
    out["recall"].append(hits / rel.sum() if rel.sum() else np.zeros(bits + 1))
  return {key: np.asarray(v, np.float64) for key, v in out.items()}


def _data(seed, nq, ndb, bits, classes, multi_label):
  """Few bits and clustered codes: many ties. Query 0 has no label, so nothing is relevant to it."""
  rng = np.random.default_rng(seed)
  protos = rng.normal(size=(classes, bits))
  yq, ydb = rng.integers(0, classes, nq), rng.integers(0, classes, ndb)
  q = protos[yq] + rng.normal(size=(nq, bits))
  db = protos[ydb] + rng.normal(size=(ndb, bits))
  if multi_label:
    ql, dbl = rng.random((nq, classes)) < 0.25, rng.random((ndb, classes)) < 0.25
  else:
    ql, dbl = np.eye(classes)[yq], np.eye(classes)[ydb]
  ql = np.asarray(ql, np.float32)
  ql[0] = 0
  return q.astype(np.float32), db.astype(np.float32), ql, np.asarray(dbl, np.float32)


CASES = [  # seed, queries, database, bits, classes, multi-label, top_k, chunk
    (0, 7, 300, 8, 4, False, None, 3),
    (1, 13, 1000, 12, 5, True, 50, 4),
    (2, 5, 70, 16, 3, True, -1, 2),
    (3, 9, 500, 10, 6, False, 77, 5),
    (7, 6, 20, 6, 2, False, 5, 6),  # database smaller than one scan block
    (8, 5, 64, 4, 3, True, None, 5),  # database exactly two blocks
    (9, 6, 300, 40, 4, True, 25, 4),  # two code words
    (10, 5, 200, 64, 3, False, None, 5),
]
FAST_CASE = CASES[6]  # two code words, a cutoff, multi-label: the fast tier's one compile of the sort kernel


def _case_params(cases, kernels=metrics.KERNELS):
  """(case..., kernel) params; each sort-kernel case but `FAST_CASE` compiles anew, so only the slow tier runs it."""
  return [pytest.param(*c, k, marks=pytest.mark.slow if k == "sort" and c != FAST_CASE else ())
          for c in cases for k in kernels]


@pytest.mark.parametrize("seed,nq,ndb,bits,classes,multi,top_k,chunk,kernel", _case_params(CASES))
@pytest.mark.parametrize("long_cutoff", [True, False])  # with it, every item can count; without, ranks stop at K
def test_matches_numpy_reference(seed, nq, ndb, bits, classes, multi, top_k, chunk, kernel, long_cutoff):
  q, db, ql, dbl = _data(seed, nq, ndb, bits, classes, multi)
  cutoffs = (1, 3, 10, 64, ndb + 5) if long_cutoff else (1, 3)
  ref = _reference(q, db, ql, dbl, top_k, cutoffs)
  got = jax.device_get(metrics.ranking_counts(q, db, ql, dbl, top_k, cutoffs=cutoffs, chunk_size=chunk,
                                              kernel=kernel))
  np.testing.assert_allclose(got["ap"], ref["ap"], atol=1e-6)
  assert got["ap"][0] == 0  # the query without labels
  np.testing.assert_array_equal(got["hist"], ref["hist"])
  np.testing.assert_array_equal(got["rel_hist"], ref["rel_hist"])
  np.testing.assert_allclose(got["hits_at_cutoffs"] / np.asarray(cutoffs), ref["pn"], atol=1e-12)
  m = metrics.retrieval_metrics(q, db, ql, dbl, top_k, cutoffs=cutoffs, chunk_size=chunk, kernel=kernel)
  assert isinstance(m["map"], float) and isinstance(m["precision_at_radius_2"], float)
  assert abs(m["map"] - ref["ap"].mean()) < 1e-6
  np.testing.assert_allclose(m["precision_at_n"]["precision"], ref["pn"].mean(0), atol=1e-12)
  np.testing.assert_allclose(m["pr_curve"]["precision"], ref["precision"].mean(0), atol=1e-12)
  np.testing.assert_allclose(m["pr_curve"]["recall"], ref["recall"].mean(0), atol=1e-12)
  assert m["precision_at_radius_2"] == pytest.approx(ref["precision"][:, 2].mean(), abs=1e-12)


@pytest.mark.parametrize("kernel", metrics.KERNELS)
def test_ranks_past_the_limits_are_counted_exactly(kernel):
  # top_k and cutoffs far below the database size, 6 bits: the 10th item's distance bucket holds far
  # more items than 10, and those ranked past it must count as outside the top K.
  q, db, ql, dbl = _data(11, 9, 700, 6, 3, True)
  ref = _reference(q, db, ql, dbl, 7, (1, 3, 10))
  got = jax.device_get(metrics.ranking_counts(q, db, ql, dbl, 7, cutoffs=(1, 3, 10), chunk_size=4, kernel=kernel))
  np.testing.assert_allclose(got["ap"], ref["ap"], atol=1e-6)
  np.testing.assert_allclose(got["hits_at_cutoffs"] / np.array([1, 3, 10]), ref["pn"], atol=1e-12)
  np.testing.assert_array_equal(got["hist"], ref["hist"])


@pytest.mark.parametrize("workers,width", [(1, 8), (3, 8), (1, 3)])
def test_host_kernel_splits_queries_and_tiles_exactly(monkeypatch, workers, width):
  # 40 queries over 1,300 items (two whole tiles and a part): one worker takes chunks of 10 queries,
  # which walk the database 8 and then 2 at a time (or 3, 3, 3, 1 when the records' budget allows
  # only 3); three workers take chunks of 3 or 4.
  from hybridhash_jax import host_ranking
  monkeypatch.setattr(host_ranking, "threads", lambda: workers)
  monkeypatch.setattr(host_ranking, "_RECORD_BYTES", 12 * 1300 * width)
  q, db, ql, dbl = _data(12, 40, 1300, 16, 5, True)
  for top_k in (None, 30):
    ref = _reference(q, db, ql, dbl, top_k, (7, 20))
    got = jax.device_get(metrics.ranking_counts(q, db, ql, dbl, top_k, cutoffs=(7, 20), kernel="host"))
    np.testing.assert_allclose(got["ap"], ref["ap"], atol=1e-6)
    np.testing.assert_array_equal(got["hist"], ref["hist"])
    np.testing.assert_array_equal(got["rel_hist"], ref["rel_hist"])
    np.testing.assert_allclose(got["hits_at_cutoffs"] / np.array([7, 20]), ref["pn"], atol=1e-12)


def test_packed_codes_and_class_ids_give_the_same_counts():
  q, db, ql, dbl = _data(4, 6, 400, 12, 4, False)
  plain = jax.device_get(metrics.ranking_counts(q, db, ql, dbl, 40, chunk_size=4))
  packed = jax.device_get(metrics.ranking_counts(metrics.pack_codes(q), metrics.pack_codes(db), ql.argmax(1),
                                                 dbl.argmax(1), 40, chunk_size=4, num_bits=12))
  # Class ids make query 0 relevant to its argmax class, so compare the labelled queries only.
  np.testing.assert_array_equal(packed["hist"], plain["hist"])
  np.testing.assert_allclose(packed["ap"][1:], plain["ap"][1:], atol=1e-7)


@pytest.mark.parametrize("kernel", metrics.KERNELS)
# 40: the last shards are all padding
@pytest.mark.parametrize("devices,ndb", [pytest.param(2, 777, marks=pytest.mark.slow), (4, 777), (4, 40)])
def test_sharded_database_matches_reference(devices, ndb, kernel):
  q, db, ql, dbl = _data(5, 11, ndb, 10, 5, True)
  mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
  ref = _reference(q, db, ql, dbl, 100, (5, 50))
  got = jax.device_get(metrics.ranking_counts(q, db, ql, dbl, 100, cutoffs=(5, 50), chunk_size=4, mesh=mesh,
                                              kernel=kernel))
  np.testing.assert_allclose(got["ap"], ref["ap"], atol=1e-6)
  np.testing.assert_array_equal(got["hist"], ref["hist"])
  np.testing.assert_allclose(got["hits_at_cutoffs"] / np.array([5, 50]), ref["pn"], atol=1e-12)


# One query (+1,+1,+1,+1). Database distances [1, 0, 1, 2, 0], relevant [yes, no, yes, no, yes].
HAND_Q = np.ones((1, 4), np.float32)
HAND_DB = np.array([[-1, 1, 1, 1], [1, 1, 1, 1], [1, -1, 1, 1], [-1, -1, 1, 1], [1, 1, 1, 1]], np.float32)
HAND_QL = np.array([[1, 0]], np.float32)
HAND_DBL = np.array([[1, 0], [0, 1], [1, 1], [0, 1], [1, 0]], np.float32)  # item 2 shares label 0


def test_hand_computed_stable_ap():
  # Stable order (distance, index): 1, 4, 0, 2, 3 -> relevant at ranks 2, 3, 4.
  # AP = (1/2 + 2/3 + 3/4) / 3 = 23/36; AP@3 = (1/2 + 2/3) / 2 = 7/12.
  assert float(metrics.mean_average_precision(HAND_Q, HAND_DB, HAND_QL, HAND_DBL)) == pytest.approx(23 / 36, abs=1e-7)
  assert float(metrics.mean_average_precision(HAND_Q, HAND_DB, HAND_QL, HAND_DBL, 3)) == pytest.approx(7 / 12, abs=1e-7)
  np.testing.assert_array_equal(metrics.top_indices(HAND_Q, HAND_DB, 4), [[1, 4, 0, 2]])


@pytest.mark.parametrize("kernel", metrics.KERNELS)
def test_one_tie_group_across_blocks_ranks_by_index(kernel):
  # Identical codes: every item ties, so rank = index + 1 across all scan blocks. Items 2, 5, 8, ... are
  # relevant: the k-th of them sits at rank 3k, so every precision is k / 3k and AP = 1/3 exactly;
  # with K = 100 the relevant ones within it are the first 33.
  n = 130
  db = np.ones((n, 8), np.float32)
  dbl = np.zeros((n, 2), np.float32)
  dbl[2::3, 0], dbl[np.arange(n) % 3 != 2, 1] = 1, 1
  got = jax.device_get(metrics.ranking_counts(np.ones((1, 8), np.float32), db, np.array([[1, 0]], np.float32), dbl,
                                              100, cutoffs=(3, 4, 130), kernel=kernel))
  assert got["ap"][0] == pytest.approx(1 / 3, abs=1e-7)
  assert got["hits_in_top_k"][0] == 33
  np.testing.assert_array_equal(got["hits_at_cutoffs"][0], [1, 1, 43])


@pytest.mark.parametrize("seed,nq,ndb,bits,classes,multi,top_k,chunk",
                         [c if c == FAST_CASE else pytest.param(*c, marks=pytest.mark.slow) for c in CASES])
def test_sort_kernel_equals_host_kernel(seed, nq, ndb, bits, classes, multi, top_k, chunk):
  # Every count is equal; the APs differ at most by float32 summation order.
  q, db, ql, dbl = _data(seed, nq, ndb, bits, classes, multi)
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  scan, srt = (jax.device_get(metrics.ranking_counts(q, db, ql, dbl, top_k, cutoffs=(2, 30), chunk_size=chunk,
                                                     mesh=mesh, kernel=k)) for k in metrics.KERNELS)
  for key in ("hits_in_top_k", "hits_at_cutoffs", "hist", "rel_hist"):
    np.testing.assert_array_equal(srt[key], scan[key], err_msg=key)
  np.testing.assert_allclose(srt["ap"], scan["ap"], rtol=1e-6)


def test_kernel_follows_the_backend():
  assert metrics.default_kernel() == "host"  # the tests run on CPU
  with pytest.raises(ValueError, match="kernel must be one of"):
    metrics.ranking_counts(HAND_Q, HAND_DB, HAND_QL, HAND_DBL, kernel="argsort")


def test_hand_computed_tie_aware_ap():
  # Distance 0 holds {no, yes}: the relevant one is at rank 1 or 2, expected precision (1 + 1/2) / 2 = 3/4.
  # Distance 1 holds two relevant items at ranks 3, 4 with 2 and 3 relevant so far: 2/3 + 3/4 = 17/12.
  # AP = (3/4 + 17/12) / 3 = 13/18 (the stable ranking gives 23/36).
  # AP@3: the distance-1 group contributes its first item, relevant, at rank 3 with 2 relevant so far;
  # over the two orders of distance 0: ((1/2 + 2/3) / 2 + (1 + 2/3) / 2) / 2 = 17/24.
  m = jax.device_get(metrics.ranking_counts(HAND_Q, HAND_DB, HAND_QL, HAND_DBL))
  assert metrics.tie_aware_average_precision(m["hist"], m["rel_hist"], 5)[0] == pytest.approx(13 / 18, abs=1e-12)
  assert metrics.tie_aware_average_precision(m["hist"], m["rel_hist"], 3)[0] == pytest.approx(17 / 24, abs=1e-12)
  full = metrics.retrieval_metrics(HAND_Q, HAND_DB, HAND_QL, HAND_DBL)
  assert full["map_tie_aware"] == pytest.approx(13 / 18, abs=1e-12)
  assert full["map"] == pytest.approx(23 / 36, abs=1e-7)


def _brute_force_tie_aware(d, rel, k):
  """Mean AP@k over every order that sorts by distance and permutes each tie group."""
  groups = [np.flatnonzero(d == v) for v in np.unique(d)]
  aps = []
  for perms in itertools.product(*[itertools.permutations(g) for g in groups]):
    ranked = rel[np.concatenate(perms)][:k]
    pos = np.flatnonzero(ranked) + 1
    aps.append(np.mean(np.arange(1, len(pos) + 1) / pos) if len(pos) else 0.0)
  return np.mean(aps)


@pytest.mark.parametrize("seed", range(4))
def test_tie_aware_equals_brute_force_over_tie_orders(seed):
  rng = np.random.default_rng(seed)
  q = rng.choice([-1.0, 1.0], (3, 3)).astype(np.float32)
  db = rng.choice([-1.0, 1.0], (7, 3)).astype(np.float32)
  ql, dbl = np.eye(2)[rng.integers(0, 2, 3)], np.eye(2)[rng.integers(0, 2, 7)]
  counts = jax.device_get(metrics.ranking_counts(q, db, ql, dbl))
  for k in range(1, 8):
    got = metrics.tie_aware_average_precision(counts["hist"], counts["rel_hist"], k)
    for i in range(3):
      d = ((q[i] >= 0) != (db >= 0)).sum(1)
      assert got[i] == pytest.approx(_brute_force_tie_aware(d, dbl @ ql[i] > 0, k), abs=1e-12), (i, k)


def test_pack_codes_sign_zero_is_plus_one():
  words = metrics.pack_codes(np.array([[0.0, -0.5, 2.0] + [-1.0] * 30 + [0.0]]))
  assert words.dtype == np.uint32 and words.shape == (1, 2)
  assert words[0, 0] == 0b101 and words[0, 1] == 0b10  # bits 0, 2 and 33 are set


def test_bad_inputs_name_the_culprit():
  q, db, ql, dbl = _data(6, 3, 20, 8, 2, False)
  with pytest.raises(ValueError, match="num_bits"):
    metrics.ranking_counts(metrics.pack_codes(q), metrics.pack_codes(db), ql, dbl)
  with pytest.raises(ValueError, match="bits"):
    metrics.ranking_counts(q, db[:, :6], ql, dbl)
  with pytest.raises(ValueError, match="labels do not match"):
    metrics.ranking_counts(q, db, ql[:2], dbl)
  with pytest.raises(ValueError, match="top_k"):
    metrics.ranking_counts(q, db, ql, dbl, 0)
