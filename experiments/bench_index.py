"""Benchmark: encoding images/s, and Hamming search at 1M codes (faiss flat, multihash) beside a NumPy scan.

Encoding: a freshly initialised model of --config saved as a step-0 checkpoint, through
`encoding.Encoder` (preprocessed uint8 batches) and through `hamming_index.build` (PNG files:
decode, transform, encode, stage, write the index).

Search: --db synthetic 64-bit codes around 1,000 class prototypes (each bit flipped with probability
--flip, so near neighbours exist as in a trained index), queries drawn the same way. Per-query
latency (p50/p99 over --queries single-query calls) and batched throughput (one call of
--batch queries), k=10, for faiss's raw search and for `HammingIndex.search` (the stable order,
which adds a range search for the ties at the k-th distance). The baseline, in the same run, is
a NumPy popcount scan (XOR of packed bytes, np.bitwise_count, then a stable top k). Prints JSON.

  python experiments/bench_index.py                       # 1M codes; about two minutes on 2 cores
  python experiments/bench_index.py --db 100000 --queries 50
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import faiss
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hybridhash_jax import checkpoints
from hybridhash_jax import encoding
from hybridhash_jax import hamming_index
from hybridhash_jax import models
from PIL import Image

K = 10


def _config(path: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def bench_encode(config_path: str, n: int, tmp: str) -> dict:
  config = _config(config_path)
  model = models.from_config(config.model)
  size = config.model.img_size
  params = model.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32))["params"]
  workdir = os.path.join(tmp, "work")
  checkpoints.save_params(os.path.join(workdir, "checkpoints"), params, config.to_dict())
  enc = encoding.Encoder.from_workdir(workdir)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  enc.encode(images)  # compiles every batch shape the timed call uses
  t0 = time.perf_counter()
  enc.encode(images)
  encode_s = time.perf_counter() - t0
  folder = os.path.join(tmp, "images", "c")
  os.makedirs(folder)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:06d}.png"))
  t0 = time.perf_counter()
  hamming_index.build(enc, os.path.dirname(folder), os.path.join(tmp, "index"), progress=False)
  build_s = time.perf_counter() - t0
  return {"config": config_path, "img_size": size, "bits": enc.bits, "batch": enc.batch_size, "images": n,
          "encode_images_per_s": n / encode_s, "build_images_per_s_from_png": n / build_s,
          "devices": [str(d) for d in jax.local_devices()]}


def synthetic(n: int, bits: int, flip: float, rng, protos) -> np.ndarray:
  y = rng.integers(0, len(protos), n)
  return hamming_index.pack(np.where(rng.random((n, bits)) < flip, -protos[y], protos[y]))


def numpy_scan(db: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
  """The baseline: popcount of the XOR against every code, then the stable (distance, id) top k."""
  d = np.bitwise_count(db ^ q[None]).sum(1, dtype=np.int32)
  part = np.argpartition(d, k - 1)[:k]
  kth = d[part].max()
  cand = np.flatnonzero(d <= kth)
  return cand[np.lexsort((cand, d[cand]))][:k]


def _latency(fn, queries) -> dict:
  times = []
  for q in queries:
    t0 = time.perf_counter()
    fn(q[None])
    times.append(time.perf_counter() - t0)
  times = np.asarray(times) * 1e3
  return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def _throughput(fn, batch) -> float:
  t0 = time.perf_counter()
  fn(batch)
  return len(batch) / (time.perf_counter() - t0)


def bench_search(n: int, bits: int, flip: float, num_queries: int, batch: int) -> dict:
  rng = np.random.default_rng(0)
  protos = rng.choice(np.float32([-1, 1]), (1000, bits))
  db = synthetic(n, bits, flip, rng, protos)
  queries = synthetic(max(num_queries, batch), bits, flip, rng, protos)
  items = {"path": [f"{i}" for i in range(n)], "label": [None] * n}
  out = {}
  for kind in ("flat", "multihash"):
    t0 = time.perf_counter()
    index, params = hamming_index.make_faiss(kind, bits, db, None, None)
    add_s = time.perf_counter() - t0
    ours = hamming_index.HammingIndex("(memory)", {"bits": bits}, index, items, db)
    if kind == "multihash":
      index.nflip = 0
    raw = lambda q, index=index: index.search(q, K)
    stable = lambda q, ours=ours: ours.search(q, k=K)
    out[kind] = {
        "params": params, "add_s": add_s,
        "faiss_search": {**_latency(raw, queries[:num_queries]),
                         "batched_queries_per_s": _throughput(raw, queries[:batch])},
        "stable_search": {**_latency(stable, queries[:num_queries]),
                          "batched_queries_per_s": _throughput(stable, queries[:batch])}}
  scan = lambda qs: [numpy_scan(db, q, K) for q in qs]
  out["numpy_scan"] = {**_latency(scan, queries[:num_queries]),
                       "batched_queries_per_s": _throughput(scan, queries[:min(batch, num_queries)])}
  flat = hamming_index.HammingIndex("(memory)", {"bits": bits}, hamming_index.make_faiss(
      "flat", bits, db, None, None)[0], items, db)
  check = queries[:20]
  out["stable_search_equals_numpy_scan"] = all(
      [h.id for h in row] == numpy_scan(db, q, K).tolist() for q, row in zip(check, flat.search(check, k=K)))
  return {"db": n, "bits": bits, "flip": flip, "k": K, "queries": num_queries, "batch": batch, **out}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/quickstart.py")
  p.add_argument("--images", type=int, default=1024, help="images to encode")
  p.add_argument("--db", type=int, default=1_000_000)
  p.add_argument("--bits", type=int, default=64)
  p.add_argument("--flip", type=float, default=0.1)
  p.add_argument("--queries", type=int, default=100, help="single-query calls for the latency percentiles")
  p.add_argument("--batch", type=int, default=1000, help="queries of the batched call")
  args = p.parse_args()
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    enc = bench_encode(args.config, args.images, tmp)
  search = bench_search(args.db, args.bits, args.flip, args.queries, args.batch)
  print(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "faiss_threads": faiss.omp_get_max_threads(), "jax": jax.__version__,
                                "faiss": faiss.__version__, "loadavg_before": load_before,
                                "loadavg_after": os.getloadavg()},
                    "encode": enc, "search": search}, indent=2))


if __name__ == "__main__":
  main()
