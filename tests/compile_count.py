"""Counting XLA compiles: jax reports each backend compile as a monitoring event, so a test can
say how many compiles a call made (compiled once = the second call makes none)."""

from __future__ import annotations

from collections.abc import Callable

import jax

_COMPILES: list[str] = []  # every XLA backend compile of this test process, in order
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _secs, **_: _COMPILES.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)


def counting_compiles(fn: Callable, calls: list[int]) -> Callable:
    """`fn`, appending to `calls` how many compiles each of its calls made."""
    def counted(*args, **kwargs):
        before = len(_COMPILES)
        try:
            return fn(*args, **kwargs)
        finally:
            calls.append(len(_COMPILES) - before)
    return counted
