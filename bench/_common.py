"""Helpers shared by the benchmarks in bench/, so every table measures the same way.

JAX is imported lazily inside the helpers: `limit_threads` must run before the first
`import jax` of the process (XLA reads its flags once), so this module must not import it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def limit_threads(n: int | None) -> int:
    """Pin this process to n cores and tell XLA; must run before jax is imported.

    Pinning (sched_setaffinity) is what actually holds XLA's CPU runtime to the count;
    PyTorch is told separately with `torch.set_num_threads`. Without `n` nothing is changed
    and both frameworks use every core they may. Also stops JAX preallocating GPU memory, so
    a GPU can be shared with PyTorch in the same process.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if n is None:
        return len(cores) if cores else os.cpu_count() or 1
    if cores and n < len(cores):
        os.sched_setaffinity(0, cores[:n])
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (f"{flags} --xla_cpu_multi_thread_eigen={str(n > 1).lower()} "
                               f"intra_op_parallelism_threads={n}").strip()
    return n


def median_seconds(step: Callable[[], Any], iters: int, warmup: int) -> tuple[float, float]:
    """(first call incl. compile, median of `iters` timed calls) in seconds."""
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def interleaved_times(steps: dict[str, Callable[[], Any]], *, warmup: int, iters: int
                      ) -> dict[str, list[float]]:
    """Seconds per call of each blocking `step`, run round-robin (one call of each per round).

    On shared CPU cores the load changes over minutes; interleaving makes every row see the
    same load, so ratios between rows stay meaningful even when absolute times drift. The
    order rotates every round so no row always runs right after the same neighbour.
    """
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + iters):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            steps[k]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
    return times


def spread(times: Sequence[float]) -> str:
    """min–max of a list of seconds, in ms."""
    return f"{min(times) * 1e3:.0f}–{max(times) * 1e3:.0f}"


def xla_memory(compiled: Any) -> tuple[float, float]:
    """(total, temporaries) in MiB from XLA's compiled memory analysis.

    total = arguments + outputs + temporaries − aliased (donated) bytes: what the step needs
    resident at its peak, on every backend (on CPU it is the only peak figure JAX offers).
    """
    ma = compiled.memory_analysis()
    if ma is None:
        return float("nan"), float("nan")
    total = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
             - ma.alias_size_in_bytes)
    return total / 2**20, ma.temp_size_in_bytes / 2**20


def device_peak() -> float:
    """The first device's peak_bytes_in_use in MiB (GPU/TPU; NaN on CPU). Monotone per process."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan")) / 2**20


def random_batch(batch: int, image_size: int, seed: int = 0, *,
                 pixels: bool = False) -> dict[str, Any]:
    """A host batch {'image': NHWC, 'label': i32} from a fixed seed: normalised f32 values
    (what both frameworks' models take), or uint8 pixels as the input pipeline ships them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (batch, image_size, image_size, 3)
    image = (rng.integers(0, 256, shape, dtype=np.uint8) if pixels
             else rng.standard_normal(shape).astype(np.float32))
    return {"image": image, "label": rng.integers(0, 2, size=batch).astype(np.int32)}


class ProductionStep:
    """The production train step (fmsd_jax/run/train_step.py), sharded and jitted, on a given
    detector, compiled once, ready to time.

    Built as `modes.train.train` builds it (split by the regime's Variable types, the masked
    optimizer and the objective from config_base's defaults with `optim` / `objective`
    overrides, `train_step.make_state`'s state and shardings, donated state and metric sums), so a
    bench row, and a unit test of the step (tests/conftest.py), measures the step users run.
    `mask` None is all layers; `devices` None is every device (a test passes one).
    """

    def __init__(self, det: Any, *, regime: str, spec: Any, lambda_orth: float = 0.0,
                 lambda_spec: float = 0.0, batch: int, image_size: int,
                 optim: dict[str, Any] | None = None, mask: Any = None,
                 total_steps: int = 10_000, devices: Sequence[Any] | None = None):
        import dataclasses

        import jax
        import jax.numpy as jnp
        import ml_collections as mlc
        import numpy as np
        from flax import nnx

        from fmsd_jax import config_base, parallel
        from fmsd_jax.method.decompose import trainable_filter
        from fmsd_jax.method.objective import make_loss_fn
        from fmsd_jax.method.optimizer import make_optimizer
        from fmsd_jax.run import factory, rebuild, train_step

        mesh = parallel.make_mesh(mlc.ConfigDict({"data": -1, "fsdp": 1}), devices)
        graphdef, trainable, frozen = nnx.split(det, trainable_filter(regime), ...)
        self.num_trainable = sum(x.size for x in jax.tree.leaves(trainable))
        if mask is None and spec is not None:
            mask = np.ones(spec.mask_shape, np.float32)
        self.run = rebuild.Run(graphdef, parallel.shard_tree(mesh, trainable),
                               parallel.shard_tree(mesh, frozen), mask, spec, mesh)
        base = config_base.base_config()
        self.objective = dataclasses.replace(factory.objective_section(base),
                                             lambda_orth=lambda_orth, lambda_spec=lambda_spec)
        self.optim = dataclasses.replace(factory.optim_section(base), **(optim or {}))
        self.loss_fn = make_loss_fn(self.objective)
        tx = make_optimizer(self.optim, trainable_state=self.run.trainable, layer_mask=mask,
                            spec=spec, total_steps=total_steps)
        self.state, state_sh = train_step.make_state(self.run, tx)
        sample = {"image": jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32),
                  "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
        self.metric_sums = train_step.init_metric_sums(self.run, self.loss_fn, sample)
        self.jitted = train_step.make_train_step(self.run, self.loss_fn, tx, state_sh)
        self.mesh = mesh
        self.compiled = None

    @property
    def trainable(self) -> Any:
        """The trained leaves now (an nnx.State: `nnx.update(det, step.trainable)`)."""
        return self.state.trainable

    @property
    def opt_state(self) -> Any:
        return self.state.opt_state

    def set_layer_mask(self, mask: Any) -> None:
        """A new layer mask as data of the same compiled step (`optimizer.set_layer_mask`)."""
        from fmsd_jax.method.optimizer import set_layer_mask

        self.state = self.state.replace(opt_state=set_layer_mask(self.opt_state, mask))

    def mean_metrics(self) -> dict[str, float]:
        """The step's metrics (loss, grad_norm, ce, ...) averaged over the steps run so far."""
        import jax

        sums = jax.device_get(self.metric_sums)
        count = float(sums.pop("count"))
        return {k: float(v) / count for k, v in sums.items()}

    def device_batch(self, host: dict[str, Any]) -> dict[str, Any]:
        from fmsd_jax import parallel

        return parallel.global_batch(self.mesh, host, ("image", "label"))

    def compile(self, batch: dict[str, Any]) -> float:
        """Lower and compile for `batch` (device arrays); returns seconds."""
        t0 = time.perf_counter()
        self.compiled = self.jitted.lower(self.state, self.run.frozen, batch,
                                          self.metric_sums).compile()
        return time.perf_counter() - t0

    def __call__(self, batch: dict[str, Any], *, block: bool = True) -> None:
        fn = self.compiled if self.compiled is not None else self.jitted
        self.state, self.metric_sums = fn(self.state, self.run.frozen, batch, self.metric_sums)
        if block:
            self.block()

    def block(self) -> None:
        import jax

        jax.block_until_ready((self.state, self.metric_sums))
