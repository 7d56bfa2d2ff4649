"""A request batcher: concurrent queries that arrive within a few milliseconds share one `encode` call.

The web app awaits `batcher(image)` per request. With batching on, a worker task takes the first
waiting image, waits `window_s` for others (unless `max_batch` are already waiting), and runs `fn`
on the stacked batch in a thread, one batch at a time, so the event loop keeps serving. Off, each
image is encoded alone (in a thread, as many at once as requests), the baseline of the benchmark.
"""

import asyncio
import collections
import contextlib
from typing import Callable

import numpy as np


class Batcher:
  """Calls `fn` ((n, ...) array -> (n, ...) array) on batches of the items awaited concurrently."""

  def __init__(self, fn: Callable[[np.ndarray], np.ndarray], *, window_s: float = 0.003, max_batch: int = 32,
               enabled: bool = True):
    if max_batch < 1 or window_s < 0:
      raise ValueError(f"batcher: max_batch must be >= 1 and window_s >= 0, got {max_batch}, {window_s}")
    self.fn, self.window_s, self.max_batch, self.enabled = fn, window_s, max_batch, enabled
    self._queue: asyncio.Queue | None = None
    self.batch_counts = collections.Counter()  # batch size -> how many batches of it ran (tests, benchmark)

  @contextlib.asynccontextmanager
  async def running(self):
    """Runs the worker for the lifetime of the app (its lifespan)."""
    if not self.enabled:
      yield
      return
    self._queue = asyncio.Queue()
    worker = asyncio.create_task(self._work())
    try:
      yield
    finally:
      worker.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await worker
      self._queue = None

  async def __call__(self, item: np.ndarray) -> np.ndarray:
    if not self.enabled:
      self.batch_counts[1] += 1
      return (await asyncio.to_thread(self.fn, item[None]))[0]
    if self._queue is None:
      raise RuntimeError("Batcher used outside `async with batcher.running()`")
    future = asyncio.get_running_loop().create_future()
    await self._queue.put((item, future))
    return await future

  async def _work(self) -> None:
    while True:
      batch = [await self._queue.get()]
      if self._queue.qsize() < self.max_batch - 1:
        await asyncio.sleep(self.window_s)
      while len(batch) < self.max_batch and not self._queue.empty():
        batch.append(self._queue.get_nowait())
      items, futures = zip(*batch)
      self.batch_counts[len(items)] += 1
      try:
        out = await asyncio.to_thread(self.fn, np.stack(items))
      except Exception as e:  # noqa: BLE001  # handed to each waiting request, which reports it
        for future in futures:
          if not future.done():
            future.set_exception(e)
      else:
        for future, row in zip(futures, out):
          if not future.done():  # a request whose client went away is cancelled
            future.set_result(row)
