"""Errors that mean "fix your input", not "a bug": the entry points print them as one `error:` line.

Both are ValueErrors, so library callers that catch ValueError keep working; `main.py` reports
these (and FileNotFoundError) without a traceback, and lets every other exception show its trace.
"""


class ConfigError(ValueError):
  """A config value (or flag, or config argument) no run can use; the message names the field."""


class DataError(ValueError):
  """A dataset file or entry that cannot be used; the message names the file (and line)."""
