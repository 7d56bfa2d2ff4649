"""What every command-line tool (`main`, `index`, `export`, `serve`, `convert`) shares: its console.

`console(log_level)` wraps a tool's body:
  logging   the project's own lines at INFO; other libraries' (orbax, absl, grain, jax, ...) only from
            `--log_level` up (default warning): `--log_level=info` shows them all;
  errors    a `errors.UserError` ends the run with one `error: ...` line on stderr and exit status 1;
            any other exception is a bug and keeps its traceback;
  signals   SIGINT and SIGTERM stop the run with exit status 130 and 143 and one line, no traceback
            (training saves its step first: see `interrupts`).
`compilation_cache()` turns on JAX's persistent compilation cache, so a rerun does not compile again.
The tools import jax and the rest only inside the console, after their flags and config are checked.
"""

import contextlib
import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging

from hybridhash_jax import errors
from hybridhash_jax import interrupts

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_LEVEL_HELP = "level from which other libraries' log lines (orbax, grain, jax, ...) are shown"
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
CACHE_ENV = "HYBRIDHASH_JAX_COMPILATION_CACHE"  # "0" turns the default cache off


class _OursOrAbove(logging.Filter):
  """Passes the project's records, and other loggers' from `level` up."""

  def __init__(self, level: int):
    super().__init__()
    self.level = level

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= self.level or record.pathname.startswith(_PACKAGE)


def add_log_level(parser) -> None:
  """The `--log_level` flag of an argparse tool."""
  parser.add_argument("--log_level", default="warning", choices=LOG_LEVELS, help=LOG_LEVEL_HELP)


@contextlib.contextmanager
def _logging(log_level: str):
  level = logging.getLevelName(log_level.upper())
  if not flags.FLAGS.is_parsed():  # an argparse tool: absl would open with "Logging before flag parsing"
    flags.FLAGS.mark_as_parsed()
  absl_logging.use_absl_handler()  # app.run does this; the argparse tools need it too
  handler = absl_logging.get_absl_handler()
  previous = logging.root.level
  logging.root.setLevel(min(level, logging.INFO))
  quiet = _OursOrAbove(level)
  handler.addFilter(quiet)
  try:
    yield
  finally:
    handler.removeFilter(quiet)
    logging.root.setLevel(previous)


def _message(e: errors.UserError) -> str:
  return str(e.args[0]) if len(e.args) == 1 else str(e)  # a KeyError's str() would quote it


@contextlib.contextmanager
def console(log_level: str = "warning"):
  """The body of a command-line tool: its logging, its user errors and its signals (see the module doc)."""
  with _logging(log_level), interrupts.handled():
    try:
      yield
    except errors.UserError as e:
      raise SystemExit(f"error: {_message(e)}") from None
    except interrupts.Interrupted as e:
      print(e, file=sys.stderr, flush=True)
      raise SystemExit(e.exit_code) from None


def default_cache_dir() -> str:
  """The per-user cache: $XDG_CACHE_HOME/hybridhash-jax/jax, else ~/.cache/hybridhash-jax/jax."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "hybridhash-jax", "jax")


def cache_dir(configured: str | None, enabled: bool = True) -> str | None:
  """The compilation cache directory to use, None for none: `configured` (JAX_COMPILATION_CACHE_DIR) or the default.

  HYBRIDHASH_JAX_COMPILATION_CACHE=0 or `enabled` False (JAX_ENABLE_COMPILATION_CACHE=false) turn it off; a
  local directory that cannot be created or written turns it off with a warning.
  """
  if not enabled or os.environ.get(CACHE_ENV, "1").lower() in ("0", "false", "no", "off"):
    return None
  path = configured or default_cache_dir()
  if "://" in path:  # a remote directory: JAX reports its errors as warnings itself
    return path
  try:
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
      raise PermissionError(f"{path} is not writable")
  except OSError as e:
    absl_logging.warning("compilation cache off: %s (%s=0 turns it off without this warning)", e, CACHE_ENV)
    return None
  return path


def compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache for this process (see `cache_dir`); returns its directory.

  Every program is cached, however fast it compiled: a small model's programs each compile in well
  under JAX's default threshold of one second, and together they are most of a short run.
  """
  import jax  # here, not at the top: a tool reports its flag and config errors before this import
  path = cache_dir(jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
  if path is None:  # off even where JAX_COMPILATION_CACHE_DIR names a directory
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor, and none set for us
  return path
