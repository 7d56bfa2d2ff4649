"""Errors that mean "fix your input", not "a bug": the command-line tools print them as one `error:` line.

Every one is a `UserError`. The entry points (`cli.console`) report those without a traceback, with
exit status 1, and let every other exception show its trace. Each also derives from the built-in error
it refines (ValueError, FileNotFoundError, KeyError, ...), so library callers that catch those keep working.
"""

import importlib


class UserError(Exception):
  """Something the user can fix; the message names it (a file, a field, a step)."""


class ConfigError(UserError, ValueError):
  """A config value (or flag, or config argument) no run can use; the message names the field."""


class DataError(UserError, ValueError):
  """A dataset file or entry that cannot be used; the message names the file (and line)."""


class CheckpointError(UserError, ValueError):
  """A checkpoint that cannot be read or does not fit the run; the message names the step and the file."""


class NotFoundError(UserError, FileNotFoundError):
  """A file the run needs (a dataset, weights, a checkpoint, an index) is not there; the message names it."""


class NoSuchItemError(UserError, KeyError):
  """An item id an index does not hold; the message names the id and the index."""


class NonFiniteLossError(UserError, FloatingPointError):
  """Training met a non-finite loss or gradient; the message names the step and what to change."""


class WorkdirBusyError(UserError):
  """Another training run holds the workdir; the message names its host and PID."""


class WriteError(UserError, OSError):
  """A file that could not be written (a full disk, an I/O error, no permission): names the path and the OS error."""

  def __init__(self, path, error: OSError):
    super().__init__(error.errno, error.strerror or str(error), str(path))

  def __str__(self) -> str:
    return f"cannot write {self.filename}: {self.strerror}"


class MissingExtraError(UserError, ImportError, ValueError):
  """An optional dependency is not installed; the message names the extra that brings it."""


def import_extra(module: str, extra: str):
  """Imports `module` of the `hybridhash-jax[extra]` install, or says which extra to install."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise MissingExtraError(f"{module} is not installed: pip install 'hybridhash-jax[{extra}]'") from e
