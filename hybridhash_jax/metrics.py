"""Hamming-ranking retrieval metrics (docs/evaluation.md): exact, tie-stable and sort-free.

Ranking. The database is ranked by Hamming distance, ties broken by database index (a stable
order), so the result does not depend on a sort's tie order. `top_k` None or -1 means the whole
database (not the reference's drop-the-last-item quirk). Relevant means sharing at least one label.
AP is the mean, over the relevant items ranked within the top K, of (relevant items up to and
including it) / (its rank); a query with none scores 0; mAP = sum(AP) / number of queries.

Codes. Real codes are binarised by sign with sign(0) -> +1 (bit set when code >= 0); `pack_codes`
stores them as uint32 words, and distance is a popcount of XORed words. Already-packed uint32
codes are accepted with `num_bits`.

Why no sort. A comparison sort of a 1,000 x 54,000 distance matrix takes seconds on a CPU, but
distances take only bits + 1 values, so a stable rank is a count:
  rank_j = #{i: d_i < d_j} + #{i <= j: d_i = d_j}.
On CPU (`kernel="host"`, the default there) `host_ranking` counts it in one compiled pass per query
over the database in index order, on every core; the mesh is not used.

Accelerators. On a GPU or TPU, `kernel="sort"` (the default off CPU, see `default_kernel`) ranks a query
chunk in a few wide kernels: a uint8 distance matrix, per-distance counts, and one stable sort per
query (see `_sorted_chunk_counts`). With a `Mesh`, the database is split over `axis_name`
(contiguous index ranges); each device counts its shard, the per-device histograms are all-gathered
to give every shard its offset (items of earlier shards at each distance), and the per-query sums are
psum-ed. Both kernels give the same counts; tests force the sort kernel on CPU.

Histogram-derived metrics (tie-aware mAP, PR curve by radius, precision within radius 2) are
computed on the host in float64 from the per-query distance histograms: the harmonic-number
differences of the tie-aware closed form cancel badly in float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import special

from hybridhash_jax import sharding

_BLOCK = 32  # the sort kernel's database is padded to whole blocks per shard
DEFAULT_CUTOFFS = tuple(range(100, 1001, 100))  # precision@N curve points
_SORT_PAIRS = 1 << 27  # most (query, shard item) pairs per chunk of the sort kernel: some 20 bytes each
KERNELS = ("host", "sort")  # the counting pass on the host's cores, and the sort for accelerators


def pack_codes(codes) -> np.ndarray:
  """Real codes (n, bits) -> uint32 words (n, ceil(bits / 32)); bit b of word w is code[32w + b] >= 0."""
  codes = np.asarray(codes)
  if codes.ndim != 2:
    raise ValueError(f"codes must be (n, bits), got shape {codes.shape}")
  return _pack_bits(codes >= 0)


def _pack_bits(bits: np.ndarray) -> np.ndarray:
  n, b = bits.shape
  words = -(-b // 32)
  packed = np.zeros((n, words * 4), np.uint8)
  packed[:, :-(-b // 8)] = np.packbits(bits, axis=1, bitorder="little")
  return packed.view("<u4").astype(np.uint32)


def _codes_and_bits(codes, num_bits, name):
  codes = np.asarray(codes)
  if codes.ndim != 2:
    raise ValueError(f"{name} must be 2-D (n, bits) or packed uint32 (n, words), got shape {codes.shape}")
  if codes.dtype == np.uint32:
    if num_bits is None:
      raise ValueError(f"{name} is packed uint32: pass num_bits")
    if not 0 < num_bits <= 32 * codes.shape[1]:
      raise ValueError(f"num_bits={num_bits} does not fit {name}'s {codes.shape[1]} words")
    return codes, num_bits
  if num_bits is not None and num_bits != codes.shape[1]:
    raise ValueError(f"num_bits={num_bits} but {name} has {codes.shape[1]} columns")
  return pack_codes(codes), codes.shape[1]


def _pack_labels(labels, name) -> np.ndarray:
  """Multi-hot (n, classes) or class ids (n,) -> uint32 label words; relevance is a nonzero AND."""
  labels = np.asarray(labels)
  if labels.ndim == 1:
    if not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
      raise ValueError(f"1-D {name} must be non-negative integer class ids")
    labels = np.eye(int(labels.max()) + 1, dtype=bool)[labels]
  if labels.ndim != 2:
    raise ValueError(f"{name} must be multi-hot (n, classes) or class ids (n,), got shape {labels.shape}")
  return _pack_bits(labels > 0)


def _block_layout(rows: np.ndarray, num_blocks: int) -> np.ndarray:
  """(n, W) -> (num_blocks, _BLOCK, W) in index order; padding rows are zero."""
  out = np.zeros((num_blocks * _BLOCK, rows.shape[1]), rows.dtype)
  out[:len(rows)] = rows
  return out.reshape(num_blocks, _BLOCK, rows.shape[1])


def _shard_offsets(tot, axis_name):
  """This shard's per-distance counts -> (those of the earlier shards, those of all shards), summed."""
  if axis_name is None:
    return 0, tot
  every = lax.all_gather(tot, axis_name)  # (shards, *tot.shape)
  earlier = (jnp.arange(every.shape[0]) < lax.axis_index(axis_name)).reshape(-1, *(1,) * tot.ndim)
  return (every * earlier).sum(0), every.sum(0)


def _sorted_chunk_counts(q_words, q_labels, db_words, db_labels, valid, *, num_buckets, top_k, cutoffs, axis_name):
  """One query chunk (queries on the minor axis) against one database shard, in a few wide kernels.

  Returns (sum of precisions at relevant items in the top K, number of them, hits at each cutoff,
  distance histogram, relevant-item distance histogram), summed over shards; all counts are exact.
  The chunk's (queries, items) distances are a uint8 matrix (uint16 past 254 bits); one stable sort per
  query carries relevance along, so an item's position in its shard's order is its rank there
  (distance, then index), and a running sum of the sorted relevance its relevant count. Binary
  searches of the sorted distances give the per-distance counts (no (queries, items, distances)
  one-hot). The global rank adds, per distance, the items of all shards at lower distances and those
  of earlier shards at its own, less the shard's own items at lower distances; relevant counts
  likewise. Ranks grow along a query's sorted row, so the hits at each cutoff are a search too.
  """
  words, labels = (x.reshape(-1, x.shape[-1]) for x in (db_words, db_labels))
  d = sum(lax.population_count(q_words[w][:, None] ^ words[None, :, w]) for w in range(words.shape[1]))
  d = jnp.where(valid.reshape(1, -1), d, num_buckets).astype(jnp.uint8 if num_buckets < 255 else jnp.uint16)
  rel = functools.reduce(jnp.bitwise_or,
                         [q_labels[w][:, None] & labels[None, :, w] for w in range(labels.shape[1])]) != 0
  sorted_d, sorted_rel = lax.sort((d, rel.astype(jnp.uint8)), dimension=1, is_stable=True, num_keys=1)
  search = jax.vmap(jnp.searchsorted, in_axes=(0, None, None))
  below = search(sorted_d, jnp.arange(num_buckets + 1, dtype=d.dtype), "left")  # (qc, V + 1): items at d < v
  # (qc, n + 1): relevant items before a position
  rel_upto = jnp.pad(jnp.cumsum(sorted_rel, 1, dtype=jnp.int32), ((0, 0), (1, 0)))
  edges = jnp.stack([below, jnp.take_along_axis(rel_upto, below, 1)])  # items (relevant ones) at d < v
  tot = jnp.diff(edges, axis=-1)  # (2, qc, V); far (padding) items are past the last bucket
  before, tot_all = _shard_offsets(tot, axis_name)
  offset = jnp.cumsum(tot_all, -1) - tot_all + before - edges[..., :-1]
  offset = jnp.pad(offset, ((0, 0), (0, 0), (0, 1)), constant_values=1 << 30)  # padding ranks after every item
  off = jnp.take_along_axis(offset, sorted_d[None].astype(jnp.int32), axis=2, mode="promise_in_bounds")
  rank = jnp.arange(1, d.shape[1] + 1, dtype=jnp.int32) + off[0]
  hits = rel_upto[:, 1:] + off[1]
  in_k = (sorted_rel != 0) & (rank <= top_k)
  ap_sum = jnp.where(in_k, hits.astype(jnp.float32) / rank.astype(jnp.float32), 0.0).sum(1)
  n_rel = in_k.sum(1, dtype=jnp.int32)
  within = search(rank, jnp.asarray(cutoffs, jnp.int32), "right")  # (qc, cutoffs): positions ranked <= N
  pn = jnp.take_along_axis(rel_upto, within, 1)  # the shard's relevant items there
  if axis_name is not None:
    ap_sum, n_rel, pn = lax.psum((ap_sum, n_rel, pn), axis_name)
  return ap_sum, n_rel, pn, tot_all[0], tot_all[1]


@functools.partial(jax.jit, static_argnames=("num_buckets", "top_k", "cutoffs", "chunk_size", "mesh", "axis_name"))
def _sorted_counts(q_words, q_labels, db_words, db_labels, valid, *, num_buckets, top_k, cutoffs, chunk_size, mesh,
                   axis_name):
  nq = q_words.shape[0]
  pad = -nq % chunk_size
  q_words = jnp.pad(q_words, ((0, pad), (0, 0))).reshape(-1, chunk_size, q_words.shape[1]).transpose(0, 2, 1)
  q_labels = jnp.pad(q_labels, ((0, pad), (0, 0))).reshape(-1, chunk_size, q_labels.shape[1]).transpose(0, 2, 1)
  kw = dict(num_buckets=num_buckets, top_k=top_k, cutoffs=cutoffs)

  def run(q_words, q_labels, db_words, db_labels, valid, axis_name):
    return lax.map(lambda q: _sorted_chunk_counts(*q, db_words, db_labels, valid, axis_name=axis_name, **kw),
                   (q_words, q_labels))

  if mesh is None:
    out = run(q_words, q_labels, db_words, db_labels, valid, None)
  else:
    db_spec = P(axis_name)
    out = jax.shard_map(functools.partial(run, axis_name=axis_name), mesh=mesh,
                        in_specs=(P(), P(), db_spec, db_spec, db_spec), out_specs=P(),
                        check_vma=False)(q_words, q_labels, db_words, db_labels, valid)
  return tuple(x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])[:nq] for x in out)


def _sort_kernel_program(q_words, q_labels, db_words, db_labels, *, num_buckets, top_k, cutoffs, chunk_size, mesh,
                         axis_name):
  """Packed words -> (`_sorted_counts`, its arguments over a database padded to whole blocks per shard and placed
  on the mesh, its static keywords)."""
  n = len(db_words)
  shards = 1 if mesh is None else mesh.shape[axis_name]
  num_blocks = -(-max(n, 1) // (_BLOCK * shards)) * shards
  if chunk_size is None:
    nq = max(len(q_words), 1)
    most = max(1, _SORT_PAIRS // (num_blocks // shards * _BLOCK))
    chunk_size = -(-nq // -(-nq // most))  # equal chunks of at most `most`
  valid = (np.arange(num_blocks * _BLOCK) < n).reshape(num_blocks, _BLOCK)
  args = (q_words, q_labels, _block_layout(db_words, num_blocks), _block_layout(db_labels, num_blocks), valid)
  if mesh is not None:
    spec = [P(), P(), P(axis_name), P(axis_name), P(axis_name)]
    args = tuple(jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, spec))
  return _sorted_counts, args, dict(num_buckets=num_buckets, top_k=top_k, cutoffs=cutoffs, chunk_size=int(chunk_size),
                                    mesh=mesh, axis_name=axis_name if mesh is not None else None)


def default_kernel(mesh: Mesh | None = None) -> str:
  """The ranking kernel that suits the devices: the host's counting pass on CPU, one sort per chunk elsewhere."""
  return "host" if sharding.platform(mesh) == "cpu" else "sort"


def _packed_inputs(query_codes, db_codes, query_labels, db_labels, top_k, cutoffs, mesh, axis_name, num_bits):
  """Checked, packed inputs: (query words, query label words, database words, database label words) and the
  kernels' keywords (num_buckets, the resolved top_k, cutoffs)."""
  q_words, bits = _codes_and_bits(query_codes, num_bits, "query_codes")
  db_words, db_bits = _codes_and_bits(db_codes, num_bits, "db_codes")
  if bits != db_bits or q_words.shape[1] != db_words.shape[1]:
    raise ValueError(f"query_codes have {bits} bits but db_codes have {db_bits}")
  q_lab, db_lab = _pack_labels(query_labels, "query_labels"), _pack_labels(db_labels, "db_labels")
  if len(q_lab) != len(q_words) or len(db_lab) != len(db_words):
    raise ValueError(f"labels do not match codes: query {len(q_lab)} vs {len(q_words)}, "
                     f"database {len(db_lab)} vs {len(db_words)}")
  width = max(q_lab.shape[1], db_lab.shape[1])
  q_lab = np.pad(q_lab, ((0, 0), (0, width - q_lab.shape[1])))
  db_lab = np.pad(db_lab, ((0, 0), (0, width - db_lab.shape[1])))
  n = len(db_words)
  if n >= 1 << 24:
    raise ValueError(f"db_codes has {n} items; ranks are exact in float32 only below 2**24")
  if mesh is not None and axis_name not in mesh.shape:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
  top_k = n if top_k is None or top_k == -1 or top_k > n else int(top_k)
  if top_k <= 0:
    raise ValueError(f"top_k must be positive, None or -1, got {top_k}")
  cutoffs = tuple(int(c) for c in cutoffs)
  if any(c <= 0 for c in cutoffs):
    raise ValueError(f"cutoffs must be positive, got {cutoffs}")
  return (q_words, q_lab, db_words, db_lab), dict(num_buckets=bits + 1, top_k=top_k, cutoffs=cutoffs)


def sort_kernel_program(query_codes, db_codes, query_labels, db_labels, top_k=None, *, cutoffs=DEFAULT_CUTOFFS,
                        chunk_size=None, mesh: Mesh | None = None, axis_name: str = "data", num_bits=None):
  """The sort kernel of `ranking_counts` as (jitted function, arguments, static keywords), uncalled.

  `fn(*args, **kwargs)` gives its counts; `fn.trace(*args, **kwargs)` lowers it (experiments/lower_check.py).
  """
  packed, kw = _packed_inputs(query_codes, db_codes, query_labels, db_labels, top_k, cutoffs, mesh, axis_name,
                              num_bits)
  return _sort_kernel_program(*packed, **kw, chunk_size=chunk_size, mesh=mesh, axis_name=axis_name)


def ranking_counts(query_codes, db_codes, query_labels, db_labels, top_k=None, *, cutoffs=DEFAULT_CUTOFFS,
                   chunk_size=None, mesh: Mesh | None = None, axis_name: str = "data", num_bits=None,
                   kernel: str | None = None) -> dict:
  """Per-query exact counts under the stable Hamming ranking, as device arrays.

  Returns ap (Q,), hits_in_top_k (Q,) (relevant items within the top K), hits_at_cutoffs (Q, len(cutoffs))
  (relevant items within the top N for each cutoff N), hist and rel_hist (Q, bits + 1) (database and
  relevant items at each distance), and the resolved top_k.
  `kernel` is one of KERNELS (default: `default_kernel(mesh)`); both give the same counts. The sort kernel
  takes `chunk_size` queries at a time (any size; default: as many as keep a chunk's pairs within
  _SORT_PAIRS) and, with `mesh`, shards the database over `axis_name`; the host kernel uses neither.
  """
  kernel = default_kernel(mesh) if kernel is None else kernel
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
  packed, kw = _packed_inputs(query_codes, db_codes, query_labels, db_labels, top_k, cutoffs, mesh, axis_name,
                              num_bits)
  if kernel == "host":
    from hybridhash_jax import host_ranking  # (numba: CPU only)
    counts = map(jnp.asarray, host_ranking.ranking_counts(*packed, **kw))
  else:
    fn, args, static = _sort_kernel_program(*packed, **kw, chunk_size=chunk_size, mesh=mesh, axis_name=axis_name)
    counts = fn(*args, **static)
  ap_sum, n_rel, pn, hist, rhist = counts
  ap = jnp.where(n_rel > 0, ap_sum / jnp.maximum(n_rel, 1), 0.0)
  return dict(ap=ap, hits_in_top_k=n_rel, hits_at_cutoffs=pn, hist=hist, rel_hist=rhist, top_k=kw["top_k"])


def mean_average_precision(query_codes, db_codes, query_labels, db_labels, top_k=None, *, chunk_size=None,
                           mesh: Mesh | None = None, axis_name: str = "data", num_bits=None, kernel=None):
  """mAP@top_k under the stable Hamming ranking (a device scalar). See the module docstring."""
  counts = ranking_counts(query_codes, db_codes, query_labels, db_labels, top_k, cutoffs=(), chunk_size=chunk_size,
                          mesh=mesh, axis_name=axis_name, num_bits=num_bits, kernel=kernel)
  return counts["ap"].mean()


def _harmonic_diff(a, m):
  """sum_{k=1..m} 1 / (a + k), elementwise, in float64."""
  return special.digamma(a + m + 1.0) - special.digamma(a + 1.0)


def _bucket_expectation(a, b, m, x):
  """E[sum of precisions at the relevant items among the first m of a tie group], given x of them are relevant.

  The group has n items after a items (b of them relevant); its order is uniform. Given x relevant
  items among its first m positions, each position holds one with probability x / m, and another of
  the x sits before position k with expected count (k - 1)(x - 1) / (m - 1). Summing
  (b + 1 + (k - 1)(x - 1)/(m - 1)) / (a + k) over k = 1..m gives, with D = sum_k 1/(a + k),
    (x / m) * [(b + 1) D + (x - 1)/(m - 1) * (m - (a + 1) D)].
  """
  dh = _harmonic_diff(a, m)
  safe_m = np.maximum(m, 1.0)
  spread = np.where(m > 1, (x - 1.0) / np.maximum(m - 1.0, 1.0) * (m - (a + 1.0) * dh), 0.0)
  return np.where(m > 0, x / safe_m * ((b + 1.0) * dh + spread), 0.0)


def tie_aware_average_precision(hist, rel_hist, top_k) -> np.ndarray:
  """Per-query AP@top_k expected over a uniformly random order within each tie group (float64).

  Groups wholly inside the top K contribute the closed form of `_bucket_expectation` with x = r and
  m = n (McSherry & Najork, 2008). The group straddling position K contributes its first
  m = K - (items before it) positions; the number x of relevant items among them is hypergeometric,
  and AP@K = sum_x P(x) (E[sum over whole groups] + E[boundary | x]) / (relevant before + x),
  0 when that count is 0. This is the exact expectation of the top-K AP. With top_k = database size
  it is the untruncated tie-aware AP.
  """
  hist = np.asarray(hist, np.float64)
  rel_hist = np.asarray(rel_hist, np.float64)
  c_le = np.cumsum(hist, 1)
  c_lt, r_lt = c_le - hist, np.cumsum(rel_hist, 1) - rel_hist
  boundary = np.minimum((c_le < top_k).sum(1), hist.shape[1] - 1)  # first bucket reaching K
  inside = np.arange(hist.shape[1])[None] < boundary[:, None]
  whole = np.where(inside, _bucket_expectation(c_lt, r_lt, hist, rel_hist), 0.0).sum(1)
  rows = np.arange(len(hist))
  a, b, n, r = c_lt[rows, boundary], r_lt[rows, boundary], hist[rows, boundary], rel_hist[rows, boundary]
  m = np.clip(top_k - a, 0, n)
  lo, hi = np.maximum(0.0, m - (n - r)), np.minimum(r, m)
  xs = lo[:, None] + np.arange(int((hi - lo).max(initial=0)) + 1)[None]  # every feasible x, per query
  ok = xs <= hi[:, None]
  xs = np.where(ok, xs, lo[:, None])
  log_p = (special.gammaln(r[:, None] + 1) - special.gammaln(xs + 1) - special.gammaln(r[:, None] - xs + 1)
           + special.gammaln(n[:, None] - r[:, None] + 1) - special.gammaln(m[:, None] - xs + 1)
           - special.gammaln(n[:, None] - r[:, None] - m[:, None] + xs + 1)
           - special.gammaln(n[:, None] + 1) + special.gammaln(m[:, None] + 1)
           + special.gammaln(n[:, None] - m[:, None] + 1))
  p = np.where(ok, np.exp(log_p), 0.0)
  s_b = _bucket_expectation(a[:, None], b[:, None], m[:, None], xs)
  denom = b[:, None] + xs
  ap = np.where(ok & (denom > 0), p * (whole[:, None] + s_b) / np.maximum(denom, 1.0), 0.0).sum(1)
  return ap


def pr_curve_by_radius(hist, rel_hist) -> dict:
  """Mean precision and recall of the items within Hamming radius r, r = 0..bits.

  A query with nothing within radius r has precision 0 there (as DeepHash code does); a query with no
  relevant item in the database has recall 0.
  """
  c_le = np.cumsum(np.asarray(hist, np.float64), 1)
  r_le = np.cumsum(np.asarray(rel_hist, np.float64), 1)
  precision = np.where(c_le > 0, r_le / np.maximum(c_le, 1.0), 0.0)
  recall = np.where(r_le[:, -1:] > 0, r_le / np.maximum(r_le[:, -1:], 1.0), 0.0)
  return dict(radius=np.arange(c_le.shape[1]), precision=precision.mean(0), recall=recall.mean(0))


def retrieval_metrics(query_codes, db_codes, query_labels, db_labels, top_k=None, *, cutoffs=DEFAULT_CUTOFFS,
                      chunk_size=None, mesh: Mesh | None = None, axis_name: str = "data",
                      num_bits=None, kernel=None) -> dict:
  """Everything for `results.json`, as Python floats and NumPy arrays.

  map (stable ranking), map_tie_aware, precision_at_n {n, precision}, pr_curve {radius, precision,
  recall}, precision_at_radius_2 (0 for a query with nothing within radius 2).
  """
  counts = jax.device_get(ranking_counts(query_codes, db_codes, query_labels, db_labels, top_k, cutoffs=cutoffs,
                                         chunk_size=chunk_size, mesh=mesh, axis_name=axis_name,
                                         num_bits=num_bits, kernel=kernel))
  pr = pr_curve_by_radius(counts["hist"], counts["rel_hist"])
  n = np.asarray(cutoffs, np.float64)
  return dict(
      map=float(np.mean(counts["ap"], dtype=np.float64)),
      map_tie_aware=float(tie_aware_average_precision(counts["hist"], counts["rel_hist"], counts["top_k"]).mean()),
      precision_at_n=dict(n=np.asarray(cutoffs), precision=(counts["hits_at_cutoffs"] / n).mean(0)),
      pr_curve=pr,
      precision_at_radius_2=float(pr["precision"][min(2, len(pr["precision"]) - 1)]),
      top_k=counts["top_k"])


def top_indices(query_codes, db_codes, k: int = 10, *, num_bits=None) -> np.ndarray:
  """(queries, k) database indices of each query's first k items in the stable ranking (the compiled flat
  search of `hamming_kernels`, on the host)."""
  from hybridhash_jax import hamming_kernels  # (numba: CPU only)
  q_words, _ = _codes_and_bits(query_codes, num_bits, "query_codes")
  db_words, _ = _codes_and_bits(db_codes, num_bits, "db_codes")
  as_bytes = lambda w: np.ascontiguousarray(np.asarray(w, "<u4")).view(np.uint8)
  return hamming_kernels.knn(as_bytes(q_words), as_bytes(db_words), int(k))[1]

