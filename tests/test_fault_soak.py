"""experiments/fault_soak.py, three rounds: killed runs and builds, a corrupted checkpoint, nothing lost."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_three_rounds_lose_nothing(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.fault_soak", "--rounds=3", "--corrupt_every=1",
                         "--steps=24", "--seed=1", f"--out={tmp_path}"], cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = json.loads(proc.stdout.strip().splitlines()[-1])
  assert table["rounds"] == 3 and table["kills"] >= 1, table
  assert table["mismatches"] == 0 and table["lost_runs"] == 0, table
  assert table["corruptions_survived"] == table["corruptions"] >= 1, table
