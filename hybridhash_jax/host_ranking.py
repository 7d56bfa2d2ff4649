"""The CPU ranking kernel: one counting pass per query over the database in index order (numba).

The stable rank is rank_j = #{i: d_i < d_j} + #{i <= j: d_i = d_j}. Walking the database in index
order with one counter per distance, the counter at d_j just after item j is the second term, so
the pass records it (and the relevant items' counter) for each relevant item; the first term is the
finished histogram's exclusive prefix. With a rank limit below the database size (mAP@K, precision@N),
the pass also tracks the distance of the limit-th item seen so far: it only falls, so a relevant item
farther than it ranks past every limit and is not recorded.

Why not XLA: a per-query histogram is a scatter, and XLA:CPU's scatters run one element at a time;
the scan kernel that avoided them spent its time building bit planes. A compiled loop needs a few
nanoseconds per (query, item). Queries are split over threads (the kernel releases the GIL); it is
compiled once per environment and cached on disk.
"""

import os
from concurrent import futures

import numba
import numpy as np
from numba import extending

_TILE = 512  # items whose distances and relevance are computed together (vectorised) before counting
_QUERIES = 8  # queries that walk the database together, a tile at a time (fewer on a large database)
_RECORD_BYTES = 1 << 26  # most bytes of relevant-item records per walk: 12 per item per query


@extending.intrinsic
def popcount(typingctx, x):
  """The population count of an integer, one instruction (LLVM's ctpop); the Hamming kernels use it too."""
  def codegen(context, builder, sig, args):
    return builder.ctpop(args[0])
  return x(x), codegen


@numba.njit(nogil=True, cache=True)
def _tile(q_words, q_labels, db_words, db_labels, start, stop, dist, rel):
  """Distances (dist) and relevance bits (rel) of items start..stop to one query.

  Loops over 1-D slices, the first word assigning: they vectorise (2-D indexing ran 3x slower)."""
  words = db_words[0, start:stop]
  for t in range(stop - start):
    dist[t] = popcount(words[t] ^ q_words[0])
  for w in range(1, db_words.shape[0]):
    words = db_words[w, start:stop]
    for t in range(stop - start):
      dist[t] += popcount(words[t] ^ q_words[w])
  labels = db_labels[0, start:stop]
  for t in range(stop - start):
    rel[t] = labels[t] & q_labels[0]
  for w in range(1, db_labels.shape[0]):
    labels = db_labels[w, start:stop]
    for t in range(stop - start):
      rel[t] |= labels[t] & q_labels[w]


@numba.njit(nogil=True, cache=True)
def _walk(q_words, q_labels, db_words, db_labels, first, last, limit, dist, rel, records, m, hist, rel_hist):
  """The pass over the database for queries first..last, a tile at a time for all of them (it stays in
  cache): histograms, and each relevant item's (distance, items, relevant items up to it there) when
  it may rank within `limit`."""
  n = db_words.shape[1]
  reach = np.full(last - first, hist.shape[1] - 1)  # no item past this distance ranks within limit
  below = np.zeros(last - first, np.int64)  # items seen at distances under reach
  for start in range(0, n, _TILE):
    stop = min(start + _TILE, n)
    for k in range(last - first):
      i = first + k
      h, rh = hist[i], rel_hist[i]
      _tile(q_words[i], q_labels[i], db_words, db_labels, start, stop, dist, rel)
      r, b, e = reach[k], below[k], m[k]  # in registers through the tile
      for t in range(stop - start):
        d = dist[t]
        h[d] += 1
        if d < r:
          b += 1
          while b >= limit:  # limit items at or below r - 1 already: it moves down
            r -= 1
            b -= h[r]
        if rel[t] != 0:
          rh[d] += 1
          if d <= r:
            records[k, e, 0], records[k, e, 1], records[k, e, 2] = d, h[d], rh[d]
            e += 1
      reach[k], below[k], m[k] = r, b, e


@numba.njit(nogil=True, cache=True)
def _count_queries(q_words, q_labels, db_words, db_labels, limit, top_k, cutoffs, first, last, width,
                   ap_sum, n_rel, hits_at, hist, rel_hist):
  """Fills rows first..last of the outputs (see `ranking_counts`), width queries a walk; words (W, n) uint64."""
  n = db_words.shape[1]
  buckets = hist.shape[1]
  dist = np.empty(_TILE, np.uint16)
  rel = np.empty(_TILE, np.uint64)
  records = np.empty((width, n, 3), np.int32)
  m = np.zeros(width, np.int64)
  below, rel_below = np.empty(buckets, np.int64), np.empty(buckets, np.int64)
  for block in range(first, last, width):
    end = min(block + width, last)
    m[:] = 0
    _walk(q_words, q_labels, db_words, db_labels, block, end, limit, dist, rel, records, m, hist, rel_hist)
    for k in range(end - block):
      i = block + k
      h, rh = hist[i], rel_hist[i]
      acc, rel_acc = 0, 0
      for v in range(buckets):
        below[v], rel_below[v] = acc, rel_acc
        acc += h[v]
        rel_acc += rh[v]
      total, hits = 0.0, 0
      for e in range(m[k]):
        d = records[k, e, 0]
        rank = below[d] + records[k, e, 1]
        if rank <= top_k:
          total += (rel_below[d] + records[k, e, 2]) / rank
          hits += 1
        for c in range(len(cutoffs)):
          if rank <= cutoffs[c]:
            hits_at[i, c] += 1
      ap_sum[i], n_rel[i] = total, hits


def _words64(words: np.ndarray) -> np.ndarray:
  """(n, W) uint32 words -> (n, ceil(W / 2)) uint64."""
  words = np.pad(words, ((0, 0), (0, words.shape[1] % 2)))
  return words.view("<u8").astype(np.uint64)


def threads() -> int:
  """The cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ranking_counts(q_words, q_labels, db_words, db_labels, *, num_buckets, top_k, cutoffs):
  """Per-query (sum of precisions at relevant items in the top K, their number, hits at each cutoff,
  distance histogram, relevant-item histogram) as NumPy arrays; words are packed uint32 (n, W)."""
  nq, n = len(q_words), len(db_words)
  qw, ql = _words64(q_words), _words64(q_labels)
  dw, dl = (np.ascontiguousarray(_words64(x).T) for x in (db_words, db_labels))  # item-minor: loops run over items
  cutoffs = np.asarray(cutoffs, np.int64).reshape(-1)
  limit = min(max(top_k, *cutoffs, 0), n)
  out = (np.zeros(nq), np.zeros(nq, np.int64), np.zeros((nq, len(cutoffs)), np.int64),
         np.zeros((nq, num_buckets), np.int64), np.zeros((nq, num_buckets), np.int64))
  workers = threads()
  edges = np.linspace(0, nq, min(nq, 4 * workers) + 1).astype(np.int64)
  width = max(1, min(_QUERIES, _RECORD_BYTES // (12 * max(n, 1))))
  with futures.ThreadPoolExecutor(workers) as pool:
    done = [pool.submit(_count_queries, qw, ql, dw, dl, limit, top_k, cutoffs, a, b, width, *out)
            for a, b in zip(edges[:-1], edges[1:])]
    for f in done:
      f.result()
  return out
