"""experiments/device_check.py --smoke runs end to end on CPU and prints one table with every row."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_prints_every_row():
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "experiments.device_check", "--smoke"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600, check=True).stdout
  table = json.loads(out)
  assert table["platform"] == "cpu" and table["smoke"]
  train = table["train"]
  assert set(train) == {f"batch2_{a}_remat-{r}" for a in ("xla", "cudnn") for r in ("none", "full")}
  for name, row in train.items():
    if "cudnn" in name:
      assert row == {"skipped": "cuDNN attention needs a GPU"}
    else:
      assert row["images_per_s"] > 0 and row["dtype"] == "bfloat16", (name, row)
  assert set(table["map"]) == {f"{s}_{k}" for s in ("cifar10", "imagenet100") for k in ("host", "sort")}
  for size in ("cifar10", "imagenet100"):
    host, srt = table["map"][f"{size}_host"], table["map"][f"{size}_sort"]
    assert srt["kernel"] == "sort" and host["map"] == pytest.approx(srt["map"], abs=1e-6) and srt["map"] > 0
  assert table["encode"]["paper_eval"]["images_per_s"] > 0


def test_host_kernel_rows_are_skipped_without_numba(monkeypatch, capsys):
  from experiments import device_check
  real = device_check.importlib.util.find_spec
  monkeypatch.setattr(device_check.importlib.util, "find_spec", lambda name: None if name == "numba" else real(name))
  monkeypatch.setattr(device_check, "rows", lambda sizes: iter([("map", "tiny_host", lambda: {"ran": True}),
                                                               ("map", "tiny_sort", lambda: {"ran": True})]))
  device_check.main(["--smoke"])
  table = json.loads(capsys.readouterr().out)
  assert table["map"]["tiny_host"] == {"skipped": "the host kernel needs numba, which is not installed"}
  assert table["map"]["tiny_sort"]["ran"]
