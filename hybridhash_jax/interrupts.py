"""SIGINT and SIGTERM as a request to stop: raised at once, or noted while a loop finishes its step.

The command-line tools install the handlers (`handled`, from `cli.console`). Outside a `deferred`
block a signal raises `Interrupted` where the program is. Inside one (the training loop) it is only
noted: the loop sees `Deferral.signum`, finishes the step in flight, saves it, waits until the save
is committed and raises `Interrupted` itself. Once a signal has asked the program to stop, further
ones are ignored until the tool exits, so they cannot interrupt its clean-up (SIGKILL still stops it).
A signal that lands in code whose exceptions Python only reports (a garbage-collector callback, a
`__del__`) is sent again a moment later, so it still stops the program.
Without the handlers, as in a notebook, nothing changes: Ctrl-C raises KeyboardInterrupt as usual and
`Deferral.signum` stays None.
"""

import contextlib
import dataclasses
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
  """A stop asked by a signal. A BaseException, like KeyboardInterrupt, so `except Exception` lets it through."""

  def __init__(self, signum: int, message: str | None = None):
    super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
    self.signum = signum

  @property
  def exit_code(self) -> int:
    """128 + the signal number, the shell's convention: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + self.signum


@dataclasses.dataclass
class Deferral:
  signum: int | None = None  # the first signal that arrived inside the block


_deferrals: list[Deferral] = []
_stopping = False  # a signal has asked the program to stop


def _handle(signum, frame) -> None:
  global _stopping
  del frame
  if _stopping:
    return
  if not _deferrals:
    _stopping = True
    raise Interrupted(signum)
  deferral = _deferrals[-1]
  if deferral.signum is None:
    deferral.signum = signum
    # os.write, not print or logging: the handler may run in the middle of a write to stderr.
    os.write(2, f"{signal.Signals(signum).name}: finishing the step in flight and saving it...\n".encode())


def _resend_swallowed(previous_hook):
  """An `Interrupted` raised where Python can only report it is not a stop: the signal is sent again, from a
  thread a moment later, so that it is raised where the program is by then."""

  def hook(unraisable) -> None:
    global _stopping
    if isinstance(unraisable.exc_value, Interrupted):
      _stopping = False
      threading.Timer(0.01, os.kill, (os.getpid(), unraisable.exc_value.signum)).start()
    else:
      previous_hook(unraisable)

  return hook


@contextlib.contextmanager
def handled():
  """Installs the handlers for the duration and restores the previous ones (no-op off the main thread)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  global _stopping
  _stopping = False
  previous = {s: signal.signal(s, _handle) for s in SIGNALS}
  previous_hook, sys.unraisablehook = sys.unraisablehook, _resend_swallowed(sys.unraisablehook)
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    sys.unraisablehook = previous_hook
    _stopping = False


@contextlib.contextmanager
def deferred():
  """A block in which the signals are noted in the yielded `Deferral` instead of raised."""
  global _stopping
  deferral = Deferral()
  _deferrals.append(deferral)
  try:
    yield deferral
  finally:
    _deferrals.remove(deferral)
    _stopping = _stopping or deferral.signum is not None
