"""SIGINT and SIGTERM: training saves the step in flight and says so; `index build` keeps its staged chunks."""

import gc
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from hybridhash_jax import checkpoints
from hybridhash_jax import cli
from hybridhash_jax import demo
from hybridhash_jax import index_build
from hybridhash_jax import interrupts
from hybridhash_jax import metric_writer
from hybridhash_jax import train
from tests import helpers

REPO = helpers.REPO


def _steps(ckpt_dir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in ckpt_dir.iterdir())


def test_sigint_saves_the_step_in_flight_and_ignores_the_signals_after_it(trained, tmp_path, monkeypatch, capsys):
  """The session's trained run again (its programs are compiled), stopped at step 2 of its 12."""
  write, save_train = metric_writer.MetricWriter.write, checkpoints.save_train

  def write_then_signal(self, step, metrics):
    write(self, step, metrics)
    if step == 2:
      os.kill(os.getpid(), signal.SIGINT)

  def save_then_signal(*args, **kwargs):
    save_train(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGINT)  # arrives while the save is being committed

  def signal_then_close(self):
    os.kill(os.getpid(), signal.SIGINT)  # arrives after the stop, while the run closes its files
    close(self)

  close = metric_writer.MetricWriter.close
  monkeypatch.setattr(metric_writer.MetricWriter, "write", write_then_signal)
  monkeypatch.setattr(metric_writer.MetricWriter, "close", signal_then_close)
  monkeypatch.setattr(checkpoints, "save_train", save_then_signal)
  with pytest.raises(SystemExit) as e, cli.console():
    train.train_and_evaluate(trained.config_with(checkpoint_every_steps=50), str(tmp_path))
  assert e.value.code == 130
  err = capsys.readouterr().err.splitlines()
  assert err[-1] == (f"stopped by SIGINT: step 2 is saved in {tmp_path / 'checkpoints'}; "
                     "rerun the same command to resume")
  assert _steps(tmp_path / "checkpoints") == ["2"]  # committed: no orbax temporary directory left


def _wait_for_a_line(path: pathlib.Path, proc, timeout=300):
  deadline = time.time() + timeout
  while not (path.exists() and path.read_text()):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_twice_leaves_a_checkpoint_a_hint_and_no_traceback_then_resumes(trained, tmp_path):
  proc = trained.main(tmp_path, "num_train_steps=100000", "checkpoint_every_steps=3", background=True)
  _wait_for_a_line(tmp_path / "metrics.jsonl", proc)  # a step has been logged
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)  # while it saves
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert last.startswith("stopped by SIGTERM: step ") and last.endswith("rerun the same command to resume"), err
  step = int(last.split("step ")[1].split()[0])
  assert str(step) in _steps(tmp_path / "checkpoints")
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]  # every save committed
  rerun = trained.main(tmp_path, f"num_train_steps={step + 2}")
  assert rerun.returncode == 0, rerun.stderr
  assert f"Resumed from {tmp_path / 'checkpoints'} at step {step}" in rerun.stderr
  assert helpers.foreign_log_lines(rerun.stderr) == []  # other libraries stay off the console
  assert rerun.stdout.splitlines()[0].startswith("final mAP@") and f"at step {step + 2}" in rerun.stdout


_SLOW_ENCODE = """
import time
from hybridhash_jax import encoding
_encode = encoding.Encoder.encode
encoding.Encoder.encode = lambda self, x: (time.sleep(0.3), _encode(self, x))[1]
"""


@pytest.mark.slow
def test_sigint_during_index_build_keeps_the_staged_chunks_and_a_rerun_resumes(tmp_path):
  served = demo.make(str(tmp_path / "s"), helpers.tiny_config(), classes={"a": 40, "b": 40})
  slow = tmp_path / "slow"
  slow.mkdir()
  (slow / "sitecustomize.py").write_text(_SLOW_ENCODE)
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "hybridhash_jax.index", "build", f"--workdir={served.workdir}",
         f"--images={served.root}", f"--index={out}", "--chunk=8"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", PYTHONPATH=f"{slow}{os.pathsep}{REPO}")
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  staging = out / index_build.STAGING
  deadline = time.time() + 300
  while len(list(staging.glob("*.npz"))) < 2:
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.02)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130 and "Traceback" not in err, err
  staged = len(list(staging.glob("*.npz")))
  assert err.strip().splitlines()[-1] == (f"stopped by SIGINT: {staged} chunks of up to 8 images staged in "
                                          f"{staging}; rerun the same command to resume")
  assert 2 <= staged < 10
  rerun = subprocess.run(cmd, env=dict(env, PYTHONPATH=str(REPO)), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
  assert rerun.returncode == 0, rerun.stderr
  assert f"{staged * 8} resumed" in rerun.stdout and "80 images indexed" in rerun.stdout


def test_a_signal_raised_inside_a_gc_callback_still_stops_the_program():
  """Python only reports an exception of a garbage-collector callback: the signal is sent again."""
  sent = []

  def signal_once(phase, info):
    del info
    if phase == "start" and not sent:
      sent.append(True)
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(100):  # the handler runs here, inside the callback
        time.sleep(0.001)

  gc.callbacks.append(signal_once)
  try:
    with pytest.raises(interrupts.Interrupted, match="interrupted by SIGINT"), interrupts.handled():
      gc.collect()
      deadline = time.time() + 10
      while time.time() < deadline:
        time.sleep(0.01)
  finally:
    gc.callbacks.remove(signal_once)
  assert sent
