"""A Hamming index: packed codes searched exactly in the stable order, an item table, `index.json`.

Layout of an index directory OUT:
  index.json             what the index is: bits, kind and its parameters, counts, bit order, the
                         names of its files (the commit point of a build); for an index of images,
                         model fields, checkpoint (or exported encoder) and step, image transform,
                         images root and skipped files;
  codes-<v>.npy          the packed codes, uint8 (n, bits / 8), row = id (memory-mapped when opened);
  items-<v>.parquet      the item table, when there is one: id, path, label (and, for images, size
                         and mtime_ns; the label is the class-folder name, the first folder of the path);
  mih-ids-<v>.npy,       multihash: the substring tables of `multi_index` and the codes in each
  mih-offsets-<v>.npy,   table's order (memory-mapped);
  mih-codes-<v>.npy
  index-<v>.faiss        ivf: the faiss binary index.

Search: flat indexes with `hamming_kernels`, multihash with `multi_index` (both exact, in the stable
order: distance, then id), ivf with faiss (approximate; ties at the k-th distance put in the stable
order). Building is `index_build`, export to other engines `index_io`.

Bit order (the one of `metrics.pack_codes`): bit b of a code is set when code[b] >= 0, and byte j
holds bits 8j..8j+7, least significant first (`np.packbits(code >= 0, bitorder="little")`). faiss
binary indexes take exactly these bytes; their Hamming distance is the popcount of the XOR.

Index directories are local: codes and tables are memory-mapped, which needs a local file system.
"""

import dataclasses
import json
import os

import numpy as np

from hybridhash_jax import checkpoints
from hybridhash_jax import errors
from hybridhash_jax import hamming_kernels
from hybridhash_jax import metrics
from hybridhash_jax import multi_index

# The `search` extra: the training and evaluation path never imports this module.
faiss = errors.import_extra("faiss", "search")
pa = errors.import_extra("pyarrow", "search")
pq = errors.import_extra("pyarrow.parquet", "search")

INDEX_JSON = "index.json"
KINDS = ("flat", "multihash", "ivf")
BIT_ORDER = ("bit b of the code is set when code[b] >= 0; byte j holds bits 8j..8j+7, least significant "
             "first (numpy.packbits(code >= 0, bitorder='little'), as metrics.pack_codes)")
FORMAT = 3
# The fields an encoder must share with an index to search it (or to add codes to it).
ENCODER_FIELDS = ("bits",) + checkpoints.MODEL_FIELDS + ("transform.img_size", "transform.crop")


@dataclasses.dataclass
class Hit:
  rank: int
  id: int
  path: str | None
  distance: int
  label: str | None


def pack(codes: np.ndarray) -> np.ndarray:
  """Real codes (n, bits) -> uint8 (n, bits / 8) in the documented bit order."""
  codes = np.asarray(codes)
  if codes.shape[1] % 8:
    raise ValueError(f"packed codes need a multiple of 8 bits, got {codes.shape[1]}")
  return metrics.pack_codes(codes).astype("<u4").view(np.uint8)[:, :codes.shape[1] // 8]


def field(tree: dict, dotted: str):
  """tree["a"]["b"] for "a.b", None where a key is missing."""
  for key in dotted.split("."):
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise errors.NotFoundError(f"{path}: no index there (build one with python -m hybridhash_jax.index build)")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise errors.DataError(f"{path}: corrupt index file ({e})") from e


def _load_npy(path: str, what: str) -> np.ndarray:
  try:
    return np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError) as e:
    raise errors.DataError(f"{path}: corrupt {what} file ({e})") from e


class HammingIndex:
  """An opened index: exact search in the stable order over its codes, and the item table."""

  def __init__(self, directory: str, info: dict, codes: np.ndarray, items=None, searcher=None):
    """`items`: a pyarrow table (or a dict of columns) with path and label, or None; `searcher`: the kind's
    `multi_index.MultiIndex` or faiss index (None for flat)."""
    self.directory, self.info, self.bits = directory, info, int(info["bits"])
    self.kind = info.get("kind", "flat")
    self._codes, self._searcher = codes, searcher
    self._items = pa.table(items) if isinstance(items, dict) else items

  @classmethod
  def in_memory(cls, codes: np.ndarray, bits: int, kind: str = "flat", items=None, **params) -> "HammingIndex":
    """An index over packed codes without a directory (tests, benchmarks); params as `index_build.searcher`."""
    from hybridhash_jax import index_build  # index_build opens indexes: imported on use
    searcher, params = index_build.searcher(kind, bits, codes, **params)
    return cls("(memory)", {"bits": bits, "kind": kind, "params": params}, codes, items, searcher)

  def __len__(self) -> int:
    return len(self._codes)

  @property
  def codes(self) -> np.ndarray:
    """The packed codes, uint8 (n, bits / 8), row = id (memory-mapped for an opened index: do not write)."""
    return self._codes

  @property
  def items(self):
    """The item table (a pyarrow Table: id, path, label, ...), or None for an index of codes alone."""
    return self._table()

  @property
  def searcher(self):
    """The kind's search structure: a `multi_index.MultiIndex`, a faiss index (ivf), or None (flat)."""
    return self._searcher

  @classmethod
  def open(cls, directory: str) -> "HammingIndex":
    """Reads OUT/index.json and maps the files it names; a missing or corrupt one is an error naming it.

    Nothing is read whole: codes and tables are memory-mapped, the item table is read on first use."""
    meta = os.path.join(directory, INDEX_JSON)
    info = read_json(meta)
    try:
      files, bits, count, kind = info["files"], int(info["bits"]), int(info["count"]), info.get("kind", "flat")
    except (KeyError, TypeError, ValueError) as e:
      raise errors.DataError(f"{meta}: corrupt index file (missing {e})") from e
    paths = {k: os.path.join(directory, v) for k, v in files.items()}
    for path in paths.values():
      if not os.path.isfile(path):
        raise errors.NotFoundError(f"{path}: index file not found (named in {meta})")
    codes = _load_npy(paths["codes"], "codes")
    sizes = {"codes": len(codes)}
    items = None
    if "items" in paths:
      try:
        items = pq.ParquetFile(paths["items"])
        sizes["items"] = items.metadata.num_rows
      except (pa.ArrowException, OSError) as e:
        raise errors.DataError(f"{paths['items']}: corrupt item table ({e})") from e
    if codes.shape[1:] != (bits // 8,) or codes.dtype != np.uint8:
      raise errors.DataError(f"{paths['codes']}: does not hold {bits}-bit packed codes (uint8 (n, {bits // 8}))")
    searcher = None
    if kind == "ivf":
      try:
        searcher = faiss.read_index_binary(paths["faiss"])
      except RuntimeError as e:
        raise errors.DataError(f"{paths['faiss']}: corrupt faiss index ({str(e).splitlines()[-1]})") from e
      sizes["faiss"] = searcher.ntotal
    elif kind == "multihash" and "mih_codes" in paths:
      ids, offsets = _load_npy(paths["mih_ids"], "table"), _load_npy(paths["mih_offsets"], "table")
      table_codes = _load_npy(paths["mih_codes"], "table")
      subs = np.asarray(info["params"]["substrings"], np.int64)
      for name, array, shape in (("mih_ids", ids, (len(subs), count)),
                                 ("mih_codes", table_codes, (len(subs), count, -(-bits // 64)))):
        if array.shape != shape:
          raise errors.DataError(f"{paths[name]}: tables of another index ({array.shape}, {len(subs)} substrings)")
      if offsets.shape[0] != len(subs):
        raise errors.DataError(f"{paths['mih_offsets']}: tables of another index ({offsets.shape}, {len(subs)} "
                               "substrings)")
      searcher = multi_index.MultiIndex(codes, bits, subs, offsets, ids, table_codes)
    elif kind == "multihash":  # formats 1 and 2 (no codes in table order): the tables are built in memory
      searcher = multi_index.MultiIndex.build(codes, bits, info.get("params", {}).get("tables"))
    for name, n in sizes.items():
      if n != count:
        raise errors.DataError(f"{paths[name]}: holds {n} items but {INDEX_JSON} says {count}")
    return cls(directory, info, codes, items, searcher)

  def _table(self):
    if isinstance(self._items, pq.ParquetFile):  # read on first use: opening stays cheap at any size
      self._items = self._items.read()
    return self._items

  def _item_fields(self, i: int) -> tuple[str | None, str | None]:
    table = self._table()
    if table is None:
      return None, None
    return table.column("path")[i].as_py(), table.column("label")[i].as_py()

  def item(self, id: int) -> dict:
    """{"id", "path", "label"} (and for images, "size", "mtime" in seconds); KeyError for an unknown id."""
    if not 0 <= int(id) < len(self):
      raise errors.NoSuchItemError(f"no item {id} in the index {self.directory} ({len(self)} items)")
    i = int(id)
    path, label = self._item_fields(i)
    out = {"id": i, "path": path, "label": label}
    table = self._table()
    if table is not None and "size" in table.column_names:
      out.update(size=table.column("size")[i].as_py(), mtime=table.column("mtime_ns")[i].as_py() / 1e9)
    return out

  def item_path(self, id: int) -> str:
    """The absolute path of an indexed file."""
    item = self.item(id)
    if "images" not in self.info or item["path"] is None:
      raise errors.NoSuchItemError(f"the index {self.directory} holds codes, not images: item {id} has no file")
    return os.path.join(self.info["images"], item["path"])

  def codes_of(self, ids) -> np.ndarray:
    """The stored packed codes (uint8 (n, bits / 8)) of some items."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    bad = ids[(ids < 0) | (ids >= len(self))]
    if len(bad):
      self.item(bad[0])
    return np.asarray(self._codes[ids])

  def _packed(self, codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2:
      raise ValueError(f"query codes must be 2-D, got shape {codes.shape}")
    if codes.dtype == np.uint8 and codes.shape[1] == self.bits // 8:
      return np.ascontiguousarray(codes)
    if codes.shape[1] != self.bits:
      raise ValueError(f"query codes have {codes.shape[1]} bits, the index {self.bits}")
    return pack(codes)

  def search(self, codes, k: int | None = None, radius: int | None = None) -> list[list[Hit]]:
    """Each query's hits in the stable order (distance, then id): its k first, or all within `radius`.

    Flat and multihash are exact (equal to `metrics.top_indices`, ties included). ivf is approximate
    (`nprobe` lists): faiss's k-NN returns some of the items tied at the k-th distance in no set order,
    so the k-th distance found bounds a range search that returns them all and the stable order picks.
    """
    if (k is None) == (radius is None):
      raise ValueError("give exactly one of k and radius")
    if radius is not None and radius < 0:
      raise ValueError(f"radius must be >= 0, got {radius}")
    if k is not None and k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    packed = self._packed(codes)
    if len(self) == 0 or len(packed) == 0:
      return [[] for _ in packed]
    if self.kind == "ivf":
      return [self._hits(d, i) for d, i in _faiss_search(self._searcher, packed, k, radius)]
    if self.kind == "multihash":
      knn, ranged = self._searcher.knn, self._searcher.radius_search
    else:
      knn = lambda q, k: hamming_kernels.knn(q, self._codes, k)
      ranged = lambda q, r: hamming_kernels.radius_search(q, self._codes, r)
    if radius is not None:
      lims, d, i = ranged(packed, radius)
      return [self._hits(d[a:b], i[a:b]) for a, b in zip(lims[:-1], lims[1:])]
    return [self._hits(dq, iq) for dq, iq in zip(*knn(packed, k))]

  def _hits(self, d: np.ndarray, i: np.ndarray) -> list[Hit]:
    fields = [self._item_fields(j) for j in i.tolist()]
    return [Hit(rank=r + 1, id=j, path=p, distance=dj, label=lab)
            for r, (dj, j, (p, lab)) in enumerate(zip(d.tolist(), i.tolist(), fields))]

  def check_encoder(self, encoder) -> None:
    """Refuses an encoder of another model than the index's, naming each differing field."""
    diffs = [f"{f}: index has {field(self.info, f)!r}, encoder has {field(encoder.info, f)!r}"
             for f in ENCODER_FIELDS if field(self.info, f) != field(encoder.info, f)]
    if diffs:
      which = encoder.info.get("encoder") or encoder.info.get("checkpoint")
      raise errors.ConfigError(f"the encoder ({which}) is not the "
                               f"model of the index {self.directory}:\n  " + "\n  ".join(diffs))


def _faiss_search(index, packed: np.ndarray, k: int | None, radius: int | None):
  """Per query (distances, ids) in the stable order, deduplicated, from a faiss index's k-NN or range search."""
  def ranged(rows, below):
    lims, d, i = index.range_search(rows, int(below))
    return [(d[a:b].astype(np.int64), i[a:b]) for a, b in zip(lims[:-1], lims[1:])]

  if radius is not None:
    found, keep = ranged(packed, radius + 1), None
  else:
    keep = min(int(k), index.ntotal)
    d, i = index.search(packed, keep)
    kth = np.where(i >= 0, d, -1).max(axis=1)
    found = [None] * len(packed)
    for t in np.unique(kth):  # one range search per k-th distance: everything tied with the k-th item
      rows = np.flatnonzero(kth == t)
      for q, (rd, ri) in zip(rows, ranged(packed[rows], int(t) + 1)):
        ok = i[q] >= 0
        found[q] = (np.concatenate([d[q][ok], rd]), np.concatenate([i[q][ok], ri]))
  out = []
  for d, i in found:
    i, first = np.unique(i, return_index=True)  # the k-NN and the range search find an item twice
    order = np.lexsort((i, d[first]))[:keep]
    out.append((d[first][order], i[order]))
  return out
