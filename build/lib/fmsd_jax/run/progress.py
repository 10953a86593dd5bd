"""What a running job tells its user: a progress line and TensorBoard event files."""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Iterator
from pathlib import Path

from tensorboardX import SummaryWriter

from fmsd_jax import atomic
from fmsd_jax.errors import writing


class Progress:
    """Step rate, images/s and ETA measured over the interval since the last report, less the
    time spent `paused()` (validation, checkpoint saves): the rate is the training step's."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int):
        self.total = total_steps
        self.batch_size = batch_size
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self._paused = 0.0
        self.steps_per_s = 0.0
        self.images_per_s = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time in this block is not training time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0

    def update(self, step: int, metrics: dict[str, float]) -> str:
        now = time.perf_counter()
        elapsed = max(now - self._last_time - self._paused, 1e-9)
        self.steps_per_s = (step - self._last_step) / elapsed
        self.images_per_s = self.steps_per_s * self.batch_size
        self._last_step, self._last_time, self._paused = step, now, 0.0
        remaining = (self.total - step) / self.steps_per_s if self.steps_per_s else 0.0
        eta = datetime.timedelta(seconds=int(remaining))
        terms = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        return (f"step {step}/{self.total} | {self.steps_per_s:.2f} steps/s "
                f"{self.images_per_s:.1f} img/s | ETA {eta} | {terms}")


class TensorBoard:
    """Scalars into WORKDIR/tb (tensorboardX: event files without TensorFlow)."""

    def __init__(self, logdir: str | Path):
        atomic.note_written(logdir, Path(logdir).exists())
        self._logdir = Path(logdir)
        self._writer = SummaryWriter(str(logdir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        with writing(self._logdir):
            for key, value in values.items():
                self._writer.add_scalar(key, float(value), step)
            self._writer.flush()

    def close(self) -> None:
        with writing(self._logdir):
            self._writer.close()
