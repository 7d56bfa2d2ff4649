"""The workdir lock: one training run per workdir; a dead run's lock is taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from hybridhash_jax import errors
from hybridhash_jax import workdir_lock
from tests import helpers


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_the_lock_names_its_holder_and_is_released(tmp_path):
  with workdir_lock.held(str(tmp_path)):
    held = json.loads((tmp_path / "run.lock").read_text())
    assert held["host"] == socket.gethostname() and held["pid"] == os.getpid() and held["started"].endswith("Z")
  assert not (tmp_path / "run.lock").exists()


def test_a_second_holder_is_refused_naming_host_and_pid(tmp_path):
  with workdir_lock.held(str(tmp_path)):
    with pytest.raises(errors.WorkdirBusyError) as e:
      workdir_lock.acquire(str(tmp_path))
  message = str(e.value)
  assert f"PID {os.getpid()} on host {socket.gethostname()}" in message and "\n" not in message


def test_a_live_process_of_this_host_keeps_its_lock(tmp_path):
  (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "started": "x"}))
  with pytest.raises(errors.WorkdirBusyError, match=f"PID {os.getppid()} "):
    workdir_lock.acquire(str(tmp_path))


def test_a_dead_process_lock_is_taken_over_with_a_warning(tmp_path, caplog):
  pid = _dead_pid()
  (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "then"}))
  with caplog.at_level("WARNING"):
    path = workdir_lock.acquire(str(tmp_path))
  assert json.loads(path.read_text())["pid"] == os.getpid()
  assert [r.getMessage() for r in caplog.records if "Taking over" in r.getMessage()] == [
      f"Taking over {path}: its run (PID {pid}, started then) is gone."]


def test_another_hosts_lock_is_never_taken_over(tmp_path):
  (tmp_path / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": _dead_pid(), "started": "then"}))
  with pytest.raises(errors.WorkdirBusyError, match=r"on host elsewhere .*delete .*run\.lock"):
    workdir_lock.acquire(str(tmp_path))


def test_a_lock_released_by_another_is_not_deleted(tmp_path):
  path = workdir_lock.acquire(str(tmp_path))
  path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "started": "x"}))
  workdir_lock.release(path)
  assert path.exists()


@pytest.mark.slow
def test_two_training_runs_on_one_workdir(tmp_path):
  """The second run refuses at once with one error line; the first one trains on."""
  first = helpers.start_main(tmp_path, "num_train_steps=100000")
  try:
    deadline = time.time() + 300
    while not (tmp_path / "run.lock").exists():
      assert first.poll() is None and time.time() < deadline
      time.sleep(0.1)
    second = subprocess.run(helpers.main_cmd(tmp_path), cwd=helpers.REPO, env=helpers.cli_env(1),
                            capture_output=True, text=True, timeout=600)
    assert second.returncode != 0 and "Traceback" not in second.stderr
    lines = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and f"PID {first.pid} on host {socket.gethostname()}" in lines[0]
    assert first.poll() is None
  finally:
    first.kill()
    first.wait()
