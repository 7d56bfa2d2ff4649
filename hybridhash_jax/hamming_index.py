"""A Hamming index of a folder of images: faiss binary indexes, an item table, `index.json`.

Layout of an index directory OUT:
  index.json            what the index is: model fields and bits, checkpoint (or exported encoder) and
                        step, image transform, counts, bit order, kind, skipped files, and the names
                        of the three files below (the commit point of a build);
  index-<v>.faiss       the faiss binary index (`faiss.write_index_binary`): flat, multihash or ivf;
  items-<v>.parquet     the item table: id, path (relative to the images root), size, mtime_ns, label
                        (the class-folder name: the first folder of the path, when there is one);
  codes-<v>.npy         the packed codes, uint8 (n, bits / 8), row = id.
  .staging/             while a build runs: encoded chunks, kept until the build commits.

Bit order (the one of `metrics.pack_codes`): bit b of a code is set when code[b] >= 0, and byte j
holds bits 8j..8j+7, least significant first (`np.packbits(code >= 0, bitorder="little")`). faiss
binary indexes take exactly these bytes; their Hamming distance is the popcount of the XOR.

Builds are incremental (a file whose size and mtime are unchanged keeps its code), atomic (new
files get a new version <v>, and `index.json` is replaced with `os.replace` only once they are
complete, so a killed build leaves the previous index intact) and resumable (every chunk of
encoded images is written to `.staging/` at once; a rerun reuses them). Under `jax.distributed`
each process encodes every process_count-th chunk into the shared staging folder and process 0
merges them (OUT must be on a filesystem all processes see).

Ids are the rows of the item table, sorted by path; a rebuild that adds or drops files renumbers them.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import time

from absl import logging
import numpy as np
from tqdm import tqdm

from hybridhash_jax import checkpoints
from hybridhash_jax import errors
from hybridhash_jax import hamming_kernels
from hybridhash_jax import metrics
from hybridhash_jax.data import images as images_lib

# The `search` extra: the training and evaluation path never imports this module.
faiss = errors.import_extra("faiss", "search")
pa = errors.import_extra("pyarrow", "search")
pq = errors.import_extra("pyarrow.parquet", "search")

INDEX_JSON = "index.json"
STAGING = ".staging"
KINDS = ("flat", "multihash", "ivf")
BIT_ORDER = ("bit b of the code is set when code[b] >= 0; byte j holds bits 8j..8j+7, least significant "
             "first (numpy.packbits(code >= 0, bitorder='little'), as metrics.pack_codes)")
FORMAT = 1
_DECODE_THREADS = 4
# The fields an encoder must share with an index to search it (or to add codes to it).
ENCODER_FIELDS = ("bits",) + checkpoints.MODEL_FIELDS + ("transform.img_size", "transform.crop")


@dataclasses.dataclass
class Hit:
  rank: int
  id: int
  path: str
  distance: int
  label: str | None


def pack(codes: np.ndarray) -> np.ndarray:
  """Real codes (n, bits) -> uint8 (n, bits / 8) in the documented bit order."""
  codes = np.asarray(codes)
  if codes.shape[1] % 8:
    raise ValueError(f"faiss binary indexes need a multiple of 8 bits, got {codes.shape[1]}")
  return metrics.pack_codes(codes).astype("<u4").view(np.uint8)[:, :codes.shape[1] // 8]


def _field(tree: dict, dotted: str):
  for key in dotted.split("."):
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _identity(info: dict) -> dict:
  """What decides the codes: an index built by another identity is re-encoded whole."""
  return {k: info.get(k) for k in ("model", "bits", "checkpoint", "step", "encoder", "transform")}


def _atomic_write(path: str, write) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no index there (build one with python -m hybridhash_jax.index build)")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: corrupt index file ({e})") from e


class HammingIndex:
  """An opened index: faiss search fixed up to the project's stable order, and the item table."""

  def __init__(self, directory: str, info: dict, index, items: dict, codes: np.ndarray):
    self.directory, self.info, self._index, self._items, self._codes = directory, info, index, items, codes
    self.bits = int(info["bits"])

  def __len__(self) -> int:
    return len(self._codes)

  @classmethod
  def open(cls, directory: str) -> "HammingIndex":
    """Reads OUT/index.json and the files it names; a missing or corrupt one is an error naming it."""
    info = _read_json(os.path.join(directory, INDEX_JSON))
    try:
      files, bits, count = info["files"], int(info["bits"]), int(info["count"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{os.path.join(directory, INDEX_JSON)}: corrupt index file (missing {e})") from e
    paths = {k: os.path.join(directory, v) for k, v in files.items()}
    for path in paths.values():
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: index file not found (named in {os.path.join(directory, INDEX_JSON)})")
    try:
      index = faiss.read_index_binary(paths["faiss"])
    except RuntimeError as e:
      raise ValueError(f"{paths['faiss']}: corrupt faiss index ({str(e).splitlines()[-1]})") from e
    try:
      table = pq.read_table(paths["items"]).to_pydict()
    except (pa.ArrowException, OSError) as e:
      raise ValueError(f"{paths['items']}: corrupt item table ({e})") from e
    try:
      codes = np.load(paths["codes"], allow_pickle=False)
    except (ValueError, OSError) as e:
      raise ValueError(f"{paths['codes']}: corrupt codes file ({e})") from e
    for name, n in (("faiss", index.ntotal), ("items", len(table.get("id", []))), ("codes", len(codes))):
      if n != count:
        raise ValueError(f"{paths[name]}: holds {n} items but {INDEX_JSON} says {count}")
    if index.d != bits or codes.shape[1:] != (bits // 8,) or codes.dtype != np.uint8:
      raise ValueError(f"{directory}: the index files do not hold {bits}-bit codes")
    return cls(directory, info, index, table, codes)

  def item(self, id: int) -> dict:
    """{"id", "path" (relative), "size", "mtime" (seconds), "label"}; KeyError for an unknown id."""
    if not 0 <= int(id) < len(self):
      raise KeyError(f"no item {id} in the index {self.directory} ({len(self)} items)")
    i = int(id)
    return {"id": i, "path": self._items["path"][i], "size": self._items["size"][i],
            "mtime": self._items["mtime_ns"][i] / 1e9, "label": self._items["label"][i]}

  def item_path(self, id: int) -> str:
    """The absolute path of an indexed file."""
    return os.path.join(self.info["images"], self.item(id)["path"])

  def codes_of(self, ids) -> np.ndarray:
    """The stored packed codes (uint8 (n, bits / 8)) of some items."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    for i in ids:
      self.item(i)
    return self._codes[ids]

  def _packed(self, codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2:
      raise ValueError(f"query codes must be 2-D, got shape {codes.shape}")
    if codes.dtype == np.uint8 and codes.shape[1] == self.bits // 8:
      return np.ascontiguousarray(codes)
    if codes.shape[1] != self.bits:
      raise ValueError(f"query codes have {codes.shape[1]} bits, the index {self.bits}")
    return pack(codes)

  def _range(self, packed: np.ndarray, radius: int):
    """faiss range search (distance < radius), exact for multihash by flipping enough bits per table."""
    if isinstance(self._index, faiss.IndexBinaryMultiHash):
      self._index.nflip = max(0, -(-radius // self._index.nhash) - 1)
    lims, d, i = self._index.range_search(packed, int(radius))
    return [(d[a:b].astype(np.int64), i[a:b]) for a, b in zip(lims[:-1], lims[1:])]

  def search(self, codes, k: int | None = None, radius: int | None = None) -> list[list[Hit]]:
    """Each query's hits in the stable order (distance, then id): its k first, or all within `radius`.

    faiss's k-NN heap returns some of the items tied at the k-th distance, in no set order; the k-th
    distance found bounds a range search that returns them all, and the stable order picks among
    them, so a flat index gives exactly `metrics.top_indices`. A multihash range search flips enough
    bits per table to be exact, so its k-NN is exact too once its tables yield k candidates; ivf is
    approximate (`nprobe` lists).
    """
    if (k is None) == (radius is None):
      raise ValueError("give exactly one of k and radius")
    packed = self._packed(codes)
    if len(self) == 0 or len(packed) == 0:
      return [[] for _ in packed]
    if radius is not None and radius < 0:
      raise ValueError(f"radius must be >= 0, got {radius}")
    if k is not None and k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    if isinstance(self._index, faiss.IndexBinaryFlat):
      if radius is not None:
        lims, d, i = hamming_kernels.radius_search(packed, self._codes, radius)
        return [self._sorted_hits(d[a:b], i[a:b]) for a, b in zip(lims[:-1], lims[1:])]
      d, i = hamming_kernels.knn(packed, self._codes, k)
      return [self._sorted_hits(dq, iq) for dq, iq in zip(d, i)]
    if radius is not None:
      if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
      found = self._range(packed, radius + 1)
      keep = None
    else:
      if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
      keep = min(int(k), len(self))
      if isinstance(self._index, faiss.IndexBinaryMultiHash):
        self._index.nflip = 0
      d, i = self._index.search(packed, keep)
      kth = np.where(i >= 0, d, -1).max(axis=1)
      found = [None] * len(packed)
      for t in np.unique(kth):  # one range search per k-th distance: everything tied with the k-th item
        rows = np.flatnonzero(kth == t)
        for q, (rd, ri) in zip(rows, self._range(packed[rows], int(t) + 1)):
          ok = i[q] >= 0
          found[q] = (np.concatenate([d[q][ok], rd]), np.concatenate([i[q][ok], ri]))
    return [self._hits(fd, fi, keep) for fd, fi in found]

  def _sorted_hits(self, d: np.ndarray, i: np.ndarray) -> list[Hit]:
    return [Hit(rank=r + 1, id=int(j), path=self._items["path"][j], distance=int(dj), label=self._items["label"][j])
            for r, (dj, j) in enumerate(zip(d.tolist(), i.tolist()))]

  def _hits(self, d: np.ndarray, i: np.ndarray, keep: int | None) -> list[Hit]:
    i, first = np.unique(i, return_index=True)  # approximate kinds may find an item twice
    d = d[first]
    order = np.lexsort((i, d))[:keep]
    return [Hit(rank=r + 1, id=int(i[j]), path=self._items["path"][i[j]], distance=int(d[j]),
                label=self._items["label"][i[j]]) for r, j in enumerate(order)]

  def check_encoder(self, encoder) -> None:
    """Refuses an encoder of another model than the index's, naming each differing field."""
    diffs = [f"{f}: index has {_field(self.info, f)!r}, encoder has {_field(encoder.info, f)!r}"
             for f in ENCODER_FIELDS if _field(self.info, f) != _field(encoder.info, f)]
    if diffs:
      raise ValueError(f"the encoder ({encoder.info.get('encoder') or encoder.info.get('checkpoint')}) is not the "
                       f"model of the index {self.directory}:\n  " + "\n  ".join(diffs))


# ---------------------------------------------------------------------------------------------------- building


def scan(images: str) -> tuple[str, list[str], list[tuple[str, str]]]:
  """(root, image paths relative to root, [(path, reason)] of listed files that are missing).

  `images` is a folder (searched recursively; hidden entries skipped, image extensions only) or a
  list file of paths, one a line, relative to its own folder or absolute.
  """
  if os.path.isdir(images):
    root, found = os.path.abspath(images), []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      found += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames
                if not f.startswith(".") and f.lower().endswith(images_lib.EXTENSIONS)]
    return root, sorted(found), []
  if not os.path.isfile(images):
    raise FileNotFoundError(f"--images={images}: neither a folder nor a list file")
  root = os.path.dirname(os.path.abspath(images))
  with open(images, encoding="utf-8") as f:
    listed = [os.path.relpath(os.path.join(root, line.strip()), root) for line in f if line.strip()]
  present = [p for p in listed if os.path.isfile(os.path.join(root, p))]
  return root, sorted(set(present)), [(os.path.join(root, p), "file not found") for p in listed if p not in present]


def _label(rel: str) -> str | None:
  parts = rel.split(os.sep)
  return parts[0] if len(parts) > 1 else None


def _load_image(encoder, path: str):
  try:
    return encoder.preprocess(images_lib.decode(path)), None
  except images_lib.BadImageError as e:
    return None, str(e)


class _Staging:
  """`.staging/`: encoded chunks of one encoder's build, each written at once (atomically)."""

  def __init__(self, out: str, identity: dict, process_index: int):
    self.dir = os.path.join(out, STAGING)
    manifest = os.path.join(self.dir, "manifest.json")
    if process_index == 0:
      if os.path.isdir(self.dir):
        try:
          with open(manifest, encoding="utf-8") as f:
            same = json.load(f) == identity
        except (OSError, ValueError):
          same = False
        if not same:
          logging.info("discarding %s: staged by another encoder", self.dir)
          shutil.rmtree(self.dir)
      os.makedirs(self.dir, exist_ok=True)
      _atomic_write(manifest, lambda f: f.write(json.dumps(identity).encode("utf-8")))

  def chunks(self) -> dict:
    """path -> (size, mtime_ns, packed code or None, skip reason or None), over every staged chunk."""
    out = {}
    for name in sorted(os.listdir(self.dir)):
      if not name.endswith(".npz"):
        continue
      with np.load(os.path.join(self.dir, name), allow_pickle=False) as z:
        reasons = json.loads(z["reasons"].tobytes().decode("utf-8"))
        for j, path in enumerate(z["paths"].tolist()):
          ok = reasons[j] is None
          out[path] = (int(z["size"][j]), int(z["mtime_ns"][j]), z["codes"][j] if ok else None, reasons[j])
    return out

  def write(self, paths, stats, codes, reasons) -> str:
    name = hashlib.sha1("\n".join(paths).encode("utf-8")).hexdigest()[:20] + ".npz"
    path = os.path.join(self.dir, name)
    _atomic_write(path, lambda f: np.savez(
        f, paths=np.asarray(paths, dtype=str), size=np.asarray([s[0] for s in stats], np.int64),
        mtime_ns=np.asarray([s[1] for s in stats], np.int64), codes=codes,
        reasons=np.frombuffer(json.dumps(reasons).encode("utf-8"), np.uint8)))
    return path


def make_faiss(kind: str, bits: int, codes: np.ndarray, nhash: int | None, nlist: int | None):
  if kind == "flat":
    index, params = faiss.IndexBinaryFlat(bits), {}
  elif kind == "multihash":
    nhash = nhash or max(1, bits // 16)  # tables of 16-bit substrings
    if bits % nhash:
      raise ValueError(f"--nhash={nhash} must divide the {bits} bits")
    index, params = faiss.IndexBinaryMultiHash(bits, nhash, bits // nhash), {"nhash": nhash, "b": bits // nhash}
  elif kind == "ivf":
    nlist = max(1, min(nlist or int(4 * np.sqrt(max(len(codes), 1))), len(codes)))
    quantizer = faiss.IndexBinaryFlat(bits)
    index = faiss.IndexBinaryIVF(quantizer, bits, nlist)
    index.train(codes)
    index.nprobe = min(nlist, 16)
    params = {"nlist": nlist, "nprobe": index.nprobe}
  else:
    raise ValueError(f"--kind={kind!r} is not one of {KINDS}")
  if len(codes):
    index.add(codes)
  return index, params


def build(encoder, images: str, out: str, *, kind: str = "flat", chunk_size: int = 1024, nhash: int | None = None,
          nlist: int | None = None, process_index: int = 0, process_count: int = 1, barrier=None,
          progress: bool = True) -> dict:
  """Encodes the new and changed images under `images` into the index OUT (created or updated); returns index.json.

  `barrier(name)` synchronises the processes of a multi-process build (each encodes its share of
  the chunks; process 0 then writes the index).
  """
  if kind not in KINDS:
    raise ValueError(f"--kind={kind!r} is not one of {KINDS}")
  if encoder.bits % 8:
    raise ValueError(f"faiss binary indexes need a multiple of 8 bits; the encoder has {encoder.bits}")
  t0 = time.perf_counter()
  root, rels, missing = scan(images)
  os.makedirs(out, exist_ok=True)
  info = {"bits": encoder.bits, **{k: encoder.info.get(k) for k in ("model", "checkpoint", "step", "encoder",
                                                                     "transform")}}
  identity = _identity(info)
  previous = {}
  if os.path.exists(os.path.join(out, INDEX_JSON)):
    old = HammingIndex.open(out)
    if _identity(old.info) == identity and old.info.get("images") == root:
      previous = {p: (s, m, old._codes[i]) for i, (p, s, m) in enumerate(
          zip(old._items["path"], old._items["size"], old._items["mtime_ns"]))}
    else:
      logging.info("%s was built by another encoder or from other images: re-encoding everything", out)
  staging = _Staging(out, {**identity, "images": root}, process_index)
  if barrier:
    barrier("index-staging")
  stats = {}
  for rel in rels:
    st = os.stat(os.path.join(root, rel))
    stats[rel] = (st.st_size, st.st_mtime_ns)
  staged = staging.chunks()
  if barrier:
    barrier("index-scanned")  # every process has read the same staged chunks before any adds one
  fresh = [r for r in rels if not (r in previous and previous[r][:2] == stats[r])]
  todo = [r for r in fresh if not (r in staged and staged[r][:2] == stats[r])]
  resumed = len(fresh) - len(todo)  # encoded by an earlier, interrupted build
  chunks = [todo[i:i + chunk_size] for i in range(0, len(todo), chunk_size)][process_index::process_count]
  n_mine = sum(map(len, chunks))
  logging.info("%d images under %s: %d to encode (%d by this process)", len(rels), root, len(todo), n_mine)
  bar = tqdm(total=n_mine, unit="img", desc=f"encoding (process {process_index})", disable=not progress)
  with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
    for chunk in chunks:
      loaded = list(pool.map(lambda r: _load_image(encoder, os.path.join(root, r)), chunk))
      good = [j for j, (img, _) in enumerate(loaded) if img is not None]
      codes = np.zeros((len(chunk), encoder.bits // 8), np.uint8)
      if good:
        codes[good] = pack(encoder.encode(np.stack([loaded[j][0] for j in good])))
      staging.write(chunk, [stats[r] for r in chunk], codes, [reason for _, reason in loaded])
      bar.update(len(chunk))
  bar.close()
  if barrier:
    barrier("index-encoded")
  result = None
  if process_index == 0:
    result = _commit(out, root, rels, stats, previous, staging, info, kind, nhash, nlist, missing,
                     {"encoded": len(todo), "resumed": resumed, "seconds": round(time.perf_counter() - t0, 3)})
  if barrier:
    barrier("index-written")
  return result if result is not None else _read_json(os.path.join(out, INDEX_JSON))


def _commit(out, root, rels, stats, previous, staging, info, kind, nhash, nlist, missing, build_stats) -> dict:
  """Writes the new version's files, then replaces index.json (the commit), then removes what it replaced."""
  staged = staging.chunks()
  paths, codes, skipped = [], [], [list(m) for m in missing]
  for rel in rels:
    if rel in staged and staged[rel][:2] == stats[rel]:
      code, reason = staged[rel][2], staged[rel][3]
    elif rel in previous and previous[rel][:2] == stats[rel]:
      code, reason = previous[rel][2], None
    else:
      raise RuntimeError(f"{rel} was neither staged nor indexed; was the build's staging folder removed?")
    if reason is not None:
      skipped.append([os.path.join(root, rel), reason])
    else:
      paths.append(rel)
      codes.append(code)
  codes = np.stack(codes) if codes else np.zeros((0, info["bits"] // 8), np.uint8)
  index, params = make_faiss(kind, info["bits"], codes, nhash, nlist)
  version = f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(4)}"
  files = {"faiss": f"index-{version}.faiss", "items": f"items-{version}.parquet", "codes": f"codes-{version}.npy"}
  tmp = os.path.join(out, files["faiss"] + ".tmp")
  faiss.write_index_binary(index, tmp)
  os.replace(tmp, os.path.join(out, files["faiss"]))
  table = pa.table({"id": np.arange(len(paths), dtype=np.int64), "path": paths,
                    "size": np.asarray([stats[p][0] for p in paths], np.int64),
                    "mtime_ns": np.asarray([stats[p][1] for p in paths], np.int64),
                    "label": [_label(p) for p in paths]})
  _atomic_write(os.path.join(out, files["items"]), lambda f: pq.write_table(table, f))
  _atomic_write(os.path.join(out, files["codes"]), lambda f: np.save(f, codes))
  labels = sorted({_label(p) for p in paths} - {None})
  new = {"format": FORMAT, "kind": kind, "params": params, **info, "bit_order": BIT_ORDER, "images": root,
         "count": len(paths), "num_labels": len(labels), "skipped": skipped, "files": files,
         "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build": build_stats}
  _atomic_write(os.path.join(out, INDEX_JSON), lambda f: f.write(json.dumps(new, indent=2).encode("utf-8")))
  keep = set(files.values()) | {INDEX_JSON}
  for name in os.listdir(out):
    if name not in keep and (name.startswith(("index-", "items-", "codes-")) or ".tmp" in name):
      os.remove(os.path.join(out, name))
  shutil.rmtree(staging.dir)
  for path, reason in skipped:
    logging.warning("skipped %s: %s", path, reason)
  return new


# ---------------------------------------------------------------------------------------------------- interchange


def export(index: HammingIndex, output: str, fmt: str) -> list[str]:
  """Writes ids, paths, labels and packed codes (bytes, the documented bit order) for other engines.

  parquet: one file, columns id (int64), path (string), label (string), code (fixed-size binary of
  bits / 8 bytes). npy: a folder of ids.npy (int64), codes.npy (uint8 (n, bits / 8)), paths.npy and
  labels.npy (unicode; "" for no label). Both sit beside a copy of index.json (`bit_order` says the layout).
  """
  n = len(index)
  ids = np.arange(n, dtype=np.int64)
  paths = [index.item(i)["path"] for i in range(n)]
  labels = [index.item(i)["label"] for i in range(n)]
  codes = index.codes_of(ids)
  if fmt == "parquet":
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    code_type = pa.binary(index.bits // 8)
    table = pa.table({"id": ids, "path": paths, "label": labels,
                      "code": pa.array([c.tobytes() for c in codes], type=code_type)},
                     metadata={"hybridhash": json.dumps({"bits": index.bits, "bit_order": BIT_ORDER})})
    pq.write_table(table, output)
    written = [output]
  elif fmt == "npy":
    os.makedirs(output, exist_ok=True)
    written = []
    for name, arr in (("ids", ids), ("codes", codes), ("paths", np.asarray(paths, dtype=str)),
                      ("labels", np.asarray([l or "" for l in labels], dtype=str))):
      written.append(os.path.join(output, f"{name}.npy"))
      np.save(written[-1], arr)
  else:
    raise ValueError(f"--format={fmt!r} is not one of ('parquet', 'npy')")
  meta = output + ".index.json" if fmt == "parquet" else os.path.join(output, INDEX_JSON)
  with open(meta, "w", encoding="utf-8") as f:
    json.dump(index.info, f, indent=2)
  return written + [meta]
