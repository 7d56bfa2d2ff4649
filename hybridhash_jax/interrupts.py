"""SIGINT and SIGTERM as a request to stop: raised at once, or noted while a loop finishes its step.

The command-line tools install the handlers (`handled`, from `cli.console`). Outside a `deferred`
block a signal raises `Interrupted` where the program is. Inside one (the training loop) it is only
noted: the loop sees `Deferral.signum`, finishes the step in flight, saves it, waits until the save
is committed and raises `Interrupted` itself. Further signals while it saves are ignored (SIGKILL
still stops it). Without the handlers, as in a notebook, nothing changes: Ctrl-C raises
KeyboardInterrupt as usual and `Deferral.signum` stays None.
"""

import contextlib
import dataclasses
import os
import signal
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


def _handle(signum, frame) -> None:
  del frame
  if not _deferrals:
    raise Interrupted(signum)
  deferral = _deferrals[-1]
  if deferral.signum is None:
    deferral.signum = signum
    # os.write, not print or logging: the handler may run in the middle of a write to stderr.
    os.write(2, f"{signal.Signals(signum).name}: finishing the step in flight and saving it...\n".encode())


@contextlib.contextmanager
def handled():
  """Installs the handlers for the duration and restores the previous ones (no-op off the main thread)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.signal(s, _handle) for s in SIGNALS}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


@contextlib.contextmanager
def deferred():
  """A block in which the signals are noted in the yielded `Deferral` instead of raised."""
  deferral = Deferral()
  _deferrals.append(deferral)
  try:
    yield deferral
  finally:
    _deferrals.remove(deferral)
