"""OS and storage errors: which ones mean damaged files or a failed write, and quiet for the reports of them
that the raised error already states once (orbax's logs, asyncio's, interpreter-level "Exception ignored").
"""

import errno
import json
import logging as pylogging
import os
import re
import sys

from absl import logging

# tensorstore's status codes for bytes that are not what was written (a bad checksum or frame, a short file).
_DAMAGE_STATUS = ("DATA_LOSS", "FAILED_PRECONDITION", "OUT_OF_RANGE", "NOT_FOUND")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EACCES, errno.EROFS, errno.EDQUOT}
_OS_ERROR_CODE = re.compile(r"os_error_code='(\\d+)'")  # how tensorstore reports the OS error of a failed write


def is_damage(e: BaseException) -> bool:
  """Whether an orbax failure means damaged files (a bug, e.g. a wrong target, keeps its traceback)."""
  while e is not None:
    if isinstance(e, (OSError, UnicodeDecodeError, json.JSONDecodeError)) or str(e).startswith(_DAMAGE_STATUS):
      return True
    e = e.__cause__ or e.__context__
  return False


def write_failure(e: BaseException | None) -> OSError | None:
  """The OS error of a failed write (a full disk, an I/O error, no permission) behind `e`, if that is what it is."""
  while e is not None:
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
      return e
    code = _OS_ERROR_CODE.search(str(e))
    if code and int(code.group(1)) in _WRITE_ERRNOS:
      return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    e = e.__cause__ or e.__context__
  return None


class _Leftovers(pylogging.Filter):
  """Orbax's reports of a failure that the raised error states once: after a failed read, its other reads
  of that step fail too, inside tasks nobody awaits any more ("Task exception was never retrieved"),
  and their callbacks land on its closed event loop ("Event loop is closed"); a failed write is logged
  with its trace by each of its threads before `wait_until_finished` raises it, and a file left open on
  a full disk fails once more at exit."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    e = record.exc_info[1] if record.exc_info else None
    if e is not None and record.getMessage().startswith("Task exception was never retrieved"):
      return not is_damage(e)
    return not ("/orbax/" in record.pathname and record.levelno >= pylogging.ERROR
                and (write_failure(e) is not None or _OS_ERROR_CODE.search(record.getMessage())))

  def unraisable(self, hook):
    def filtered(unraisable):
      e = unraisable.exc_value
      closed_loop = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
      if not (closed_loop or write_failure(e) is not None):  # e.g. tensorboardX's flush at exit, disk full
        hook(unraisable)
    filtered.leftovers = self
    return filtered


def silence_leftovers() -> None:
  """Installs the filters (once): after a failure has been raised, its echoes stay quiet."""
  if not getattr(sys.unraisablehook, "leftovers", None):
    leftovers = _Leftovers()
    pylogging.getLogger("asyncio").addFilter(leftovers)
    logging.get_absl_logger().addFilter(leftovers)
    sys.unraisablehook = leftovers.unraisable(sys.unraisablehook)

