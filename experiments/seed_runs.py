"""What the over-seeds experiments share: their flags and one run of `python -m hybridhash_jax.main` per seed."""

import os
import shutil
import subprocess
import sys
import time

from absl import flags

SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "config.seed values, one run each.")
DEVICES = flags.DEFINE_integer("devices", 1, "JAX_NUM_CPU_DEVICES of every run.")
OUT = flags.DEFINE_string("out", None, "Folder for the runs' workdirs (default: /tmp/<experiment>).")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where configs/ is


def out_dir(default: str) -> str:
  """--out, absolute: the runs start in the repository, wherever this one did."""
  return os.path.abspath(OUT.value or default)


def run_main(args: list, seed: str, workdir: str, expect: str) -> float:
  """Trains in a fresh `workdir` with `args` and `--config.seed=seed`; exits with the run's log if it failed or
  did not write `expect` (a path under the workdir). Returns the wall time in seconds."""
  shutil.rmtree(workdir, ignore_errors=True)  # this script's own folder: a fresh run, never a resumed one
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(DEVICES.value))
  cmd = [sys.executable, "-m", "hybridhash_jax.main", *args, f"--config.seed={seed}", f"--workdir={workdir}"]
  start = time.perf_counter()
  proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if proc.returncode or not os.path.exists(os.path.join(workdir, expect)):
    sys.exit(f"seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
  return wall
