"""experiments/reproduce.py: finished runs become one table beside the reference; missing runs stay missing."""

import csv
import json
import os
import pathlib
import subprocess
import sys

from absl import app
from absl.testing import flagsaver
import pytest

from experiments import reproduce

REPO = pathlib.Path(__file__).resolve().parents[1]


def _reproduce(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
  return subprocess.run([sys.executable, "-m", "experiments.reproduce", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def _fake_run(workdir: pathlib.Path, **results):
  (workdir / "eval").mkdir(parents=True)
  (workdir / "eval" / "results.json").write_text(json.dumps(results))


def _csv(path) -> dict:
  with open(path, encoding="utf-8") as f:
    return {(r["config"], int(r["bits"])): r for r in csv.DictReader(f)}


def _collect(**flags) -> None:
  """experiments.reproduce's main in this process, with these flags."""
  with flagsaver.flagsaver(collect_only=True, **flags):
    reproduce.main(["reproduce"])


def test_collects_two_finished_runs(tmp_path, capsys):
  _fake_run(tmp_path / "cifar10_16", map=0.9012, best=dict(step=2340, map=0.9123), history=[], top_k=54000,
            bits=16, step=2340, num_query=1000, num_database=54000, dataset="cifar10")
  _fake_run(tmp_path / "imagenet_32", map=0.8765, best=dict(step=1827, map=0.8801), history=[], top_k=1000,
            bits=32, step=2436, num_query=5000, num_database=128503, dataset="listfile")
  _collect(configs=["cifar10", "imagenet", "coco"], bits=["16", "32"], workroot=str(tmp_path))
  rows = _csv(tmp_path / "results.csv")
  assert len(rows) == 6
  r = rows[("cifar10", 16)]
  assert (r["status"], r["dataset"], float(r["map_final"]), float(r["map_best"]), int(r["best_step"])) == (
      "collected", "cifar10", 0.9012, 0.9123, 2340)
  assert (int(r["step"]), int(r["num_query"]), int(r["num_database"]), int(r["top_k"])) == (2340, 1000, 54000, 54000)
  assert float(r["map_reference"]) == 0.9487 and "MambaHash" in r["reference"]  # MambaHash's released log
  r = rows[("imagenet", 32)]
  assert (float(r["map_final"]), float(r["map_best"]), int(r["best_step"]), float(r["map_reference"])) == (
      0.8765, 0.8801, 1827, 0.8886)
  assert (int(r["step"]), int(r["num_query"]), int(r["num_database"])) == (2436, 5000, 128503)
  for key in (("cifar10", 32), ("imagenet", 16), ("coco", 16), ("coco", 32)):
    r = rows[key]
    assert r["status"] == "missing" and r["map_final"] == r["map_best"] == r["step"] == "", key
  assert rows[("imagenet", 16)]["map_reference"] == "0.8028" and rows[("coco", 16)]["map_reference"] == ""

  table = (tmp_path / "results.md").read_text()
  assert table in capsys.readouterr().out
  lines = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in table.splitlines()
           if line.startswith("| ") and "config" not in line}
  assert "| 0.9012 | 0.9123 (2340) | 0.9487 | 54000 | 2340 | 1000 | 54000 | collected |" in lines[("cifar10", "16")]
  assert "| 0.8765 | 0.8801 (1827) | 0.8886 | 1000 | 2436 | 5000 | 128503 | collected |" in lines[("imagenet", "32")]
  assert lines[("cifar10", "32")].endswith("| -- | -- | 0.9530 | -- | -- | -- | -- | missing |")
  assert lines[("coco", "16")].endswith("| -- | -- | -- | -- | -- | -- | -- | missing |")
  assert "0.0000" not in table


def test_bad_bits_are_refused(tmp_path):
  with pytest.raises(app.UsageError, match=r"--bits \[24\]: each must be one of \(16, 32, 48, 64\)"):
    _collect(bits=["24"], workroot=str(tmp_path))


@pytest.mark.slow
def test_failed_runs_show_as_failed(tmp_path):
  """Runs that exit at once (a config that raises); the NesT-B path template is filled per run."""
  (tmp_path / "broken.py").write_text("def get_config(arg=None):\n  raise ValueError('broken on purpose')\n")
  proc = _reproduce(f"--config_dir={tmp_path}", "--configs=broken", "--bits=16,64",
                    "--init_checkpoint=/ckpt/{config}_{bits}", f"--workroot={tmp_path / 'grid'}")
  assert proc.returncode == 1, proc.stderr[-3000:]
  rows = _csv(tmp_path / "grid" / "results.csv")
  for bits in (16, 64):
    assert rows[("broken", bits)]["status"] == "failed (exit 1)" and rows[("broken", bits)]["map_final"] == ""
    assert f"--config.init_checkpoint=/ckpt/broken_{bits}" in proc.stderr
    assert "broken on purpose" in (tmp_path / "grid" / f"broken_{bits}" / "reproduce_log.txt").read_text()


@pytest.mark.slow
def test_real_tiny_run(tmp_path):
  """One real run: the tiny digits config of the training tests, behind a wrapper that takes `bits=`."""
  configs = tmp_path / "configs"
  configs.mkdir()
  (configs / "tiny.py").write_text(f'''
from hybridhash_jax import config_args

def get_config(arg=None):
  args = config_args.parse(arg, config_args.common_args(), where="tiny.py")
  c = config_args.load_module({str(REPO / "tests" / "configs" / "tiny_train.py")!r}).get_config()
  c.model.bits = args.bits
  return c
''')
  proc = _reproduce(f"--config_dir={configs}", "--configs=tiny", "--bits=32", "--runlocal",
                    f"--workroot={tmp_path / 'grid'}", "--", "--config.num_train_steps=4", timeout=600)
  assert proc.returncode == 0, (tmp_path / "grid" / "tiny_32" / "reproduce_log.txt").read_text()[-3000:]
  row = _csv(tmp_path / "grid" / "results.csv")[("tiny", 32)]
  results = json.loads((tmp_path / "grid" / "tiny_32" / "eval" / "results.json").read_text())
  assert (row["status"], int(row["step"]), int(row["bits"]), int(row["num_query"])) == ("ok", 4, 32, 50)
  assert (results["step"], results["bits"], results["num_query"]) == (4, 32, 50)  # 5 queries x 10 classes
  assert float(row["map_final"]) == results["map"] and float(row["map_best"]) == results["best"]["map"]
  assert 0.0 < results["map"] <= results["best"]["map"] <= 1.0
