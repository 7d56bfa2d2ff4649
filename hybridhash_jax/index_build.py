"""Building Hamming indexes (see `hamming_index` for the layout): from a folder of images, or from packed codes.

Builds of images are incremental (a file whose size and mtime are unchanged keeps its code), atomic
(new files get a new version <v>, and `index.json` is replaced only once they are complete, so a
killed build leaves the previous index intact) and resumable (every chunk of encoded images is
written to `.staging/` at once; a rerun reuses them). Under `jax.distributed` each process encodes
every process_count-th chunk into the shared staging folder and process 0 merges them (OUT must be
on a filesystem all processes see). Ids are the rows of the item table, sorted by path; a rebuild
that adds or drops files renumbers them.

A build from codes (`build_from_codes`) takes packed uint8 codes (n, bits / 8) in the documented bit
order, ids = rows, and an optional item table. Every file is written through `files` (whole or not
at all).
"""

import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
import time

from absl import logging
import numpy as np
from tqdm import tqdm

from hybridhash_jax import errors
from hybridhash_jax import files
from hybridhash_jax import hamming_index
from hybridhash_jax import host_ranking
from hybridhash_jax import multi_index
from hybridhash_jax.data import images as images_lib
from hybridhash_jax.hamming_index import faiss, pa, pq

STAGING = ".staging"
# Decoding (PIL releases the GIL) runs on every core while the encoder waits on the accelerator.
_DECODE_THREADS = host_ranking.threads()


def searcher(kind: str, bits: int, codes: np.ndarray, nhash: int | None = None, nlist: int | None = None):
  """(the kind's search structure, its parameters for index.json) over packed codes.

  ivf: nlist = 4 sqrt(n) lists (the low end of faiss's guideline, 4 to 16 sqrt(n): training and
  adding cost n * nlist), nprobe = 16, which makes the codes a query scans in its lists
  (nprobe * n / nlist = 4 sqrt(n)) as many as the centroids it ranks first (nlist = 4 sqrt(n))."""
  if kind == "flat":
    return None, {}
  if kind == "multihash":
    mih = multi_index.MultiIndex.build(codes, bits, nhash)
    return mih, {"tables": mih.tables, "substrings": mih.subs.tolist()}
  if kind == "ivf":
    nlist = max(1, min(nlist or int(4 * math.sqrt(max(len(codes), 1))), len(codes)))
    index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(bits), bits, nlist)
    index.train(codes)
    index.nprobe = min(nlist, 16)
    if len(codes):
      index.add(codes)
    return index, {"nlist": nlist, "nprobe": index.nprobe}
  raise errors.ConfigError(f"--kind={kind!r} is not one of {hamming_index.KINDS}")


def _save_npy(path: str, array: np.ndarray) -> None:
  files.write_stream(path, lambda f: np.save(f, array))


def write_version(out: str, codes: np.ndarray, table, info: dict, kind: str, nhash=None, nlist=None,
                  started: float | None = None) -> dict:
  """Writes a new version's files, then replaces index.json (the commit), then removes what it replaced.

  `table`: the item table (pyarrow) or None; `info`: what index.json says besides the kind, counts and files;
  `started`: the build's perf_counter start, for its seconds and codes/s in index.json["build"]."""
  bits = int(info["bits"])
  index, params = searcher(kind, bits, codes, nhash, nlist)
  version = f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(4)}"
  names = {"codes": f"codes-{version}.npy"}
  try:
    _save_npy(os.path.join(out, names["codes"]), codes)
    if table is not None:
      names["items"] = f"items-{version}.parquet"
      files.write_stream(os.path.join(out, names["items"]), lambda f: pq.write_table(table, f))
    if kind == "multihash":
      for name, array in (("ids", index.ids), ("offsets", index.offsets), ("codes", index.table_codes)):
        names[f"mih_{name}"] = f"mih-{name}-{version}.npy"
        _save_npy(os.path.join(out, names[f"mih_{name}"]), array)
    elif kind == "ivf":
      names["faiss"] = f"index-{version}.faiss"
      files.write_bytes(os.path.join(out, names["faiss"]), faiss.serialize_index_binary(index).tobytes())
    new = {"format": hamming_index.FORMAT, "kind": kind, "params": params, **info,
           "bit_order": hamming_index.BIT_ORDER, "count": len(codes), "files": names,
           "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if started is not None:
      seconds = time.perf_counter() - started
      new["build"] = {**info.get("build", {}), "seconds": round(seconds, 3),
                      "codes_per_s": round(len(codes) / seconds)}
    files.write_json(os.path.join(out, hamming_index.INDEX_JSON), new, indent=2)
  except BaseException:  # the old index.json still names the old files: the new version's are only in the way
    for name in names.values():
      with contextlib.suppress(OSError):
        os.remove(os.path.join(out, name))
    raise
  keep = set(names.values()) | {hamming_index.INDEX_JSON}
  for name in os.listdir(out):
    if name not in keep and (name.startswith(("index-", "items-", "codes-", "mih-")) or ".tmp" in name):
      os.remove(os.path.join(out, name))
  return new


# ---------------------------------------------------------------------------------------------------- from codes


def _read_codes(path: str) -> np.ndarray:
  try:
    codes = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError) as e:
    raise errors.DataError(f"--codes={path}: not a .npy file of packed codes ({e})") from e
  if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] == 0:
    raise errors.DataError(f"--codes={path}: packed codes are uint8 (n, bits / 8); this file holds {codes.dtype} "
                           f"{codes.shape}")
  return codes


def _read_items(path: str, n: int):
  try:
    table = pq.read_table(path)
  except (pa.ArrowException, OSError) as e:
    raise errors.DataError(f"--items={path}: not a parquet file ({e})") from e
  if "path" not in table.column_names:
    raise errors.DataError(f"--items={path}: no column 'path' (columns: {', '.join(table.column_names)})")
  if table.num_rows != n:
    raise errors.DataError(f"--items={path}: {table.num_rows} rows, but the codes file has {n} codes")
  label = table.column("label").cast(pa.string()) if "label" in table.column_names else pa.nulls(n, pa.string())
  return pa.table({"id": np.arange(n, dtype=np.int64), "path": table.column("path").cast(pa.string()),
                   "label": label})


def build_from_codes(codes_path: str, out: str, *, kind: str = "flat", items: str | None = None,
                     nhash: int | None = None, nlist: int | None = None) -> dict:
  """An index of packed codes (ids = rows), with the item table `items` (parquet: path, label) if given."""
  if kind not in hamming_index.KINDS:
    raise errors.ConfigError(f"--kind={kind!r} is not one of {hamming_index.KINDS}")
  t0 = time.perf_counter()
  codes = _read_codes(codes_path)
  table = _read_items(items, len(codes)) if items else None
  os.makedirs(out, exist_ok=True)
  info = {"bits": 8 * codes.shape[1], "codes_source": os.path.abspath(codes_path)}
  return write_version(out, codes, table, info, kind, nhash, nlist, started=t0)


# ---------------------------------------------------------------------------------------------------- from images


def _identity(info: dict) -> dict:
  """What decides the codes: an index built by another identity is re-encoded whole."""
  return {k: info.get(k) for k in ("model", "bits", "checkpoint", "step", "encoder", "transform")}


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
    raise errors.NotFoundError(f"--images={images}: neither a folder nor a list file")
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
          same = files.read_json(manifest) == identity
        except (OSError, ValueError):
          same = False
        if not same:
          logging.info("discarding %s: staged by another encoder", self.dir)
          shutil.rmtree(self.dir)
      os.makedirs(self.dir, exist_ok=True)
      files.write_json(manifest, identity)

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
    files.write_stream(path, lambda f: np.savez(
        f, paths=np.asarray(paths, dtype=str), size=np.asarray([s[0] for s in stats], np.int64),
        mtime_ns=np.asarray([s[1] for s in stats], np.int64), codes=codes,
        reasons=np.frombuffer(json.dumps(reasons).encode("utf-8"), np.uint8)))
    return path


def build(encoder, images: str, out: str, *, kind: str = "flat", chunk_size: int = 1024, nhash: int | None = None,
          nlist: int | None = None, process_index: int = 0, process_count: int = 1, barrier=None,
          progress: bool = True) -> dict:
  """Encodes the new and changed images under `images` into the index OUT (created or updated); returns index.json.

  `barrier(name)` synchronises the processes of a multi-process build (each encodes its share of
  the chunks; process 0 then writes the index).
  """
  if kind not in hamming_index.KINDS:
    raise errors.ConfigError(f"--kind={kind!r} is not one of {hamming_index.KINDS}")
  if encoder.bits % 8:
    raise errors.ConfigError(f"packed codes need a multiple of 8 bits; the encoder has {encoder.bits}")
  t0 = time.perf_counter()
  root, rels, missing = scan(images)
  os.makedirs(out, exist_ok=True)
  info = {"bits": encoder.bits, **{k: encoder.info.get(k) for k in ("model", "checkpoint", "step", "encoder",
                                                                     "transform")}}
  identity = _identity(info)
  previous = {}
  if os.path.exists(os.path.join(out, hamming_index.INDEX_JSON)):
    old = hamming_index.HammingIndex.open(out)
    if _identity(old.info) == identity and old.info.get("images") == root and old.items is not None:
      table = old.items
      previous = {p: (s, m, old.codes[i]) for i, (p, s, m) in enumerate(zip(
          table.column("path").to_pylist(), table.column("size").to_pylist(), table.column("mtime_ns").to_pylist()))}
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
  with (tqdm(total=n_mine, unit="img", desc=f"encoding (process {process_index})", disable=not progress) as bar,
        concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool):
    for chunk in chunks:
      loaded = list(pool.map(lambda r: _load_image(encoder, os.path.join(root, r)), chunk))
      good = [j for j, (img, _) in enumerate(loaded) if img is not None]
      codes = np.zeros((len(chunk), encoder.bits // 8), np.uint8)
      if good:
        codes[good] = hamming_index.pack(encoder.encode(np.stack([loaded[j][0] for j in good])))
      staging.write(chunk, [stats[r] for r in chunk], codes, [reason for _, reason in loaded])
      bar.update(len(chunk))
  if barrier:
    barrier("index-encoded")
  result = None
  if process_index == 0:
    result = _commit(out, root, rels, stats, previous, staging, info, kind, nhash, nlist, missing,
                     {"encoded": len(todo), "resumed": resumed}, t0)
  if barrier:
    barrier("index-written")
  return result if result is not None else hamming_index.read_json(os.path.join(out, hamming_index.INDEX_JSON))


def _commit(out, root, rels, stats, previous, staging, info, kind, nhash, nlist, missing, build_stats, started):
  """The staged and kept codes of every image, in path order, as a new version of the index."""
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
  table = pa.table({"id": np.arange(len(paths), dtype=np.int64), "path": paths,
                    "size": np.asarray([stats[p][0] for p in paths], np.int64),
                    "mtime_ns": np.asarray([stats[p][1] for p in paths], np.int64),
                    "label": pa.array([_label(p) for p in paths], pa.string())})
  labels = sorted({_label(p) for p in paths} - {None})
  new = write_version(out, codes, table, {**info, "images": root, "num_labels": len(labels), "skipped": skipped,
                                          "build": build_stats}, kind, nhash, nlist, started)
  shutil.rmtree(staging.dir)
  for path, reason in skipped:
    logging.warning("skipped %s: %s", path, reason)
  return new
