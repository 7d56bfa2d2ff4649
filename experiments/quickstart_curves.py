"""The quickstart's loss and mAP over steps, for a few seeds: how steady its training is.

  python experiments/quickstart_curves.py [--seeds=0,1,2 --devices=1 --out=/tmp/quickstart_curves]
      [--eval_every_epochs=5 --plot=docs/quickstart_curves.png]

Runs the README's command once per seed, `python -m hybridhash_jax.main --config=configs/quickstart.py
--config.seed=S`, each in its own workdir (out/seedS_devD), with JAX_NUM_CPU_DEVICES=--devices. The quickstart
itself evaluates half-way and at the end; --eval_every_epochs evaluates more often for the curve (evaluation
reads the model, it does not change its training). Reads each workdir's metrics.jsonl (the loss at every log
step, eval_map at every evaluation) and prints JSON; --plot draws the two curves of every seed.
"""

import json
import os
import sys

from absl import app
from absl import flags

from experiments import seed_runs

_EVAL_EVERY = flags.DEFINE_integer("eval_every_epochs", 5, "config.eval_every_epochs of every run (20 steps each).")
_PLOT = flags.DEFINE_string("plot", None, "Write the loss and mAP curves to this PNG.")


def read_curves(workdir: str) -> dict:
  """metrics.jsonl -> {"loss": [[step, loss], ...], "map": [[step, eval_map], ...]}."""
  loss, maps = [], []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        loss.append([row["step"], round(row["loss"], 5)])
      if "eval_map" in row:
        maps.append([row["step"], round(row["eval_map"], 4)])
  return {"loss": loss, "map": maps}


def _run(seed: str, workdir: str) -> dict:
  args = ["--config=configs/quickstart.py", f"--config.eval_every_epochs={_EVAL_EVERY.value}"]
  wall = seed_runs.run_main(args, seed, workdir, expect="metrics.jsonl")
  curves = read_curves(workdir)
  if not curves["map"]:
    sys.exit(f"seed {seed}: no eval_map in {workdir}/metrics.jsonl")
  return {"seed": int(seed), "final_map": curves["map"][-1][1], "wall_s": round(wall, 1), **curves}


def plot(runs: list, path: str, devices: int) -> None:
  """Two panels over steps: the training loss and the mAP of each evaluation, one line per seed."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(10, 3.8))
  for r in runs:
    label = f"seed {r['seed']}"
    ax_loss.plot(*zip(*r["loss"]), label=label)
    ax_map.plot(*zip(*r["map"]), marker="o", label=label)
  ax_loss.set(title="training loss (WMLE)", xlabel="step", ylabel="loss")
  ax_map.set(title="mAP over the database (597 images)", xlabel="step", ylabel="mAP", ylim=(0, 1))
  ax_map.axhline(0.1, color="grey", linestyle=":", linewidth=1)
  ax_map.text(0.98, 0.11, "random codes", transform=ax_map.get_yaxis_transform(), ha="right", va="bottom",
              color="grey", fontsize=8)
  for ax in (ax_loss, ax_map):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(f"configs/quickstart.py, {len(runs)} seeds, {devices} CPU device{'s' if devices > 1 else ''}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  out = seed_runs.out_dir("/tmp/quickstart_curves")
  devices = seed_runs.DEVICES.value
  runs = [_run(s, os.path.join(out, f"seed{s}_dev{devices}")) for s in seed_runs.SEEDS.value]
  finals = [r["final_map"] for r in runs]
  print(json.dumps({"config": "configs/quickstart.py", "devices": devices,
                    "eval_every_epochs": _EVAL_EVERY.value, "final_map_range": [min(finals), max(finals)],
                    "runs": runs}))
  if _PLOT.value:
    plot(runs, _PLOT.value, devices)
    print(f"wrote {_PLOT.value}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
