"""OS and storage errors: which ones mean damaged files or a failed write, and quiet for the reports of them
that the raised error already states once (orbax's logs, interpreter-level "Exception ignored").
"""

import asyncio
import contextlib
import errno
import json
import logging as pylogging
import os
import re
import sys
import threading
import time

from absl import logging

# tensorstore's status codes for bytes that are not what was written (a bad checksum or frame, a short file).
_DAMAGE_STATUS = ("DATA_LOSS", "FAILED_PRECONDITION", "OUT_OF_RANGE", "NOT_FOUND")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EACCES, errno.EROFS, errno.EDQUOT}
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")  # how tensorstore reports the OS error of a failed write


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


_SETTLE_S = 60.0  # the longest a closing loop waits for its reads


class _SettlingLoop(asyncio.SelectorEventLoop):
  """An event loop that closes once its tasks are done, and counts damaged or unwritable files among the
  failures that someone reported.

  Orbax runs each restore and save on a fresh loop and closes it when the first of its gathered reads
  or writes fails, with the others still in flight: their tensorstore callbacks then land on the closed
  loop ("Event loop is closed", printed from tensorstore's threads), and their failures, which nobody
  awaits, are reported once more when collected ("Task exception was never retrieved"). Here they
  finish before the loop closes, and a task that failed on a damaged or unwritable file has its failure
  retrieved: the raised error states it once. Any other failure is reported as asyncio always does."""

  def __init__(self):
    super().__init__()
    self.set_task_factory(self._task)

  @staticmethod
  def _task(loop, coro, **kwargs) -> asyncio.Task:
    task = asyncio.Task(coro, loop=loop, **kwargs)
    task.add_done_callback(_retrieve_file_failure)
    return task

  def close(self) -> None:
    while not (self.is_running() or self.is_closed()) and (pending := asyncio.all_tasks(self)):
      _, still = self.run_until_complete(asyncio.wait(pending, timeout=_SETTLE_S))
      if still:  # reads that hang: close anyway, rather than hang the caller
        break
    super().close()


def _retrieve_file_failure(task: asyncio.Task) -> None:
  e = None if task.cancelled() else task._exception  # noqa: SLF001  # looked at without retrieving it
  if e is not None and (is_damage(e) or write_failure(e) is not None):
    task.exception()


class _SettlingPolicy(asyncio.DefaultEventLoopPolicy):
  _loop_factory = _SettlingLoop


def settle_writers(timeout_s: float = _SETTLE_S) -> None:
  """Waits for orbax's save threads still running (`timeout_s` at most in all).

  A save that fails in one thread is raised by `wait_until_finished` while the threads of its other
  items still write: left running, they fail at exit ("cannot schedule new futures after interpreter
  shutdown", with a trace) after the raised error was printed."""
  deadline = time.monotonic() + timeout_s
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax."):
      with contextlib.suppress(Exception):  # orbax's join raises the thread's own failure: the one being raised
        thread.join(max(0.0, deadline - time.monotonic()))


class _Leftovers(pylogging.Filter):
  """Orbax's reports of a failed write that the raised error states once: each of its threads logs it with
  its trace before `wait_until_finished` raises it, and a file left open on a full disk fails once more at
  exit."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    e = record.exc_info[1] if record.exc_info else None
    return not ("/orbax/" in record.pathname and record.levelno >= pylogging.ERROR
                and (write_failure(e) is not None or _OS_ERROR_CODE.search(record.getMessage())))

  def unraisable(self, hook):
    def filtered(unraisable):
      if write_failure(unraisable.exc_value) is None:  # e.g. tensorboardX's flush at exit, disk full
        hook(unraisable)
    filtered.leftovers = self
    return filtered


def silence_leftovers() -> None:
  """Installs (once) the event loops that settle before closing, and the filters: after a failure has been
  raised, its echoes stay quiet."""
  if not getattr(sys.unraisablehook, "leftovers", None):
    if type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy:  # not another library's own
      asyncio.set_event_loop_policy(_SettlingPolicy())
    leftovers = _Leftovers()
    logging.get_absl_logger().addFilter(leftovers)
    sys.unraisablehook = leftovers.unraisable(sys.unraisablehook)

