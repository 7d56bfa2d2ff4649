"""Exact multi-index hashing (Norouzi, Punjani and Fleet, CVPR 2012 / TPAMI 2014) in the stable order.

A code's bits are cut into m contiguous substrings; table j maps each value of substring j to the
ids whose substring j has it (a direct-address table: `offsets[j, v]..offsets[j, v + 1]` of
`ids[j]`, ids ascending). Two codes at Hamming distance d differ in some substring by at most
d // m bits (pigeonhole), so a search enumerates, for s = 0, 1, ..., every value at distance s from
the query's substring in each table in turn, and computes the full distance of each id found.

Certainty: once tables 0..j have been searched at substring distance s (and all at less), an item
not yet found differs by at least s + 1 bits in substrings 0..j and s in the others, so every item
within m * s + j has been found. A k-NN search stops when k found items lie within that bound; the
first k of all found items in (distance, id) order are then exactly the flat search's. A radius R
search stops once the bound reaches R. An item reachable from several tables is counted only at the
first (substring distance, table) that reaches it, known from its own substring distances, so no
per-query visited set is needed.

Number of tables: m = ceil(bits / log2 n) (at least bits / 32, so a substring fits a 32-bit key),
the paper's choice of substrings of about log2 n bits: a table then has at most about n buckets
(its memory is linear in n) holding about one item each on uniform codes, which balances the
values enumerated against the candidates checked.
"""

import math

import numba
import numpy as np

from hybridhash_jax import errors
from hybridhash_jax import hamming_kernels
from hybridhash_jax.host_ranking import popcount


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
def _build(flat, width, n, subs, offsets, ids):
  """Fills each table by a counting sort of the ids by substring value (stable: ids ascending in a bucket)."""
  for j in numba.prange(len(subs)):
    first, length = subs[j, 0], subs[j, 1]
    off = offsets[j]
    for i in range(n):
      off[_key(flat, width, i, first, length) + 1] += 1
    for v in range(1 << length):
      off[v + 1] += off[v]
    fill = off[:(1 << length)].copy()
    for i in range(n):
      v = _key(flat, width, i, first, length)
      ids[j, fill[v]] = i
      fill[v] += 1


@numba.njit(nogil=True, cache=True)
def _search(q, flat, width, subs, offsets, ids, k, radius):
  """One query: (distances, ids) of the found items, and the bound within which every item was found.

  k-NN (k > 0) stops once k found items lie within the bound; radius search (k == 0) once the bound
  reaches `radius` (and keeps only the items within it)."""
  m = len(subs)
  qkeys = np.empty(m, np.int64)
  for j in range(m):
    qkeys[j] = _key(q, width, 0, subs[j, 0], subs[j, 1])
  buckets = 64 * width + 1
  hist = np.zeros(buckets, np.int64)
  cap = 1024
  cd, ci = np.empty(cap, np.int32), np.empty(cap, np.int64)
  e = 0
  sub_d = np.empty(m, np.int64)
  bound = -1
  for s in range(subs[:, 1].max() + 1):
    for j in range(m):
      length = subs[j, 1]
      if s > length:  # table j was enumerated whole: every item has been found
        return cd[:e], ci[:e], buckets
      mask = (1 << s) - 1  # the values at distance s: every s-bit subset to flip (Gosper's hack)
      while mask < (1 << length):
        v = qkeys[j] ^ mask
        for slot in range(offsets[j, v], offsets[j, v + 1]):
          item = ids[j, slot]
          first_j, first_s = j, s
          for t in range(m):  # the first (substring distance, table) that reaches the item
            sub_d[t] = popcount(_key(flat, width, item, subs[t, 0], subs[t, 1]) ^ qkeys[t])
            if sub_d[t] < first_s or (sub_d[t] == first_s and t < first_j):
              first_j, first_s = t, sub_d[t]
          if first_j != j:
            continue
          d = 0
          for w in range(width):
            d += popcount(flat[item * width + w] ^ q[w])
          if k == 0 and d > radius:
            continue
          if e == cap:
            cap *= 2
            cd2, ci2 = np.empty(cap, np.int32), np.empty(cap, np.int64)
            cd2[:e], ci2[:e] = cd[:e], ci[:e]
            cd, ci = cd2, ci2
          cd[e], ci[e] = d, item
          e += 1
          hist[d] += 1
        if mask == 0:
          break
        low = mask & -mask
        nxt = mask + low
        mask = (((nxt ^ mask) >> 2) // low) | nxt
      bound = m * s + j  # every item within it is found
      if k == 0:
        if bound >= radius:
          return cd[:e], ci[:e], bound
      elif hist[:bound + 1].sum() >= k:
        return cd[:e], ci[:e], bound
  return cd[:e], ci[:e], buckets


@numba.njit(nogil=True, cache=True)
def _stable(cd, ci, limit):
  """The first `limit` (distance, id) in the stable order."""
  order = np.argsort(cd.astype(np.int64) * (ci.max() + 1 if len(ci) else 1) + ci)[:limit]
  return cd[order], ci[order]


@numba.njit(parallel=True, cache=True)
def _knn(qw, flat, width, subs, offsets, ids, limit):
  nq = qw.shape[0]
  out_d = np.empty((nq, limit), np.int32)
  out_i = np.empty((nq, limit), np.int64)
  for qi in numba.prange(nq):
    cd, ci, _ = _search(qw[qi], flat, width, subs, offsets, ids, limit, 0)
    out_d[qi], out_i[qi] = _stable(cd, ci, limit)
  return out_d, out_i


class MultiIndex:
  """Substring tables over packed uint8 codes (n, bytes): exact k-NN and radius search in the stable order."""

  def __init__(self, codes: np.ndarray, bits: int, subs: np.ndarray, offsets: np.ndarray, ids: np.ndarray):
    self.codes, self.bits = codes, int(bits)
    self.subs, self.offsets, self.ids = np.asarray(subs, np.int64), offsets, ids
    self._words = hamming_kernels.words(codes)

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
    offsets = np.zeros((tables, (1 << int(subs[:, 1].max())) + 1), np.int64)
    ids = np.empty((tables, n), np.int32 if n < 2**31 else np.int64)
    _build(words.reshape(-1), words.shape[1], n, subs, offsets, ids)
    return cls(codes, bits, subs, offsets, ids)

  @property
  def tables(self) -> int:
    return len(self.subs)

  def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances int32 (nq, min(k, n)), ids int64), as `hamming_kernels.knn`."""
    qw = hamming_kernels.words(np.asarray(queries))
    limit = min(int(k), len(self.codes))
    if limit < 1 or len(qw) == 0:
      return np.zeros((len(qw), max(limit, 0)), np.int32), np.zeros((len(qw), max(limit, 0)), np.int64)
    args = (self._words.reshape(-1), self._words.shape[1], self.subs, self.offsets, self.ids)
    if len(qw) < numba.get_num_threads():  # a query takes about a millisecond: no parallel launch for a few
      return tuple(np.stack(x) for x in zip(*(_stable(*_search(q, *args, limit, 0)[:2], limit) for q in qw)))
    with hamming_kernels.LOCK:
      return _knn(qw, *args, limit)

  def radius_search(self, queries: np.ndarray, radius: int):
    """(lims, distances, ids), as `hamming_kernels.radius_search`."""
    qw = hamming_kernels.words(np.asarray(queries))
    w = self._words
    found = [_search(q, w.reshape(-1), w.shape[1], self.subs, self.offsets, self.ids, 0, int(radius))[:2]
             for q in qw] if len(self.codes) else [(np.zeros(0, np.int32), np.zeros(0, np.int64))] * len(qw)
    found = [_stable(cd, ci, len(cd)) for cd, ci in found]
    lims = np.concatenate([[0], np.cumsum([len(cd) for cd, _ in found])]).astype(np.int64)
    return (lims, np.concatenate([cd for cd, _ in found] + [np.zeros(0, np.int32)]),
            np.concatenate([ci for _, ci in found] + [np.zeros(0, np.int64)]))
