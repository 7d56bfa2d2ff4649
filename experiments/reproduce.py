r"""Runs the paper's grid (configs x bits) and tabulates it beside the reference's numbers.

  python -m experiments.reproduce --configs=cifar10 --bits=16,32,48,64 --workroot=/tmp/hh_grid \
      [--init_checkpoint=/tmp/nest_b_init_{bits}] [--runlocal] [--collect_only]
  python -m experiments.reproduce --configs=imagenet --workroot=/tmp/hh_grid \
      -- --config.data.list_dir=LISTS --config.data.root=IMAGES

from the repository root. Each run is `python -m hybridhash_jax.main` with
`--config=configs/<config>.py:bits=<bits>[,runlocal]` in its own workdir `<workroot>/<config>_<bits>`,
one after another, its output in `reproduce_log.txt` there. Flags after `--` go to every run (so
data paths suit a grid of one dataset). Runs resume, so relaunching the grid finishes what was
interrupted (a finished run is only evaluated again).

Then, and alone with --collect_only, every `eval/results.json` is gathered into
`<workroot>/results.md` and `results.csv`: final and best mAP in their own columns, the reference's
mAP (the `REFERENCE` of each config file) where one is known, and steps / queries /
database size. A run without results shows as missing (or failed), never as 0. Results are written
at every evaluation, so with --collect_only the steps column tells unfinished runs apart.
"""

import csv
import json
import os
import subprocess
import sys

from absl import app
from absl import flags
from absl import logging

from hybridhash_jax import config_args

_CONFIGS = flags.DEFINE_list("configs", ["cifar10"], "Config names under configs/.")
_BITS = flags.DEFINE_list("bits", ["16", "32", "48", "64"], "Code lengths.")
_WORKROOT = flags.DEFINE_string("workroot", None, "One workdir per run is made under it.")
_RUNLOCAL = flags.DEFINE_bool("runlocal", False, "Tiny CPU variant of every config.")
_INIT = flags.DEFINE_string("init_checkpoint", "", "Converted NesT-B weights per run; {config} and {bits} are "
                            "filled in (one conversion per code length, see configs/cifar10.py).")
_COLLECT_ONLY = flags.DEFINE_bool("collect_only", False, "Only tabulate finished runs; launch nothing.")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG_DIR = flags.DEFINE_string("config_dir", os.path.join(_REPO, "configs"), "Folder of the config files.")
flags.mark_flag_as_required("workroot")

COLUMNS = ("config", "bits", "status", "dataset", "map_final", "map_best", "best_step", "map_reference",
           "reference", "top_k", "step", "num_query", "num_database")


def run_name(config: str, bits: int) -> str:
  return f"{config}_{bits}"


def launch(config_path: str, bits: int, runlocal: bool, workdir: str, extra: list[str]) -> int:
  """One run as a subprocess of `hybridhash_jax.main`; returns its exit code."""
  arg = f"bits={bits}" + (",runlocal" if runlocal else "")
  cmd = [sys.executable, "-m", "hybridhash_jax.main", f"--config={config_path}:{arg}", f"--workdir={workdir}",
         *extra]
  logging.info("Running %s", " ".join(cmd))
  os.makedirs(workdir, exist_ok=True)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p))
  with open(os.path.join(workdir, "reproduce_log.txt"), "ab") as log:
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode


def collect_row(config: str, bits: int, workdir: str, reference: dict | None, failed: int | None = None) -> dict:
  """One table row from `workdir/eval/results.json`; empty cells (not zeros) where it is missing.

  `failed` is the exit code of the run launched now (None: not launched). Status "ok" is a run that
  finished now; "collected" is results found on disk, whose `step` says how far that run got.
  """
  row = dict.fromkeys(COLUMNS, "")
  row.update(config=config, bits=bits)
  if reference and bits in reference["map"]:
    row.update(map_reference=reference["map"][bits], reference=f"{reference['source']}, {reference['metric']}")
  path = os.path.join(workdir, "eval", "results.json")
  if not os.path.exists(path):
    row["status"] = f"failed (exit {failed})" if failed else "missing"
    return row
  with open(path, encoding="utf-8") as f:
    r = json.load(f)
  status = {None: "collected", 0: "ok"}.get(failed, f"failed (exit {failed}); results of step {r['step']}")
  row.update(status=status,
             dataset=r["dataset"], map_final=r["map"], map_best=r["best"]["map"], best_step=r["best"]["step"],
             top_k=r["top_k"], step=r["step"], num_query=r["num_query"], num_database=r["num_database"])
  return row


def _cell(v) -> str:
  return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict]) -> str:
  """The table; a missing value shows as '--'."""
  head = ("config", "bits", "mAP final", "mAP best (step)", "reference", "mAP@", "steps", "queries", "database",
          "status")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    best = f"{_cell(r['map_best'])} ({r['best_step']})" if r["map_best"] != "" else ""
    cells = (r["config"], r["bits"], _cell(r["map_final"]), best, _cell(r["map_reference"]), r["top_k"], r["step"],
             r["num_query"], r["num_database"], r["status"])
    lines.append("| " + " | ".join(str(c) if c != "" else "--" for c in cells) + " |")
  refs = sorted({r["reference"] for r in rows if r["reference"]})
  notes = ["", "mAP final: the last evaluation. mAP best: the best evaluation during training, chosen on the "
           "query set as the released logs do."] + [f"reference: {s}." for s in refs]
  return "\n".join(lines + notes) + "\n"


def write_tables(rows: list[dict], workroot: str) -> tuple[str, str]:
  md, csv_path = os.path.join(workroot, "results.md"), os.path.join(workroot, "results.csv")
  with open(md, "w", encoding="utf-8") as f:
    f.write(markdown(rows))
  with open(csv_path, "w", encoding="utf-8", newline="") as f:
    w = csv.DictWriter(f, COLUMNS)
    w.writeheader()
    w.writerows(rows)
  return md, csv_path


def main(argv):
  extra = argv[1:]  # what follows `--`
  workroot = _WORKROOT.value
  os.makedirs(workroot, exist_ok=True)
  bits = [int(b) for b in _BITS.value]
  bad = [b for b in bits if b not in config_args.BITS]
  if bad:
    raise app.UsageError(f"--bits {bad}: each must be one of {config_args.BITS}")
  rows, any_failed = [], False
  for name in _CONFIGS.value:
    path = os.path.join(_CONFIG_DIR.value, f"{name}.py")
    reference = getattr(config_args.load_module(path), "REFERENCE", None)
    for b in bits:
      workdir = os.path.join(workroot, run_name(name, b))
      init = [f"--config.init_checkpoint={_INIT.value.format(config=name, bits=b)}"] if _INIT.value else []
      rc = None if _COLLECT_ONLY.value else launch(path, b, _RUNLOCAL.value, workdir, init + extra)
      if rc:
        any_failed = True
        logging.error("%s exited with %d; see %s", workdir, rc, os.path.join(workdir, "reproduce_log.txt"))
      rows.append(collect_row(name, b, workdir, reference, rc))
  md, csv_path = write_tables(rows, workroot)
  print(markdown(rows))
  print(f"Written: {md}, {csv_path}")
  if any_failed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
