"""Exact Hamming k-NN and radius search over packed codes, in the stable order (distance, then id), compiled.

k-NN, per query, one pass over the database in id order: a tile of distances is computed in a
vectorised loop, and only a tile whose least distance is within the query's bound `reach` is
looked at item by item. `reach` is the least distance such that `limit` items at or below it have
been seen: it only falls, and no item beyond it can be among the first `limit`. The items within
it are kept as candidates in id order (with one counter per distance under it, so it can fall);
when the candidate buffer fills it is compacted to the items below `reach` and the first ties at
it, at most `limit` of them. A counting sort by distance, stable, then selects the answer from the
candidates of every part of the database.

Parallel on every core (numba prange): a batch of queries is split in groups that each walk the
whole database a block at a time (the block stays in L2 while every query of the group scans it,
so each code is loaded from memory once per group); fewer queries than cores split the database
in parts instead, whose candidates merge exactly (each part's buffer holds its own first `limit`).
Radius search counts its hits per (query, part), then fills them in and sorts them the same way.
"""

import math
import threading

import numba
import numpy as np

from hybridhash_jax.host_ranking import popcount

_TILE = 256  # distances computed together (a vectorised loop) before any is compared item by item
_BLOCK = 1 << 14  # items a group of queries scans in turn: 128 KiB of 64-bit codes, well inside L2
_MIN_PART = 1 << 12  # no database part smaller: a part costs a candidate buffer and a merge
# One search at a time uses every core; a lock keeps concurrent callers (the server's thread pool)
# from launching parallel kernels together, which numba's workqueue threading layer does not allow.
LOCK = threading.Lock()


def words(codes: np.ndarray) -> np.ndarray:
  """Packed uint8 codes (n, bytes) -> uint64 words (n, ceil(bytes / 8)), little-endian, bit b in word b // 64.

  A view (no copy; a memory map stays mapped) when bytes is a multiple of 8 and rows are contiguous,
  else a zero-padded copy (zero bits add nothing to a distance)."""
  codes = np.asarray(codes)
  if codes.dtype != np.uint8 or codes.ndim != 2:
    raise ValueError(f"packed codes must be uint8 (n, bytes), got {codes.dtype} {codes.shape}")
  if codes.shape[1] % 8 == 0 and codes.flags.c_contiguous:
    return codes.view("<u8").reshape(len(codes), codes.shape[1] // 8)
  padded = np.zeros((len(codes), -(-codes.shape[1] // 8) * 8), np.uint8)
  padded[:, :codes.shape[1]] = codes
  return padded.view("<u8")


@numba.njit(nogil=True, cache=True, inline="always")
def _tile(q, flat, width, start, count, dist):
  """Distances of items start..start+count to q into dist; returns the least. flat: the words, item-major, 1-D.

  Loops over contiguous 1-D slices vectorise (LLVM's popcount on AVX2 registers); 2-D indexing ran 3x slower."""
  if width == 1:
    words, q0 = flat[start:start + count], q[0]
    for t in range(count):
      dist[t] = popcount(words[t] ^ q0)
  else:
    words = flat[start * width:(start + count) * width]
    for t in range(count):
      d = 0
      for w in range(width):
        d += popcount(words[t * width + w] ^ q[w])
      dist[t] = d
  least = dist[0]
  for t in range(1, count):
    least = min(least, dist[t])
  return least


@numba.njit(nogil=True, cache=True)
def _compact(cd, ci, e, reach, ties):
  """Keeps the candidates below reach and the first `ties` at it, in order; returns their number."""
  kept = 0
  for j in range(e):
    if cd[j] < reach or (cd[j] == reach and ties > 0):
      if cd[j] == reach:
        ties -= 1
      cd[kept], ci[kept] = cd[j], ci[j]
      kept += 1
  return kept


def _layout(nq: int, n: int) -> tuple[int, int]:
  """(query groups, database parts): about two tasks a core, the database split only for few queries."""
  tasks = 2 * numba.get_num_threads()
  groups = max(1, min(nq, tasks))
  parts = max(1, min(math.ceil(tasks / groups), n // _MIN_PART))
  return groups, parts


@numba.njit(parallel=True, cache=True)
def _knn(qw, dbw, limit, groups, parts):
  nq, n, width = qw.shape[0], dbw.shape[0], dbw.shape[1]
  flat = dbw.reshape(n * width)
  buckets = 64 * dbw.shape[1] + 1
  cap = max(2 * limit, 64)
  cd = np.empty((nq, parts, cap), np.int32)
  ci = np.empty((nq, parts, cap), np.int64)
  cm = np.zeros((nq, parts), np.int64)
  reach = np.full((nq, parts), buckets - 1, np.int64)
  for task in numba.prange(groups * parts):
    g, p = task // parts, task % parts
    q0, q1 = g * nq // groups, (g + 1) * nq // groups
    a, b = p * n // parts, (p + 1) * n // parts
    dist = np.empty(_TILE, np.int64)
    hist = np.zeros((q1 - q0, buckets), np.int64)
    below = np.zeros(q1 - q0, np.int64)  # items seen below reach
    for block in range(a, b, _BLOCK):
      block_end = min(block + _BLOCK, b)
      for k in range(q1 - q0):
        qi = q0 + k
        q, h = qw[qi], hist[k]
        r, bl, e = reach[qi, p], below[k], cm[qi, p]
        qd, qc = cd[qi, p], ci[qi, p]
        for s in range(block, block_end, _TILE):
          count = min(_TILE, block_end - s)
          if _tile(q, flat, width, s, count, dist) > r:
            continue
          for t in range(count):
            d = dist[t]
            if d <= r:
              if e == cap:
                e = _compact(qd, qc, e, r, limit - bl)
              qd[e], qc[e] = d, s + t
              e += 1
              if d < r:
                h[d] += 1
                bl += 1
                while bl >= limit:
                  r -= 1
                  bl -= h[r]
        reach[qi, p], below[k], cm[qi, p] = r, bl, e
  out_i = np.empty((nq, limit), np.int64)
  out_d = np.empty((nq, limit), np.int32)
  for qi in numba.prange(nq):
    _select(cd[qi], ci[qi], cm[qi], reach[qi], limit, buckets, out_d[qi], out_i[qi])
  return out_d, out_i


@numba.njit(nogil=True, cache=True)
def _select(cd, ci, cm, reach, limit, buckets, out_d, out_i):
  """The first `limit` (distance, id) of the parts' candidates (each in id order, parts in order)."""
  hist = np.zeros(buckets + 1, np.int64)
  for p in range(cd.shape[0]):
    for j in range(cm[p]):
      if cd[p, j] <= reach[p]:
        hist[cd[p, j] + 1] += 1
  for v in range(buckets):
    hist[v + 1] += hist[v]  # hist[v]: candidates below distance v, the first slot of distance v
  for p in range(cd.shape[0]):
    for j in range(cm[p]):
      d = cd[p, j]
      if d <= reach[p]:
        slot = hist[d]
        hist[d] += 1
        if slot < limit:
          out_d[slot], out_i[slot] = d, ci[p, j]


@numba.njit(parallel=True, cache=True)
def _radius_pass(qw, dbw, radius, groups, parts, starts, out_d, out_i):
  """Hits (distance <= radius) per (query, part); with `starts` (their first slots), also writes them."""
  nq, n, width = qw.shape[0], dbw.shape[0], dbw.shape[1]
  flat = dbw.reshape(n * width)
  fill = len(starts) > 0
  counts = np.zeros((nq, parts), np.int64)
  for task in numba.prange(groups * parts):
    g, p = task // parts, task % parts
    q0, q1 = g * nq // groups, (g + 1) * nq // groups
    a, b = p * n // parts, (p + 1) * n // parts
    dist = np.empty(_TILE, np.int64)
    for block in range(a, b, _BLOCK):
      block_end = min(block + _BLOCK, b)
      for qi in range(q0, q1):
        e = counts[qi, p]
        first = starts[qi * parts + p] if fill else 0
        for s in range(block, block_end, _TILE):
          count = min(_TILE, block_end - s)
          if _tile(qw[qi], flat, width, s, count, dist) > radius:
            continue
          for t in range(count):
            if dist[t] <= radius:
              if fill:
                out_d[first + e], out_i[first + e] = dist[t], s + t
              e += 1
        counts[qi, p] = e
  return counts


@numba.njit(parallel=True, cache=True)
def _sort_hits(lims, out_d, out_i):
  """Each query's hits (in id order) into the stable order: a stable sort by distance."""
  for qi in numba.prange(len(lims) - 1):
    a, b = lims[qi], lims[qi + 1]
    order = np.argsort(out_d[a:b], kind="mergesort")
    out_d[a:b], out_i[a:b] = out_d[a:b][order], out_i[a:b][order]


def knn(queries: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(distances int32 (nq, min(k, n)), ids int64): each query's first k codes in the stable order.

  queries and codes are packed uint8 (n, bytes) (or their `words`)."""
  qw, dbw = as_words(queries), as_words(codes)
  limit = min(int(k), len(dbw))
  if limit < 1 or len(qw) == 0:
    return np.zeros((len(qw), max(limit, 0)), np.int32), np.zeros((len(qw), max(limit, 0)), np.int64)
  with LOCK:
    return _knn(qw, dbw, limit, *_layout(len(qw), len(dbw)))


def radius_search(queries: np.ndarray, codes: np.ndarray, radius: int):
  """(lims (nq + 1), distances, ids): query q's hits, every code within `radius`, are [lims[q], lims[q + 1])."""
  qw, dbw = as_words(queries), as_words(codes)
  if len(dbw) == 0 or len(qw) == 0:
    return np.zeros(len(qw) + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
  layout = _layout(len(qw), len(dbw))
  none_d, none_i = np.zeros(0, np.int32), np.zeros(0, np.int64)
  with LOCK:
    counts = _radius_pass(qw, dbw, int(radius), *layout, none_i, none_d, none_i)
    starts = np.concatenate([[0], np.cumsum(counts.ravel())])
    out_d, out_i = np.empty(starts[-1], np.int32), np.empty(starts[-1], np.int64)
    _radius_pass(qw, dbw, int(radius), *layout, starts, out_d, out_i)
    lims = np.ascontiguousarray(starts[::layout[1]])
    _sort_hits(lims, out_d, out_i)
  return lims, out_d, out_i


def as_words(x: np.ndarray) -> np.ndarray:
  """Codes or their words, as a read-only view of the words.

  A built array and a memory-mapped one are then one numba type, so each kernel compiles once."""
  x = np.asarray(x)
  return read_only(x if x.dtype == np.uint64 else words(x))


def read_only(x: np.ndarray) -> np.ndarray:
  view = x.view()
  view.flags.writeable = False
  return view
