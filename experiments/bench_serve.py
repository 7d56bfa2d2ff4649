"""Load test of the search server on 127.0.0.1: latency, throughput, errors and memory, batcher on and off.

Runs `python -m hybridhash_jax.serve` twice, each on a free loopback port, with the request batcher
on and off, and sends each --requests searches by upload (the index's own PNG files), then --requests
by id, from --clients concurrent clients (after a warm-up of --warmup of each), the two servers
taking turns block by block (each going first in every other block). Searches by id encode nothing:
their on/off difference is the noise of the machine. Reports p50/p99 latency, throughput and errors
(any error, or any response but 200, fails the run), the batch sizes, and each server's resident memory
(VmRSS) after the warm-up, the uploads and the id searches. Prints JSON.

  python -m experiments.bench_serve      # a demo: the quickstart's model (random weights) over 2,000 images
  python -m experiments.bench_serve --index=OUT [--workdir=W | --encoder=PATH] --requests=2000 --clients=8
"""

import argparse
import asyncio
import json
import os
import pathlib
import platform
import random
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

from hybridhash_jax import config_args
from hybridhash_jax import demo
from hybridhash_jax import hamming_index

REPO = pathlib.Path(__file__).resolve().parents[1]


def _rss_mb(pid: int) -> float:
  with open(f"/proc/{pid}/status", encoding="ascii") as f:
    kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
  return round(kb / 1024, 1)


async def _load(url: str, make_request, requests: range, clients: int) -> tuple[list[float], list[str], float]:
  """The `requests` (make_request(i) -> httpx kwargs) from `clients` concurrent clients: latencies, errors, seconds."""
  latencies, errors, todo = [], [], iter(requests)

  async def client(http):
    for i in todo:
      t = time.perf_counter()
      try:
        r = await http.post(f"{url}/api/search", **make_request(i))
        if r.status_code != 200:
          errors.append(f"{r.status_code}: {r.text[:200]}")
      except httpx.HTTPError as e:
        errors.append(repr(e))
      latencies.append(time.perf_counter() - t)

  limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
  async with httpx.AsyncClient(limits=limits, timeout=120) as http:
    t0 = time.perf_counter()
    await asyncio.gather(*(client(http) for _ in range(clients)))
    return latencies, errors, time.perf_counter() - t0


def _summary(latencies: list[float], errors: list[str], seconds: float) -> dict:
  ms = np.asarray(latencies) * 1e3
  return {"requests": len(ms), "errors": len(errors), "first_errors": errors[:3], "seconds": round(seconds, 2),
          "throughput_per_s": round(len(ms) / seconds, 1), "p50_ms": round(float(np.percentile(ms, 50)), 2),
          "p99_ms": round(float(np.percentile(ms, 99)), 2), "mean_ms": round(float(ms.mean()), 2)}


def _serve(args, batching: bool, log, extra=()):
  """A server (`extra`: more flags) started on a free port: (process, URL) once it answers."""
  port = demo.free_port()
  cmd = [sys.executable, "-m", "hybridhash_jax.serve", f"--index={args.index}", f"--port={port}",
         f"--max_batch={args.max_batch}", f"--batch_window_ms={args.window_ms}", *extra]
  cmd += [f"--workdir={args.workdir}"] if args.workdir else [f"--encoder={args.encoder}"] if args.encoder else []
  cmd += [] if batching else ["--no_batching"]
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), PYTHONPATH=str(REPO),
             JAX_NUM_CPU_DEVICES=str(args.devices))
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
  proc.stdout.readline()
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + 600
  while True:
    try:
      if httpx.get(f"{url}/healthz").status_code == 200:
        return proc, url
    except httpx.TransportError:
      pass
    if proc.poll() is not None or time.monotonic() > deadline:
      raise RuntimeError(f"the server did not start (see {log.name})")
    time.sleep(0.2)


def _compare(args, uploads: list[bytes], size: int, log) -> dict:
  """Both servers up at once; blocks of --block requests alternate between them, so that a change in the
  machine's load falls on both alike."""
  servers = {"batcher_on": _serve(args, True, log), "batcher_off": _serve(args, False, log)}
  rng = random.Random(0)
  ids = [rng.randrange(size) for _ in range(args.requests + args.warmup)]
  kinds = {"upload": lambda i: {"files": {"image": ("q.png", uploads[i % len(uploads)], "image/png")},
                                "data": {"k": str(args.k)}},
           "id": lambda i: {"json": {"id": ids[i], "k": args.k}}}
  out = {mode: {} for mode in servers}
  try:
    for mode, (proc, url) in servers.items():
      for make in kinds.values():
        asyncio.run(_load(url, make, range(args.warmup), args.clients))
      out[mode]["rss_mb"] = {"after_warmup": _rss_mb(proc.pid)}
    for kind, make in kinds.items():
      runs = {mode: ([], [], 0.0) for mode in servers}
      for b, start in enumerate(range(0, args.requests, args.block)):
        block = range(start, min(start + args.block, args.requests))
        for mode in sorted(servers, reverse=b % 2 == 1):  # on first, then off first, ...
          lat, err, sec = asyncio.run(_load(servers[mode][1], make, block, args.clients))
          runs[mode] = (runs[mode][0] + lat, runs[mode][1] + err, runs[mode][2] + sec)
      for mode, (proc, _) in servers.items():
        out[mode][kind] = _summary(*runs[mode])
        out[mode]["rss_mb"][f"after_{kind}"] = _rss_mb(proc.pid)
    for mode, (_, url) in servers.items():
      rss = out[mode]["rss_mb"]
      batches = httpx.get(f"{url}/api/info").json()["batcher"]["batches"]
      out[mode].update(rss_growth_mb=round(rss["after_id"] - rss["after_warmup"], 1), batches=batches,
                       mean_batch=round(sum(int(n) * c for n, c in batches.items()) / max(sum(batches.values()), 1), 2))
    return out
  finally:
    for proc, _ in servers.values():
      proc.terminate()
      proc.wait(60)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--index", help="an index directory (default: build the demo in a temp dir)")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--workdir")
  g.add_argument("--encoder")
  p.add_argument("--demo_images", type=int, default=2000, help="images in the demo index")
  p.add_argument("--clients", type=int, default=8)
  p.add_argument("--requests", type=int, default=2000, help="searches by upload, and as many by id")
  p.add_argument("--warmup", type=int, default=100)
  p.add_argument("--block", type=int, default=250, help="requests per block; the two servers alternate blocks")
  p.add_argument("--k", type=int, default=20)
  p.add_argument("--max_batch", type=int, default=32)
  p.add_argument("--window_ms", type=float, default=3.0)
  p.add_argument("--devices", type=int, default=1, help="JAX CPU devices of the server (JAX_NUM_CPU_DEVICES)")
  args = p.parse_args()
  load_start = open("/proc/loadavg", encoding="ascii").read().split()[:3]
  with tempfile.TemporaryDirectory() as tmp:
    if args.index is None:  # the demo: 10 classes of synthetic images, the quickstart's model with random weights
      config = config_args.load(str(REPO / "configs" / "quickstart.py"))
      args.index = demo.make(tmp, config, {f"c{c}": args.demo_images // 10 for c in range(10)}, (48, 64)).out
    index = hamming_index.HammingIndex.open(args.index)
    uploads = []
    for i in range(min(len(index), 256)):
      with open(index.item_path(i), "rb") as f:
        uploads.append(f.read())
    with open(os.path.join(tmp, "server.log"), "w", encoding="utf-8") as log:
      results = _compare(args, uploads, len(index), log)
  report = {"device": f"{platform.machine()}, {os.cpu_count()} cores, JAX CPU, {args.devices} device(s)",
            "loadavg_start": load_start, "loadavg_end": open("/proc/loadavg", encoding="ascii").read().split()[:3],
            "index": {"size": len(index), "bits": index.bits, "model": index.info.get("model")},
            "clients": args.clients, "requests_per_kind": args.requests, "block": args.block, "k": args.k,
            "window_ms": args.window_ms, "max_batch": args.max_batch, **results}
  print(json.dumps(report, indent=1))
  errors = sum(r[kind]["errors"] for r in results.values() for kind in ("upload", "id"))
  sys.exit(1 if errors else 0)


if __name__ == "__main__":
  main()
