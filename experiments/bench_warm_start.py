"""Warm starts: the wall time of a command's first run (empty compilation cache) and its second (cache filled).

Each command gets a fresh cache directory (through XDG_CACHE_HOME, with JAX_COMPILATION_CACHE_DIR
unset) and a new workdir for each run, so the second run differs from the first only by the cache:
  quickstart   python -m hybridhash_jax.main --config=configs/quickstart.py for --steps steps;
  eval_only    the same with --config.eval_only=True, on the first quickstart's workdir;
  serve        python -m hybridhash_jax.serve until GET /healthz answers (an index of --images digits).
Prints one JSON object: each command's first and second wall time and their ratio, and the load average.

  python -m experiments.bench_warm_start [--steps=2] [--images=200]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(cache_home: str) -> dict:
  drop = ("JAX_COMPILATION_CACHE_DIR", "HYBRIDHASH_JAX_COMPILATION_CACHE")
  env = {k: v for k, v in os.environ.items() if k not in drop}
  return dict(env, XDG_CACHE_HOME=cache_home, JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"))


def _timed(cmd: list[str], env: dict) -> float:
  t0 = time.perf_counter()
  subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True, text=True)
  return time.perf_counter() - t0


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _serve_until_healthy(index: str, env: dict, timeout: float = 600) -> float:
  port = _free_port()
  t0 = time.perf_counter()
  proc = subprocess.Popen([sys.executable, "-m", "hybridhash_jax.serve", f"--index={index}", f"--port={port}"],
                          env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    while True:
      try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
          if r.status == 200:
            return time.perf_counter() - t0
      except OSError:
        pass
      if proc.poll() is not None or time.perf_counter() - t0 > timeout:
        raise RuntimeError(f"the server did not start: {proc.communicate()[1]}")
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def _write_digits(root: str, n: int) -> None:
  from sklearn.datasets import load_digits
  d = load_digits()
  for i, (x, y) in enumerate(zip(d.images[:n], d.target[:n])):
    os.makedirs(os.path.join(root, str(y)), exist_ok=True)
    Image.fromarray((x * 255 / 16).astype(np.uint8)).save(os.path.join(root, str(y), f"{i:04d}.png"))


def _pair(first: float, second: float) -> dict:
  return {"first_s": round(first, 2), "second_s": round(second, 2), "ratio": round(second / first, 3)}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=2, help="quickstart training steps")
  p.add_argument("--images", type=int, default=200, help="digits in the served index")
  args = p.parse_args(argv)
  tmp = tempfile.mkdtemp(prefix="bench-warm-start-")
  try:
    main_cmd = [sys.executable, "-m", "hybridhash_jax.main", "--config=configs/quickstart.py",
                f"--config.num_train_steps={args.steps}"]
    env = _env(os.path.join(tmp, "cache-quickstart"))
    quick = [_timed(main_cmd + [f"--workdir={tmp}/q{i}"], env) for i in (1, 2)]
    env = _env(os.path.join(tmp, "cache-eval"))
    evals = [_timed(main_cmd + [f"--workdir={tmp}/q1", "--config.eval_only=True"], env) for _ in (1, 2)]
    _write_digits(os.path.join(tmp, "digits"), args.images)
    subprocess.run([sys.executable, "-m", "hybridhash_jax.index", "build", f"--workdir={tmp}/q1",
                    f"--images={tmp}/digits", f"--index={tmp}/index"], env=_env(os.path.join(tmp, "cache-index")),
                   cwd=REPO, check=True, capture_output=True)
    env = _env(os.path.join(tmp, "cache-serve"))
    serve = [_serve_until_healthy(f"{tmp}/index", env) for _ in (1, 2)]
    print(json.dumps({"quickstart": _pair(*quick), "eval_only": _pair(*evals), "serve_to_healthz": _pair(*serve),
                      "steps": args.steps, "load_average": [round(x, 2) for x in os.getloadavg()],
                      "cpus": os.cpu_count()}))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
