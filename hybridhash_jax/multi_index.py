"""Exact multi-index hashing (Norouzi, Punjani and Fleet, CVPR 2012 / TPAMI 2014) in the stable order.

A code's bits are cut into m contiguous substrings; table j maps each value of substring j to the
ids whose substring j has it (a direct-address table: `offsets[j, v]..offsets[j, v + 1]` of
`ids[j]`, ids ascending). Two codes at Hamming distance d differ in some substring by at most
d // m bits (pigeonhole), so a search enumerates, for s = 0, 1, ..., every value at distance s from
the query's substring in each table in turn, and computes the full distance of each id found.

Each table also holds the codes themselves in its own order (`table_codes[j, slot]` is the code of
`ids[j, slot]`): the codes of a bucket are read in one sequential run, not gathered one random
8-byte word at a time, and an id is read only for a code kept as a candidate.

Certainty: once tables 0..j have been searched at substring distance s (and all at less), an item
not yet found differs by at least s + 1 bits in substrings 0..j and s in the others, so every item
within m * s + j has been found. A k-NN search keeps the candidates within `reach`, the least
distance with k candidates at or below it (it only falls), and stops once the bound reaches it; the
first k candidates in (distance, id) order are then exactly the flat search's. A radius R search
stops once the bound reaches R. An item reachable from several tables is counted only at the first
(substring distance, table) that reaches it, known from its own substring distances, so no
per-query visited set is needed.

Number of tables: m = ceil(bits / log2 n) (at least bits / 32, so a substring fits a 32-bit key),
the paper's choice of substrings of about log2 n bits: a table then has at most about n buckets
(its memory is linear in n) holding about one item each on uniform codes, which balances the
values enumerated against the candidates checked.
"""

import math
import mmap

import numba
import numpy as np

from hybridhash_jax import errors
from hybridhash_jax import hamming_kernels
from hybridhash_jax.host_ranking import popcount

# Bucket bounds looked up before any bucket is scanned: independent loads that the CPU overlaps
# (each is a cache miss in a table of millions of buckets), in a buffer that stays in L1.
_LOOKUPS = 64
# A build sorts by the high bits first into 2^10 runs: as many write positions as L2 holds lines.
_PARTITION_BITS = 10


def _fresh(shape: tuple[int, ...], dtype) -> np.ndarray:
  """An uninitialised array in shared anonymous memory: on the virtual machines measured, first touching
  shared pages costs a tenth of what private ones (numpy's) do, which dominated a build's time."""
  size = math.prod(shape) * np.dtype(dtype).itemsize
  return np.frombuffer(mmap.mmap(-1, max(size, 1)), dtype, math.prod(shape)).reshape(shape)


def num_tables(bits: int, n: int) -> int:
  """m = ceil(bits / log2 n), at least ceil(bits / 32), at most bits (see the module docstring)."""
  return int(min(bits, max(math.ceil(bits / 32), math.ceil(bits / math.log2(max(n, 2))))))


def substrings(bits: int, tables: int) -> np.ndarray:
  """(tables, 2) int64 [first bit, length] of each substring: contiguous, lengths differing by at most one."""
  lengths = np.full(tables, bits // tables, np.int64)
  lengths[:bits % tables] += 1
  return np.stack([np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths], axis=1)


@numba.njit(nogil=True, cache=True, inline="always")
def _key(flat, width, item, first, length):
  """Bits first..first+length of an item's code (words item-major in flat), as an int64."""
  lo, sh = first >> 6, first & 63
  v = flat[item * width + lo] >> numba.uint64(sh)
  if sh + length > 64:
    v |= flat[item * width + lo + 1] << numba.uint64(64 - sh)
  return numba.int64(v & ((numba.uint64(1) << numba.uint64(length)) - numba.uint64(1)))


@numba.njit(parallel=True, cache=True)
def _build(flat, width, n, subs, parts, offsets, ids, table_codes):
  """Fills each table by a stable counting sort of the items by substring value (ids ascending in a
  bucket), the codes beside their ids, in two passes that each write where the cache holds it:
  first by the value's high `_PARTITION_BITS` into runs (the items cut in `parts`, each part's first
  slot in a run following the earlier parts' counts there), then each run by the low bits within its
  own slots. Every pass is split over (table, part) or (table, run) tasks, evenly over the cores."""
  m, runs = len(subs), 1 << _PARTITION_BITS
  counts = np.zeros((m, parts, runs), np.int64)
  for task in numba.prange(m * parts):
    j, p = task // parts, task % parts
    first, length = subs[j, 0], subs[j, 1]
    low = max(0, length - _PARTITION_BITS)
    for i in range(p * n // parts, (p + 1) * n // parts):
      counts[j, p, _key(flat, width, i, first, length) >> low] += 1
  run_start = np.empty((m, runs + 1), np.int64)
  for j in range(m):
    total = 0
    for r in range(runs):
      run_start[j, r] = total
      for p in range(parts):
        count = counts[j, p, r]
        counts[j, p, r] = total
        total += count
    run_start[j, runs] = total
  for task in numba.prange(m * parts):
    j, p = task // parts, task % parts
    first, length = subs[j, 0], subs[j, 1]
    low = max(0, length - _PARTITION_BITS)
    tid, tc = ids[j], table_codes[j]
    for i in range(p * n // parts, (p + 1) * n // parts):
      r = _key(flat, width, i, first, length) >> low
      slot = counts[j, p, r]
      counts[j, p, r] = slot + 1
      tid[slot] = i
      for w in range(width):
        tc[slot * width + w] = flat[i * width + w]
  for task in numba.prange(m * runs):
    j, r = task // runs, task % runs
    first, length = subs[j, 0], subs[j, 1]
    low = max(0, length - _PARTITION_BITS)
    if r >= 1 << (length - low):  # a table of fewer bits has fewer runs
      continue
    a, b = run_start[j, r], run_start[j, r + 1]
    tid, tc, off = ids[j], table_codes[j], offsets[j]
    run_ids, run_codes = tid[a:b].copy(), tc[a * width:b * width].copy()
    low_mask = (1 << low) - 1
    fill = np.zeros(1 << low, np.int64)
    for t in range(b - a):
      fill[_key(run_codes, width, t, first, length) & low_mask] += 1
    total = a
    for v in range(1 << low):
      off[(r << low) + v] = total
      count = fill[v]
      fill[v] = total
      total += count
    for t in range(b - a):
      v = _key(run_codes, width, t, first, length) & low_mask
      slot = fill[v]
      fill[v] = slot + 1
      tid[slot] = run_ids[t]
      for w in range(width):
        tc[slot * width + w] = run_codes[t * width + w]
  for j in range(m):
    offsets[j, 1 << subs[j, 1]] = n


@numba.njit(nogil=True, cache=True)
def _search(q, width, subs, offsets, ids, table_codes, k, radius):
  """One query: (distances, ids) of the candidates, and `reach`: every item within it is among them.

  k-NN (k > 0) stops once the bound reaches `reach` with k candidates within it; radius search (k == 0)
  once the bound reaches `radius`. Candidates beyond `reach` may be among those returned."""
  m = len(subs)
  qkeys = np.empty(m, np.int64)
  for j in range(m):
    qkeys[j] = _key(q, width, 0, subs[j, 0], subs[j, 1])
  top = 64 * width
  hist = np.zeros(top + 1, np.int64)
  reach = top if k > 0 else radius
  below = 0  # candidates below reach (k-NN)
  cap = 256
  cd, ci = np.empty(cap, np.int32), np.empty(cap, np.int64)
  e = 0
  lo, hi = np.empty(_LOOKUPS, np.int64), np.empty(_LOOKUPS, np.int64)
  x = np.empty(width, np.uint64)
  for s in range(subs[:, 1].max() + 1):
    for j in range(m):
      length = subs[j, 1]
      if s > length:  # table j was enumerated whole: every item has been found
        return cd[:e], ci[:e], reach
      off, tid, tc = offsets[j], ids[j], table_codes[j]
      end = 1 << length
      mask = (1 << s) - 1  # the values at distance s: every s-bit subset to flip (Gosper's hack)
      while mask < end:
        nb = 0
        while nb < _LOOKUPS and mask < end:
          v = qkeys[j] ^ mask
          lo[nb], hi[nb] = off[v], off[v + 1]
          nb += 1
          if mask == 0:
            mask = end
          else:
            low = mask & -mask
            nxt = mask + low
            mask = (((nxt ^ mask) >> 2) // low) | nxt
        for b in range(nb):
          for slot in range(lo[b], hi[b]):
            d = 0
            for w in range(width):
              x[w] = tc[slot * width + w] ^ q[w]
              d += popcount(x[w])
            if d > reach:
              continue
            seen = False  # reached before at (less than s, any table) or (s, an earlier table)
            for t in range(m):
              if t != j:
                st = popcount(_key(x, width, 0, subs[t, 0], subs[t, 1]))
                if st < s or (st == s and t < j):
                  seen = True
                  break
            if seen:
              continue
            if e == cap:
              e = _compact(cd, ci, e, reach)
              if 2 * e > cap:
                cap *= 2
                cd2, ci2 = np.empty(cap, np.int32), np.empty(cap, np.int64)
                cd2[:e], ci2[:e] = cd[:e], ci[:e]
                cd, ci = cd2, ci2
            cd[e], ci[e] = d, tid[slot]
            e += 1
            hist[d] += 1
            if k > 0 and d < reach:
              below += 1
              while below >= k:
                reach -= 1
                below -= hist[reach]
      bound = m * s + j  # every item within it is found
      if bound >= reach and (k == 0 or below + hist[reach] >= k):
        return cd[:e], ci[:e], reach
  return cd[:e], ci[:e], reach


@numba.njit(nogil=True, cache=True)
def _compact(cd, ci, e, reach):
  """Keeps the candidates within reach, in order; returns their number."""
  kept = 0
  for t in range(e):
    if cd[t] <= reach:
      cd[kept], ci[kept] = cd[t], ci[t]
      kept += 1
  return kept


@numba.njit(nogil=True, cache=True)
def _stable(cd, ci, reach, limit):
  """The first `limit` candidates within reach in the stable order (distance, then id)."""
  e = _compact(cd, ci, len(cd), reach)
  cd, ci = cd[:e], ci[:e]
  order = np.argsort(cd.astype(np.int64) * (ci.max() + 1 if e else 1) + ci)[:limit]
  return cd[order], ci[order]


@numba.njit(nogil=True, cache=True)
def _one(q, width, subs, offsets, ids, table_codes, k, radius, limit):
  cd, ci, reach = _search(q, width, subs, offsets, ids, table_codes, k, radius)
  return _stable(cd, ci, reach, limit)


@numba.njit(parallel=True, cache=True)
def _knn(qw, width, subs, offsets, ids, table_codes, limit):
  nq = qw.shape[0]
  out_d = np.empty((nq, limit), np.int32)
  out_i = np.empty((nq, limit), np.int64)
  for qi in numba.prange(nq):
    out_d[qi], out_i[qi] = _one(qw[qi], width, subs, offsets, ids, table_codes, limit, 0, limit)
  return out_d, out_i


class MultiIndex:
  """Substring tables over packed uint8 codes (n, bytes): exact k-NN and radius search in the stable order.

  `offsets` (tables, 2^longest + 1) and `ids` (tables, n) are the tables, `table_codes` (tables, n, words)
  uint64 the codes in each table's order (see the module docstring); all may be memory maps."""

  def __init__(self, codes: np.ndarray, bits: int, subs: np.ndarray, offsets: np.ndarray, ids: np.ndarray,
               table_codes: np.ndarray):
    self.codes, self.bits = codes, int(bits)
    self.subs, self.offsets, self.ids, self.table_codes = np.asarray(subs, np.int64), offsets, ids, table_codes
    self._args = (table_codes.shape[2], *map(hamming_kernels.read_only, (
        self.subs, offsets, ids, table_codes.reshape(len(self.subs), -1))))

  @classmethod
  def build(cls, codes: np.ndarray, bits: int, tables: int | None = None) -> "MultiIndex":
    """Tables over codes (memory maps are read, not copied); `tables` defaults to `num_tables(bits, n)`."""
    n = len(codes)
    tables = tables or num_tables(bits, n)
    longest = max(16, math.ceil(math.log2(max(n, 2))) + 2)  # a table has 2^length buckets: about n at most
    if not 1 <= tables <= bits or -(-bits // tables) > longest:
      raise errors.ConfigError(f"--nhash={tables}: {n} codes of {bits} bits need 1 to {bits} tables of substrings "
                               f"of at most {longest} bits (at least {-(-bits // longest)} tables)")
    subs = substrings(bits, tables)
    words = hamming_kernels.words(codes)
    index_type = np.int32 if n < 2**31 else np.int64
    offsets = np.zeros((tables, (1 << int(subs[:, 1].max())) + 1), index_type)
    ids = _fresh((tables, n), index_type)
    table_codes = _fresh((tables, n, words.shape[1]), np.uint64)
    _build(words.reshape(-1), words.shape[1], n, subs, numba.get_num_threads(), offsets, ids,
           table_codes.reshape(tables, -1))
    return cls(codes, bits, subs, offsets, ids, table_codes)

  @property
  def tables(self) -> int:
    return len(self.subs)

  def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances int32 (nq, min(k, n)), ids int64), as `hamming_kernels.knn`."""
    qw = hamming_kernels.as_words(queries)
    limit = min(int(k), len(self.codes))
    if limit < 1 or len(qw) == 0:
      return np.zeros((len(qw), max(limit, 0)), np.int32), np.zeros((len(qw), max(limit, 0)), np.int64)
    if len(qw) < numba.get_num_threads():  # a query takes well under a millisecond: no parallel launch for a few
      return tuple(np.stack(x) for x in zip(*(_one(q, *self._args, limit, 0, limit) for q in qw)))
    with hamming_kernels.LOCK:
      return _knn(qw, *self._args, limit)

  def radius_search(self, queries: np.ndarray, radius: int):
    """(lims, distances, ids), as `hamming_kernels.radius_search`."""
    qw = hamming_kernels.as_words(queries)
    found = [_one(q, *self._args, 0, int(radius), len(self.codes)) for q in qw] if len(self.codes) else [
        (np.zeros(0, np.int32), np.zeros(0, np.int64))] * len(qw)
    lims = np.concatenate([[0], np.cumsum([len(cd) for cd, _ in found])]).astype(np.int64)
    return (lims, np.concatenate([cd for cd, _ in found] + [np.zeros(0, np.int32)]),
            np.concatenate([ci for _, ci in found] + [np.zeros(0, np.int64)]))
