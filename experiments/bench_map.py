"""Benchmark: the jitted stable mAP kernels against a NumPy per-query argsort loop and faiss, in the same run.

Synthetic class-structured codes: each class has a random prototype code and every item flips each
bit with probability --flip, so distances repeat a lot (many ties). The baseline has the
reference's structure (one matvec and one argsort per query, float32 codes) but sorts with
kind="stable", the tie order ours defines. The faiss column is `IndexBinaryFlat`'s top-k search
alone (k = --faiss_k, --faiss_threads OpenMP threads; no AP): what a retrieval system pays just to
rank. Each side runs in its own subprocess so that its peak resident memory (ru_maxrss) is its own.
Prints JSON.

  python experiments/bench_map.py --sizes cifar,imagenet --repeats 3
  python experiments/bench_map.py --sizes cifar --kernels sort --devices 2   # sharded over 2 CPU devices
  python experiments/bench_map.py --sizes cifar --kernels host,sort   # both ranking kernels
  python experiments/bench_map.py --sizes custom --queries 5000 --db 1000000 --top_k 1000 \
      --baseline_queries 200   # GPU scale; the baseline runs on the first 200 queries only
  python experiments/bench_map.py --plot docs/ranking_kernel.png   # time against database size, log-log
"""

import argparse
import json
import multiprocessing
import os
import resource
import sys
import time

import numpy as np

SIZES = dict(
    cifar=dict(queries=1000, db=54000, bits=64, classes=10, top_k=-1),
    imagenet=dict(queries=5000, db=128503, bits=64, classes=100, top_k=1000),
)


def make_data(queries, db, bits, classes, flip, seed=0):
  """±1 float32 codes around class prototypes, and one-hot labels."""
  rng = np.random.default_rng(seed)
  protos = rng.choice(np.float32([-1, 1]), (classes, bits))

  def draw(n):
    y = rng.integers(0, classes, n)
    codes = protos[y] * np.where(rng.random((n, bits)) < flip, -1, 1).astype(np.float32)
    return codes, np.eye(classes, dtype=np.float32)[y]

  return (*draw(queries), *draw(db))


def baseline_ap(q_codes, db_codes, q_labels, db_labels, top_k):
  """Per-query APs with the reference's loop, but a stable argsort."""
  bits = q_codes.shape[1]
  k = len(db_codes) if top_k == -1 else top_k
  aps = np.zeros(len(q_codes))
  for i in range(len(q_codes)):
    relevant = (q_labels[i] @ db_labels.T > 0).astype(np.float32)
    hamming = 0.5 * (bits - q_codes[i] @ db_codes.T)
    ranked = relevant[np.argsort(hamming, kind="stable")][:k]
    total = int(ranked.sum())
    if total:
      aps[i] = np.mean(np.arange(1, total + 1) / (np.flatnonzero(ranked) + 1.0))
  return aps


def _peak_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_kernel(data, top_k, repeats, chunk_size=None, mesh=None, kernel=None) -> dict:
  """Times `metrics.mean_average_precision` in this process: the first call (compiling) and the best of `repeats`."""
  import jax
  from hybridhash_jax import metrics
  q_codes, q_labels, db_codes, db_labels = data
  kw = dict(chunk_size=chunk_size, mesh=mesh, kernel=kernel)
  t0 = time.perf_counter()
  first = float(metrics.mean_average_precision(q_codes, db_codes, q_labels, db_labels, top_k, **kw))
  compile_and_run = time.perf_counter() - t0
  steady = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    value = metrics.mean_average_precision(q_codes, db_codes, q_labels, db_labels, top_k, **kw)
    value = float(jax.block_until_ready(value))
    steady.append(time.perf_counter() - t0)
  assert value == first
  return dict(kernel=kernel or metrics.default_kernel(mesh), map=value, first_call_s=compile_and_run,
              steady_s=min(steady), steady_all_s=steady, device=str(jax.devices()[0].device_kind),
              platform=jax.default_backend())


def run_kernel(data, top_k, repeats, chunk_size, devices, kernel, out):
  """Times the kernel; with devices > 1 the sort kernel shards the database over that many devices.

  XLA:CPU runs one device's program on one core, so on a CPU host this is how the sort kernel uses
  several cores: the host is split into `devices` CPU devices (set before the backend starts; no
  effect on GPU). The host kernel uses every core whatever the devices.
  """
  import jax
  jax.config.update("jax_num_cpu_devices", max(devices, 1))
  from jax.sharding import Mesh
  if len(jax.devices()) < devices:
    raise ValueError(f"--devices {devices} but only {len(jax.devices())} {jax.default_backend()} devices")
  mesh = Mesh(np.array(jax.devices()[:devices]), ("data",)) if devices > 1 else None
  out.put(dict(time_kernel(data, top_k, repeats, chunk_size, mesh, kernel), devices=devices, peak_rss_mb=_peak_mb()))


def run_baseline(data, top_k, out):
  q_codes, q_labels, db_codes, db_labels = data
  t0 = time.perf_counter()
  aps = baseline_ap(q_codes, db_codes, q_labels, db_labels, top_k)
  out.put(dict(map=float(aps.mean()), time_s=time.perf_counter() - t0, peak_rss_mb=_peak_mb()))


def run_faiss(data, k, threads, out):
  """Times faiss's exact binary top-k search (codes packed to bytes, as faiss stores them)."""
  import faiss
  faiss.omp_set_num_threads(threads)
  q_codes, _, db_codes, _ = data
  pack = lambda c: np.packbits(c >= 0, axis=1)
  index = faiss.IndexBinaryFlat(db_codes.shape[1])
  index.add(pack(db_codes))
  queries = pack(q_codes)
  k = min(k, len(db_codes))
  t0 = time.perf_counter()
  index.search(queries, k)
  out.put(dict(k=k, threads=threads, time_s=time.perf_counter() - t0, peak_rss_mb=_peak_mb()))


def _in_subprocess(target, *args):
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  proc = ctx.Process(target=target, args=(*args, queue))
  proc.start()
  result = queue.get()
  proc.join()
  return result


def bench(name, spec, args):
  data = make_data(spec["queries"], spec["db"], spec["bits"], spec["classes"], args.flip)
  nb = min(args.baseline_queries or spec["queries"], spec["queries"])
  subset = (data[0][:nb], data[1][:nb], data[2], data[3])
  kernels = [_in_subprocess(run_kernel, data, spec["top_k"], args.repeats, args.chunk_size, args.devices, k or None)
             for k in args.kernels.split(",")]
  kernel = kernels[0]
  kernel_subset = kernel if nb == spec["queries"] else _in_subprocess(run_kernel, subset, spec["top_k"], 1,
                                                                       args.chunk_size, args.devices, kernel["kernel"])
  base = _in_subprocess(run_baseline, subset, spec["top_k"])
  base_full_s = base["time_s"] * spec["queries"] / nb
  faiss_search = _in_subprocess(run_faiss, data, args.faiss_k, args.faiss_threads) if args.faiss_k else None
  return dict(
      size=name, **spec, flip=args.flip, baseline_queries=nb,
      kernels=kernels, baseline=dict(base, time_s_scaled_to_all_queries=base_full_s), faiss_search=faiss_search,
      map_kernel_on_baseline_queries=kernel_subset["map"],
      map_abs_diff=abs(kernel_subset["map"] - base["map"]),
      speedup={k["kernel"]: base_full_s / k["steady_s"] for k in kernels},
      vs_faiss_search=faiss_search and {k["kernel"]: faiss_search["time_s"] / k["steady_s"] for k in kernels},
      load_average=os.getloadavg())


def sweep(args) -> list:
  """`bench` at each of --plot_db database sizes: --plot_queries queries, 64 bits, 10 classes, K = all."""
  return [bench(f"db{db}", dict(queries=args.plot_queries, db=db, bits=64, classes=10, top_k=-1), args)
          for db in map(int, args.plot_db.split(","))]


def plot_sweep(results: list, path: str) -> None:
  """Log-log seconds against database size: the ranking kernel, the NumPy baseline and faiss's top-k search."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  db = [r["db"] for r in results]
  kernel = results[0]["kernels"][0]["kernel"]
  lines = [(f"ours: `{kernel}` kernel, whole mAP", [r["kernels"][0]["steady_s"] for r in results], "o-"),
           ("NumPy per-query stable argsort, whole mAP", [r["baseline"]["time_s_scaled_to_all_queries"]
                                                          for r in results], "s--")]
  if results[0]["faiss_search"]:
    lines.append((f"faiss IndexBinaryFlat top-{results[0]['faiss_search']['k']} search alone "
                  f"({results[0]['faiss_search']['threads']} threads)",
                  [r["faiss_search"]["time_s"] for r in results], "^:"))
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for label, seconds, style in lines:
    ax.loglog(db, seconds, style, label=label)
  ax.set(xlabel="database size (64-bit codes)", ylabel="seconds",
         title=f"Hamming ranking of {results[0]['queries']:,} queries, K = all")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  load = max(max(r["load_average"][:2]) for r in results)
  fig.text(0.99, 0.01, f"{os.cpu_count()} CPU cores, load average up to {load:.1f}", ha="right", fontsize=7,
           color="grey")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="cifar,imagenet", help="comma list of cifar, imagenet, custom")
  parser.add_argument("--repeats", type=int, default=3, help="steady-state calls; the best is reported")
  parser.add_argument("--queries", type=int, default=5000, help="custom size")
  parser.add_argument("--db", type=int, default=1_000_000, help="custom size")
  parser.add_argument("--bits", type=int, default=64, help="custom size")
  parser.add_argument("--classes", type=int, default=100, help="custom size")
  parser.add_argument("--top_k", type=int, default=1000, help="custom size; -1 = whole database")
  parser.add_argument("--flip", type=float, default=0.2, help="per-bit flip probability around the prototype")
  parser.add_argument("--baseline_queries", type=int, default=0, help="run the baseline on this many queries "
                      "(0 = all) and scale its time to all of them")
  parser.add_argument("--chunk_size", type=int, default=None, help="the sort kernel's queries per chunk")
  parser.add_argument("--devices", type=int, default=1, help="the sort kernel shards the database over this "
                      "many devices (on a CPU host, that many CPU devices: one core each)")
  parser.add_argument("--kernels", default="", help="comma list of ranking kernels to time (host, sort; "
                      "empty: the backend's default); the first is the one compared with the baseline")
  parser.add_argument("--faiss_k", type=int, default=1000, help="faiss IndexBinaryFlat top-k search (0: skip)")
  parser.add_argument("--faiss_threads", type=int, default=2, help="faiss OpenMP threads")
  parser.add_argument("--plot", default=None, help="instead of --sizes, time each --plot_db database size and "
                      "draw the times against it to this PNG")
  parser.add_argument("--plot_db", default="1000,3000,10000,30000,100000,300000", help="database sizes of --plot")
  parser.add_argument("--plot_queries", type=int, default=1000, help="queries of --plot")
  args = parser.parse_args(argv)
  if args.plot:
    results = sweep(args)
    print(json.dumps(results, indent=2))
    plot_sweep(results, args.plot)
    return
  sizes = dict(SIZES, custom=dict(queries=args.queries, db=args.db, bits=args.bits, classes=args.classes,
                                  top_k=args.top_k))
  results = [bench(name, sizes[name], args) for name in args.sizes.split(",")]
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main(sys.argv[1:])
