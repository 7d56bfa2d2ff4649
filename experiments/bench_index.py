"""Benchmark: exact Hamming search (ours: flat kernels, multi-index hashing) beside faiss, 1e5 to 1e8 codes; encoding.

Search: --sizes synthetic 64-bit codes around 1,000 class prototypes, each code with its own share
of bits flipped, drawn from [--flip-low, --flip-high] (near neighbours exist as in a trained index),
queries drawn the same way. Ours and faiss (IndexBinaryFlat, IndexBinaryMultiHash with no bit flips:
approximate) side by side in one run, --threads each, k=10: per-query p50/p99 over --queries
single-query calls, batched throughput of --batch queries, bytes per second scanned against this
machine's measured read bandwidth, multihash build codes/s (compiled first) and radius-2 latency. Ours is the whole
`HammingIndex.search` (Hits in the stable order); faiss is its raw search. Every checked query of ours
equals a NumPy scan (flat and multihash).

--scale N: N codes written to a .npy, then, in fresh processes, `index build --codes` (flat and
multihash, the files written included) timed, and opening and k=10 search timed with the resident
memory after opening and at the end (peak). The last key, "summary", gives the goals' figures, one row a size.

Encoding (--images N > 0): a freshly initialised model of --config through `encoding.Encoder` and
through `index_build.build` (PNG files: decode, transform, encode, stage, write the index).

  python experiments/bench_index.py --sizes=1e6,1e7                   # a few minutes on 2 cores
  python experiments/bench_index.py --sizes=1e5,1e6,1e7 --scale=1e8 --plot=docs/search_latency.png
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import faiss
import numba
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from hybridhash_jax import hamming_index  # noqa: E402
from hybridhash_jax import index_build  # noqa: E402

K = 10
BITS = 64


def _config(path: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def bench_encode(config_path: str, n: int, tmp: str) -> dict:
  import jax
  from PIL import Image
  from hybridhash_jax import checkpoints
  from hybridhash_jax import encoding
  from hybridhash_jax import models
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
  index_build.build(enc, os.path.dirname(folder), os.path.join(tmp, "index"), progress=False)
  build_s = time.perf_counter() - t0
  return {"config": config_path, "img_size": size, "bits": enc.bits, "batch": enc.batch_size, "images": n,
          "encode_images_per_s": n / encode_s, "build_images_per_s_from_png": n / build_s,
          "devices": [str(d) for d in jax.local_devices()]}


@numba.njit(parallel=True, cache=True)
def _synthetic(protos, y, flips, seed):
  """Codes (n, 8) uint8: prototype y[i] with each bit flipped with probability flips[i] (geometric gaps).

  Each thread draws from its own stream (numba's), so the flips differ from run to run; the statistics do not."""
  n = len(y)
  out = np.empty((n, BITS // 8), np.uint8)
  np.random.seed(seed)
  for i in numba.prange(n):
    out[i] = protos[y[i]]
    lg = np.log(1.0 - flips[i])
    b = int(np.log(1.0 - np.random.random()) / lg)
    while b < BITS:
      out[i, b >> 3] ^= np.uint8(1 << (b & 7))
      b += 1 + int(np.log(1.0 - np.random.random()) / lg)
  return out


def synthetic(n: int, seed: int, args) -> np.ndarray:
  rng = np.random.default_rng(seed)
  protos = np.random.default_rng(0).integers(0, 256, (1000, BITS // 8), dtype=np.uint8)
  return _synthetic(protos, rng.integers(0, 1000, n), rng.uniform(args.flip_low, args.flip_high, n), seed * 10**9)


def numpy_scan(db: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
  """The baseline: popcount of the XOR against every code, then the stable (distance, id) top k."""
  d = np.bitwise_count(db ^ q[None]).sum(1, dtype=np.int32)
  part = np.argpartition(d, k - 1)[:k]
  cand = np.flatnonzero(d <= d[part].max())
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


@numba.njit(parallel=True, cache=True)
def _read(a):
  total = np.uint64(0)
  for i in numba.prange(len(a)):
    total += a[i]
  return total


def read_bandwidth(gib: float = 1.0) -> float:
  """Bytes per second of a parallel read of a large array (past every cache), best of 3."""
  a = np.ones(int(gib * 2**30) // 8, np.uint64)
  _read(a[:1000])
  best = min(_timed(_read, a) for _ in range(3))
  return a.nbytes / best


def _timed(fn, *args) -> float:
  t0 = time.perf_counter()
  fn(*args)
  return time.perf_counter() - t0


def bench_size(n: int, args, bandwidth: float) -> dict:
  db = synthetic(n, 1, args)
  queries = synthetic(max(args.queries, args.batch), 2, args)
  single, batch = queries[:args.queries], queries[:args.batch]
  out = {"n": n}
  flat = hamming_index.HammingIndex.in_memory(db, BITS)
  ours = lambda q: flat.search(q, k=K)
  fi = faiss.IndexBinaryFlat(BITS)
  fi.add(db)
  raw = lambda q: fi.search(q, K)
  ours(single[:2])
  out["ours_flat"] = {**_latency(ours, single), "batch_queries_per_s": _throughput(ours, batch)}
  out["faiss_flat"] = {**_latency(raw, single), "batch_queries_per_s": _throughput(raw, batch)}
  out["ours_flat"]["bytes_per_s_one_query"] = db.nbytes / (out["ours_flat"]["p50_ms"] / 1e3)
  out["ours_flat"]["share_of_read_bandwidth_one_query"] = out["ours_flat"]["bytes_per_s_one_query"] / bandwidth
  out["ours_flat"]["bytes_per_s_compared_batch"] = db.nbytes * out["ours_flat"]["batch_queries_per_s"]
  hamming_index.HammingIndex.in_memory(db[:1000], BITS, "multihash")  # compiled (or loaded) before it is timed
  t0 = time.perf_counter()
  mih = hamming_index.HammingIndex.in_memory(db, BITS, "multihash")
  build_s = time.perf_counter() - t0
  ours_m = lambda q: mih.search(q, k=K)
  ours_r = lambda q: mih.search(q, radius=2)
  ours_m(single[:2])
  ours_r(single[:2])
  out["ours_multihash"] = {**_latency(ours_m, single), "batch_queries_per_s": _throughput(ours_m, batch),
                           "radius2": _latency(ours_r, single), "build_s": build_s, "build_codes_per_s": n / build_s,
                           "tables": mih.searcher.tables}
  check = queries[:args.check]
  want = [numpy_scan(db, q, K).tolist() for q in check]
  out["exact_flat"] = [[h.id for h in row] for row in flat.search(check, k=K)] == want
  out["exact_multihash"] = [[h.id for h in row] for row in mih.search(check, k=K)] == want
  if n <= args.faiss_multihash_max:
    t0 = time.perf_counter()
    fm = faiss.IndexBinaryMultiHash(BITS, BITS // 16, 16)
    fm.add(db)
    fm.nflip = 0
    add_s = time.perf_counter() - t0
    raw_m = lambda q: fm.search(q, K)
    out["faiss_multihash_approximate"] = {**_latency(raw_m, single), "batch_queries_per_s": _throughput(raw_m, batch),
                                          "build_codes_per_s": n / add_s, "tables": BITS // 16}
  o, f, m = out["ours_flat"], out["faiss_flat"], out["ours_multihash"]
  out["ratios"] = {"flat_p50_ours_over_faiss": o["p50_ms"] / f["p50_ms"],
                   "flat_batch_ours_over_faiss": o["batch_queries_per_s"] / f["batch_queries_per_s"],
                   "multihash_p50_over_faiss_flat_p50": m["p50_ms"] / f["p50_ms"]}
  out["summary"] = {"n": n, **out["ratios"], "multihash_p50_ms": m["p50_ms"], "multihash_p99_ms": m["p99_ms"],
                    "multihash_radius2_p50_ms": m["radius2"]["p50_ms"],
                    "multihash_build_codes_per_s": m["build_codes_per_s"],
                    "exact": out["exact_flat"] and out["exact_multihash"], "loadavg": os.getloadavg()}
  return out


def _rss() -> dict:
  with open("/proc/self/status", encoding="utf-8") as fh:
    fields = dict(line.split(":", 1) for line in fh)
  return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def scale_child(mode: str, path: str, out: str, args) -> dict:
  """Run in a fresh process: its peak resident memory is its own."""
  if mode == "build":
    res = {}
    for kind in ("flat", "multihash"):
      t0 = time.perf_counter()
      index_build.build_from_codes(path, os.path.join(out, kind), kind=kind)
      res[kind] = {"build_s": time.perf_counter() - t0}
    return {**res, "peak_rss_bytes": _rss()["VmHWM"]}
  res = {}
  queries = synthetic(args.queries, 2, args)
  for kind in ("flat", "multihash"):
    t0 = time.perf_counter()
    index = hamming_index.HammingIndex.open(os.path.join(out, kind))
    res[kind] = {"open_s": time.perf_counter() - t0, "rss_after_open_bytes": _rss()["VmRSS"]}
    index.search(queries[:1], k=K)
    res[kind].update(_latency(lambda q, index=index: index.search(q, k=K), queries))
    res[kind]["rss_after_search_bytes"] = _rss()["VmRSS"]
    del index
  return {**res, "peak_rss_bytes": _rss()["VmHWM"]}


def bench_scale(n: int, args) -> dict:
  with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
    path = os.path.join(tmp, "codes.npy")
    t0 = time.perf_counter()
    codes = np.lib.format.open_memmap(path, "w+", np.uint8, (n, BITS // 8))
    step = 10_000_000
    for a in range(0, n, step):
      codes[a:a + step] = synthetic(min(step, n - a), 100 + a // step, args)
    codes.flush()
    del codes
    out = {"n": n, "generate_s": time.perf_counter() - t0}
    for mode in ("build", "search"):
      cmd = [sys.executable, os.path.abspath(__file__), f"--scale-child={mode}", f"--scale-path={path}",
             f"--scale-out={tmp}", f"--queries={args.scale_queries}", f"--threads={args.threads}"]
      res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
      out[mode] = json.loads(res.stdout)
      print(json.dumps({mode: out[mode]}), file=sys.stderr, flush=True)
  return out


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  rows = sorted(results["sizes"], key=lambda r: r["n"])
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label in (("ours_flat", "ours, flat"), ("ours_multihash", "ours, multihash"), ("faiss_flat", "faiss, flat"),
                     ("faiss_multihash_approximate", "faiss, multihash (no flips: approximate)")):
    pts = [(r["n"], r[key]["p50_ms"]) for r in rows if key in r]
    if pts:
      ax.plot(*zip(*pts), marker="o", label=label)
  ax.set(xscale="log", yscale="log", xlabel="database size (64-bit codes)", ylabel="per-query p50 (ms), k = 10",
         title=f"k-NN, {results['machine']['threads']} threads, load {results['machine']['loadavg_before'][0]:.1f}")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="1e6,1e7", help="database sizes, comma-separated")
  p.add_argument("--scale", type=float, default=0, help="codes for the build / open / search at scale (0: none)")
  p.add_argument("--threads", type=int, default=2, help="threads for ours and for faiss")
  p.add_argument("--flip-low", type=float, default=0.05)
  p.add_argument("--flip-high", type=float, default=0.15)
  p.add_argument("--queries", type=int, default=200, help="single-query calls for the latency percentiles")
  p.add_argument("--scale-queries", type=int, default=100, help="single-query calls at --scale")
  p.add_argument("--batch", type=int, default=1000, help="queries of the batched call")
  p.add_argument("--check", type=int, default=20, help="queries checked against a NumPy scan")
  p.add_argument("--faiss-multihash-max", type=float, default=1e7, help="largest size given faiss's multihash")
  p.add_argument("--plot", default=None, help="PNG of latency against database size")
  p.add_argument("--tmp", default=None, help="folder for the --scale files (default: the system's)")
  p.add_argument("--config", default="configs/quickstart.py")
  p.add_argument("--images", type=int, default=0, help="images to encode (0: no encoding benchmark)")
  p.add_argument("--scale-child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--scale-path", default=None, help=argparse.SUPPRESS)
  p.add_argument("--scale-out", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  numba.set_num_threads(args.threads)
  faiss.omp_set_num_threads(args.threads)
  if args.scale_child:
    print(json.dumps(scale_child(args.scale_child, args.scale_path, args.scale_out, args)))
    return
  load_before = os.getloadavg()
  bandwidth = read_bandwidth()
  results = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                         "faiss": faiss.__version__, "numba": numba.__version__, "loadavg_before": load_before,
                         "read_bandwidth_bytes_per_s": bandwidth},
             "settings": {"k": K, "bits": BITS, "prototypes": 1000, "flip": [args.flip_low, args.flip_high],
                          "queries": args.queries, "batch": args.batch},
             "sizes": []}
  for n in filter(None, args.sizes.split(",")):
    results["sizes"].append(bench_size(int(float(n)), args, bandwidth))
    print(json.dumps(results["sizes"][-1]), file=sys.stderr, flush=True)  # each figure as soon as it is known
  if args.scale:
    results["scale"] = bench_scale(int(args.scale), args)
  if args.images:
    with tempfile.TemporaryDirectory() as tmp:
      results["encode"] = bench_encode(args.config, args.images, tmp)
  results["machine"]["loadavg_after"] = os.getloadavg()
  results["summary"] = [r["summary"] for r in results["sizes"]]  # the goals, one row a size
  if args.scale:
    sc = results["scale"]
    results["summary"].append({"n": sc["n"], "open_s": {k: sc["search"][k]["open_s"] for k in ("flat", "multihash")},
                               **{f"{k}_p50_ms": sc["search"][k]["p50_ms"] for k in ("flat", "multihash")},
                               **{f"{k}_p99_ms": sc["search"][k]["p99_ms"] for k in ("flat", "multihash")},
                               "multihash_index_build_codes_per_s": sc["n"] / sc["build"]["multihash"]["build_s"],
                               "peak_rss_bytes": max(sc["build"]["peak_rss_bytes"], sc["search"]["peak_rss_bytes"])})
  print(json.dumps(results, indent=2))
  if args.plot:
    plot(results, args.plot)


if __name__ == "__main__":
  main()
