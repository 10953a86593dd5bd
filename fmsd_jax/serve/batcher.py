"""Frames of concurrent requests collected into batches of a few fixed sizes, one device call
at a time.

Why batches: the detector's cost per image falls steeply with the batch on any accelerator (and
on a CPU's matmul units), and requests arrive one file at a time. Why fixed sizes: a jitted
function compiles once per input shape, so a batch of 5 frames would compile a program in the
middle of someone's request. The service compiles every size of `serve.batch_sizes` before it
says it is ready, and a batch of n frames is padded with blank frames to the smallest compiled
size that holds it; no request ever waits on a compile (tests/test_serve.py counts them).

Why bounded: a request reserves a slot per frame before its frames are queued, and past
`serve.queue_frames` reserved frames it is refused at once (`Overloaded`, a 503 with
Retry-After) instead of waiting behind minutes of work it would time out on. A request that
is cancelled (its timeout, or its client gone) has its queued frames skipped and its slots
returned; a batch already on the device finishes and its answers for that request are
dropped. The device is driven from one thread, so the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# model_fn(uint8 batch (B, S, S, 3)) -> (P(fake) (B,), logit margin (B,)), both float32
ModelFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class Overloaded(Exception):
    """Every frame slot is taken: answer 503 and ask the client to come back later."""

    def __init__(self, retry_after_s: int, reason: str):
        super().__init__(reason)
        self.retry_after_s = retry_after_s
        self.reason = reason


@dataclasses.dataclass
class _Item:
    pixels: np.ndarray
    future: asyncio.Future
    queued_at: float


def pad_size(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest compiled batch size holding n frames (n is at most the largest)."""
    return next(s for s in sizes if s >= n)


class Batcher:
    """Owns the device thread; `score` is called from the event loop's coroutines."""

    def __init__(self, model_fn: ModelFn, sizes: tuple[int, ...], image_size: int, *,
                 capacity_frames: int, wait_s: float, observe_batch: Callable[[int, int], None]):
        self.model_fn = model_fn
        self.sizes = tuple(sorted(int(s) for s in sizes))
        self.image_size = int(image_size)
        self.capacity = int(capacity_frames)
        self.wait_s = float(wait_s)
        self.observe_batch = observe_batch  # (frames, padded size) of each batch run
        self.reserved = 0  # frames of the requests admitted and not yet finished
        self.batch_s = 0.0  # how long the last batch took on the device (for Retry-After)
        self._queue: collections.deque[_Item] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._device = ThreadPoolExecutor(1, thread_name_prefix="fmsd-device")

    def queued(self) -> int:
        """Frames waiting for a batch (the queue-depth gauge)."""
        return sum(not item.future.done() for item in self._queue)

    def start(self) -> None:
        """In the event loop that will call `score`."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fmsd-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._device.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def reserve(self, frames: int) -> Iterator[None]:
        """Hold `frames` slots while a request is scored; Overloaded when they are not free."""
        if self.reserved + frames > self.capacity:
            batches = math.ceil((self.reserved + frames) / self.sizes[-1])
            retry = max(1, math.ceil(batches * max(self.batch_s, 0.01)))
            raise Overloaded(retry, f"the service is at capacity ({self.reserved} of "
                             f"serve.queue_frames={self.capacity} frames in progress, "
                             f"{frames} asked); retry in {retry} s")
        self.reserved += frames
        try:
            yield
        finally:
            self.reserved -= frames

    async def on_device(self, fn: Callable, *args):
        """`fn(*args)` in the device thread, between batches (explanations use it)."""
        return await asyncio.get_running_loop().run_in_executor(self._device, fn, *args)

    async def score(self, frames: list[np.ndarray]) -> list[tuple[float, float, float, float]]:
        """(P(fake), logit margin, seconds on the device, seconds queued) per frame."""
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [_Item(f, loop.create_future(), now) for f in frames]
        self._queue.extend(items)
        self._wake.set()
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        finally:  # cancelled or failed: queued frames are skipped by the batcher
            for item in items:
                item.future.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        largest = self.sizes[-1]
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            if len(self._queue) < largest and self.wait_s > 0:
                await asyncio.sleep(self.wait_s)  # let the frames of concurrent requests join
            items: list[_Item] = []
            while self._queue and len(items) < largest:
                item = self._queue.popleft()
                if not item.future.done():
                    items.append(item)
            if not items:
                continue
            size = pad_size(len(items), self.sizes)
            batch = np.zeros((size, self.image_size, self.image_size, 3), np.uint8)
            for i, item in enumerate(items):
                batch[i] = item.pixels
            started = time.perf_counter()
            try:
                prob, logit = await loop.run_in_executor(self._device, self.model_fn, batch)
            except Exception as e:  # a bug: every waiting request answers 500 with it
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            took = time.perf_counter() - started
            self.batch_s = took
            self.observe_batch(len(items), size)
            for i, item in enumerate(items):
                if not item.future.done():
                    item.future.set_result((float(prob[i]), float(logit[i]), took,
                                            started - item.queued_at))
