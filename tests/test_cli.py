"""The command-line tools' console: the `error:` line, bugs' tracebacks, signals, log filtering, the compile cache."""

import logging
import os
import signal
import subprocess
import sys
import time

from absl import logging as absl_logging
import jax
import pytest

from hybridhash_jax import cli
from hybridhash_jax import errors
from hybridhash_jax import interrupts
from hybridhash_jax import main as main_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_user_error_is_one_line_and_status_1():
  with pytest.raises(SystemExit) as e, cli.console():
    raise errors.NotFoundError("data/x.txt: list file not found")
  assert e.value.code == "error: data/x.txt: list file not found"  # Python prints it to stderr, status 1
  with pytest.raises(SystemExit) as e, cli.console():
    raise errors.NoSuchItemError("no item 7 in the index")
  assert e.value.code == "error: no item 7 in the index"  # not KeyError's quoted repr
  with pytest.raises(SystemExit) as e, cli.console():
    raise errors.NonFiniteLossError("non-finite loss at step 5")  # train's, a user error too
  assert e.value.code == "error: non-finite loss at step 5"


def test_a_bug_keeps_its_traceback():
  with pytest.raises(FileNotFoundError), cli.console():  # a plain FileNotFoundError is not a user error
    open("/nonexistent/surely")  # noqa: SIM115


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_exit_128_plus_signal_without_traceback(signum, status, capsys):
  before = signal.getsignal(signum)
  with pytest.raises(SystemExit) as e, cli.console():
    os.kill(os.getpid(), signum)
    time.sleep(5)  # the handler raises in the main thread long before this ends
  assert e.value.code == status
  assert capsys.readouterr().err == f"interrupted by {signal.Signals(signum).name}\n"
  assert signal.getsignal(signum) is before  # the previous handler is back


def test_a_deferred_signal_is_noted_and_later_ones_ignored():
  with interrupts.handled(), interrupts.deferred() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)  # while it "saves": ignored
    time.sleep(0.05)
  assert stop.signum == signal.SIGTERM


def _record(pathname, level):
  return logging.LogRecord("any", level, pathname, 1, "message", None, None)


def test_other_libraries_info_lines_are_hidden_unless_asked():
  ours = os.path.join(os.path.dirname(cli.__file__), "train.py")
  theirs = os.path.join(os.path.dirname(jax.__file__), "_src", "xla_bridge.py")
  handler = absl_logging.get_absl_handler()
  with cli.console():
    assert handler.filter(_record(ours, logging.INFO))
    assert not handler.filter(_record(theirs, logging.INFO))
    assert handler.filter(_record(theirs, logging.WARNING))
  with cli.console("info"):
    assert handler.filter(_record(theirs, logging.INFO))
  assert handler.filter(_record(theirs, logging.INFO))  # outside a console nothing is filtered


def test_cache_dir_default_env_and_off_switches(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  monkeypatch.delenv(cli.CACHE_ENV, raising=False)
  assert cli.cache_dir(None) == str(tmp_path / "xdg" / "hybridhash-jax" / "jax")
  assert os.path.isdir(tmp_path / "xdg" / "hybridhash-jax" / "jax")
  assert cli.cache_dir(str(tmp_path / "mine")) == str(tmp_path / "mine")  # JAX_COMPILATION_CACHE_DIR wins
  assert cli.cache_dir(None, enabled=False) is None  # JAX_ENABLE_COMPILATION_CACHE=false
  monkeypatch.setenv(cli.CACHE_ENV, "0")
  assert cli.cache_dir(None) is None
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.delenv(cli.CACHE_ENV)
  assert cli.cache_dir(None) == str(tmp_path / "home" / ".cache" / "hybridhash-jax" / "jax")


def test_an_unwritable_cache_dir_only_warns(tmp_path, caplog):
  (tmp_path / "file").write_text("")
  with caplog.at_level(logging.WARNING):
    assert cli.cache_dir(str(tmp_path / "file" / "cache")) is None  # cannot be created under a file
  assert "compilation cache off" in caplog.text and str(tmp_path / "file") in caplog.text


def test_compilation_cache_caches_every_program(tmp_path, monkeypatch):
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes", "jax_enable_compilation_cache")
  saved = {n: getattr(jax.config, n) for n in names}
  for env in ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", cli.CACHE_ENV):
    monkeypatch.delenv(env, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    assert cli.compilation_cache() == str(tmp_path / "hybridhash-jax" / "jax")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "hybridhash-jax" / "jax")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
    monkeypatch.setenv(cli.CACHE_ENV, "0")
    assert cli.compilation_cache() is None and not jax.config.jax_enable_compilation_cache
  finally:
    for n, v in saved.items():
      jax.config.update(n, v)


def test_summary_names_the_results_and_the_next_command():
  results = {"map": 0.9712, "step": 500, "top_k": 597, "best": {"map": 0.975, "step": 300}}
  lines = main_cli.summary(results, "/tmp/q").splitlines()
  assert lines[0] == "final mAP@597 0.9712 at step 500; best 0.9750 at step 300"
  assert lines[1] == "results: /tmp/q/eval/results.json"
  assert "/tmp/q/eval/pr_curve.png" in lines[2]
  assert lines[3].startswith("next: python -m hybridhash_jax.index build --workdir=/tmp/q --images=DIR "
                             "--index=/tmp/q/index")


_NO_HEAVY = "import sys\nfor m in ('jax', 'flax', 'optax', 'orbax', 'grain'):\n  sys.modules[m] = None\n"


def test_main_reports_config_errors_before_the_heavy_imports(tmp_path):
  (tmp_path / "sitecustomize.py").write_text(_NO_HEAVY)  # importing jax, flax, optax, orbax or grain now fails
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
  for flag, message in [("--config.model.bits=0", "error: config.model.bits=0 must be > 0"),
                        ("--config=configs/nosuch.py", "error: --config=configs/nosuch.py: cannot load it")]:
    proc = subprocess.run([sys.executable, "-m", "hybridhash_jax.main", "--config=configs/quickstart.py", flag,
                           f"--workdir={tmp_path / 'w'}"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().startswith(message) and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "w").exists()
