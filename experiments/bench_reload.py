"""Reload timing of the search server: from an index commit to the first search the new index answers.

Builds a demo index (the quickstart's model with random weights over --demo_images synthetic PNGs),
starts two servers on it, one polling every --reload_s seconds and one on SIGHUP only (sent right after
each commit), and keeps --clients clients per server searching without pause (by id, every 4th by
upload). Then --rounds times it rebuilds the index in this process, adding --added images and dropping
them again in turn, and takes the time from the commit (index.json's mtime) to the first answer that
carries the new version (`version` in each search answer). Searches that fail meanwhile (any status but
200, any transport error) are counted. Prints JSON; exits 1 if a search failed or a reload was missed.

  python -m experiments.bench_reload [--rounds=6 --reload_s=2 --demo_images=2000 --added=200 --clients=4]
"""

import argparse
import asyncio
import json
import os
import pathlib
import platform
import random
import shutil
import signal
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
from PIL import Image

from experiments.bench_serve import _serve
from hybridhash_jax import config_args
from hybridhash_jax import demo
from hybridhash_jax import hamming_index
from hybridhash_jax import index_build
from hybridhash_jax import live_index

REPO = pathlib.Path(__file__).resolve().parents[1]

ADDED = "zz_added"  # the added images' folder sorts last: the demo's ids stay valid in every version


class _Load:
  """Clients searching one server without pause, in a thread; each answer's (time, version) or error."""

  def __init__(self, url: str, clients: int, ids: int, uploads: list[bytes]):
    self.url, self.clients, self.ids, self.uploads = url, clients, ids, uploads
    self.answers, self.errors, self._stop = [], [], threading.Event()
    self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

  async def _client(self, http, seed: int):
    rng = random.Random(seed)
    for i in range(sys.maxsize):
      if self._stop.is_set():
        return
      if i % 4 == 3:
        request = {"files": {"image": ("q.png", rng.choice(self.uploads), "image/png")}, "data": {"k": "10"}}
      else:
        request = {"json": {"id": rng.randrange(self.ids), "k": 10}}
      try:
        r = await http.post(f"{self.url}/api/search", **request)
        if r.status_code == 200:
          self.answers.append((time.time(), r.json()["version"]))
        else:
          self.errors.append(f"{r.status_code}: {r.text[:200]}")
      except httpx.HTTPError as e:
        self.errors.append(repr(e))

  async def _run(self):
    async with httpx.AsyncClient(timeout=120) as http:
      await asyncio.gather(*(self._client(http, s) for s in range(self.clients)))

  def start(self):
    self._thread.start()

  def stop(self):
    self._stop.set()
    self._thread.join(300)

  def first_answer(self, version: str, after: float) -> float | None:
    times = [t for t, v in list(self.answers) if v == version and t >= after]
    return min(times) if times else None


def _seconds(values: list[float]) -> dict:
  return {"min": round(min(values), 3), "median": round(float(np.median(values)), 3), "max": round(max(values), 3),
          "all": [round(v, 3) for v in values]} if values else {}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--demo_images", type=int, default=2000, help="images in the demo index")
  p.add_argument("--added", type=int, default=200, help="images added (and dropped) by the rebuilds")
  p.add_argument("--rounds", type=int, default=6, help="rebuilds")
  p.add_argument("--reload_s", type=float, default=2.0, help="the polling server's --reload_s")
  p.add_argument("--clients", type=int, default=4, help="concurrent clients per server")
  p.add_argument("--devices", type=int, default=1, help="JAX CPU devices of each server (JAX_NUM_CPU_DEVICES)")
  args = p.parse_args()
  load_start = open("/proc/loadavg", encoding="ascii").read().split()[:3]
  with tempfile.TemporaryDirectory() as tmp:
    config = config_args.load(str(REPO / "configs" / "quickstart.py"))
    served = demo.make(tmp, config, {f"c{c}": args.demo_images // 10 for c in range(10)}, (48, 64))
    added = os.path.join(served.root, ADDED)
    uploads = [pathlib.Path(served.index.item_path(i)).read_bytes() for i in range(0, len(served.index), 50)]
    ns = argparse.Namespace(index=served.out, workdir=None, encoder=None, max_batch=32, window_ms=3.0,
                            devices=args.devices)
    with open(os.path.join(tmp, "server.log"), "w", encoding="utf-8") as log:
      servers = {"poll": _serve(ns, True, log, [f"--reload_s={args.reload_s}"]),
                 "sighup": _serve(ns, True, log, ["--reload_s=0"])}
      loads = {mode: _Load(url, args.clients, len(served.index), uploads) for mode, (_, url) in servers.items()}
      latency, builds, missed = {mode: [] for mode in servers}, [], []
      try:
        for load in loads.values():
          load.start()
        time.sleep(2)
        for r in range(args.rounds):
          if r % 2 == 0:
            for i in range(args.added):
              Image.fromarray(demo.smooth_image(10**6 + i, 48, 64)).save(os.path.join(added, f"{i:04d}.png"))
          else:
            shutil.rmtree(added)
          t = time.perf_counter()
          info = index_build.build(served.encoder, served.root, served.out, progress=False)
          builds.append(time.perf_counter() - t)
          servers["sighup"][0].send_signal(signal.SIGHUP)
          committed = os.stat(os.path.join(served.out, hamming_index.INDEX_JSON)).st_mtime
          version = live_index.version(info)
          deadline = time.monotonic() + 60 + args.reload_s
          while time.monotonic() < deadline and any(load.first_answer(version, committed) is None
                                                    for load in loads.values()):
            time.sleep(0.05)
          for mode, load in loads.items():
            first = load.first_answer(version, committed)
            if first is None:
              missed.append(f"{mode} round {r}")
            else:
              latency[mode].append(first - committed)
          time.sleep(1)
      finally:
        for load in loads.values():
          load.stop()
        for proc, _ in servers.values():
          proc.terminate()
          proc.wait(60)
  report = {"device": f"{platform.machine()}, {os.cpu_count()} cores, JAX CPU, {args.devices} device(s) per server",
            "loadavg_start": load_start, "loadavg_end": open("/proc/loadavg", encoding="ascii").read().split()[:3],
            "index": {"sizes": [args.demo_images, args.demo_images + args.added], "bits": served.index.bits},
            "rounds": args.rounds, "clients_per_server": args.clients, "reload_s": args.reload_s,
            "build_s": _seconds(builds),
            **{f"commit_to_first_answer_s_{mode}": _seconds(v) for mode, v in latency.items()},
            "searches": {mode: len(l.answers) + len(l.errors) for mode, l in loads.items()},
            "errors": {mode: len(l.errors) for mode, l in loads.items()},
            "first_errors": [e for l in loads.values() for e in l.errors[:3]], "missed": missed}
  print(json.dumps(report, indent=1))
  sys.exit(1 if missed or any(report["errors"].values()) else 0)


if __name__ == "__main__":
  main()
