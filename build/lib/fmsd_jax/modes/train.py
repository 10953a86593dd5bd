"""`--mode train`, the loop: mask estimation, decomposition, the sharded jitted step,
checkpoints, validation, and the diagnostics and evaluation at the end.

Modelled on Flax's NNX examples: the detector is `nnx.split` once into (graphdef, trainable,
frozen) by Variable type (`run/rebuild.py`); the step (`run/train_step.py`) is a pure function
of (state, frozen, batch, metric sums) compiled once with explicit shardings and donated
buffers. `--mode mask` (estimate the mask only) is `modes/mask.py`. Metrics stay on device and
are fetched every `log_every` steps, so the host never waits on the accelerator in between.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections as mlc
import numpy as np

from fmsd_jax import atomic, parallel
from fmsd_jax.data import pipeline
from fmsd_jax.errors import BadInput, TrainingDiverged
from fmsd_jax.evaluators import adaptation, decision, plots, scoring
from fmsd_jax.method.optimizer import learning_rates
from fmsd_jax.modes import evaluate
from fmsd_jax.run import (
    checkpoints,
    factory,
    manifest,
    preflight,
    progress,
    rebuild,
    train_step,
    workdir_files,
)

log = logging.getLogger("fmsd_jax")


class Preempted(Exception):
    """Raised after SIGTERM once every process has saved the same step; main exits cleanly."""


class PreemptionWatch:
    """`watch(step)` is True at the step at which every process of the run saves and stops.

    Several processes (`jax.process_count() > 1`): orbax's `reached_preemption(step)`, which
    asks JAX's preemption sync manager (`multihost_utils.reached_preemption_sync_point`),
    started by `jax.distributed.initialize` (`jax/_src/distributed.py`,
    `initialize_preemption_sync_manager`) with a SIGTERM notifier. A SIGTERM to any one
    process reaches all of them through the coordination service; each reports the last step
    it passed here and all take the largest plus one (XLA's `preemption_sync_manager.cc`,
    `ComputeSyncCallCounter`; `ReachedSyncPoint` waits while that runs), so all of them save
    the same step and meet in orbax's save barrier. A flag local to each process let the one
    that got the signal save a step the others never save, and wait in that barrier forever.
    So every process must call this at every step, with consecutive steps, `start` first. A
    SIGTERM that comes before that first call of a resumed run is counted from step 0 and its
    step never comes: the run goes on (a scheduler's kill then loses the steps since the last
    checkpoint), as does one during the final evaluation, which JAX's handler only notes.
    No Python handler is installed then: `signal.signal` replaces the notifier's C handler
    (`std::signal` in `preemption_notifier.cc`), after which the sync manager never hears of
    the signal (measured: the local flag set, `reached_preemption_sync_point` never True).

    One process: orbax's call is always False there (no `jax.distributed` client, so no sync
    manager), so a Python SIGTERM handler sets a flag, which is all one process needs to agree
    with itself on the step. `close` puts the previous handler back."""

    def __init__(self, reached_preemption: Callable[[int], bool]):
        self.processes = jax.process_count()
        self._flag = False
        self._installed = False
        if self.processes > 1:
            self._reached = reached_preemption
            if not jax.config.values.get("jax_enable_preemption_service", True):
                log.warning("jax_enable_preemption_service is off: a SIGTERM ends these %d "
                            "processes without a save; a rerun resumes from the last "
                            "checkpoint", self.processes)
        else:
            self._reached = lambda _: self._flag
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True

    def _on_sigterm(self, *_) -> None:
        self._flag = True

    def __call__(self, step: int) -> bool:
        return bool(self._reached(step))

    def message(self, saved: str) -> str:
        by = f" by one of the {self.processes} processes" if self.processes > 1 else ""
        return f"SIGTERM received{by}: {saved}"

    def close(self) -> None:
        if self._installed:  # None: a handler from outside Python, which cannot be put back
            signal.signal(signal.SIGTERM,
                          signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False


def train(cfg: mlc.ConfigDict, workdir: str | Path) -> dict:
    """Train (resuming if WORKDIR holds a checkpoint), then evaluate on the test datasets."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh(cfg.mesh)
    parallel.check_batch_fits(mesh, cfg.train.batch_size)
    parallel.check_batch_fits(mesh, cfg.eval.batch_size, "config.eval.batch_size")
    preflight.check_config(cfg)
    decision.check_config(cfg)  # the final evaluation's fields, before any training
    factory.check_init_from(cfg)
    checkpoints.check_resumable(workdir, cfg)
    # Every split this run will read (train, validation, test) is listed and checked now, so
    # a missing test frame is named before the first step, not after the last.
    manifest.record(workdir, "train", preflight.check_data(cfg, "train"))
    loader = pipeline.make_train_loader(
        cfg.data, global_batch_size=cfg.train.batch_size, seed=cfg.seed,
        shard_index=jax.process_index(), shard_count=jax.process_count())
    num_records = pipeline.num_records(loader)
    if num_records == 0:
        raise BadInput(f"the training set {tuple(cfg.data.train_dataset)} is empty")
    log.info("input pipeline: %d grain worker processes (config.data.workers=%d), %d read "
             "threads each", pipeline.resolve_workers(cfg.data.workers), cfg.data.workers,
             cfg.data.read_threads)
    if jax.process_index() == 0:
        atomic.write_json(workdir / workdir_files.CONFIG_JSON, cfg.to_dict())

    run = rebuild.open_run(cfg, workdir, mesh)
    if jax.process_index() == 0:
        plots.plot_layer_mask(workdir, cfg.method.regime)  # when the mask was just estimated
    steps = train_step.total_steps(cfg, num_records)
    head0 = adaptation.head_snapshot(run.trainable)  # the step donates run.trainable
    parts = train_step.assemble_step(cfg, run, steps)
    state, step_fn = parts["state"], parts["step_fn"]
    metric_sums = parts["metric_sums"]

    data_iter = iter(loader)
    ckpts = checkpoints.RunCheckpoints(workdir, max_to_keep=cfg.train.max_to_keep,
                                       select_metric=cfg.eval.select_metric,
                                       record=run.record)
    if ckpts.latest_step() is not None:
        state = ckpts.restore_latest(parallel.abstract_tree(mesh, state), data_iter)
        log.info("resumed from step %d", int(state.step))

    writer = (progress.TensorBoard(workdir / workdir_files.TENSORBOARD_DIR)
              if jax.process_index() == 0 else None)
    schedules = learning_rates(factory.optim_section(cfg), steps)  # logged beside the loss
    eval_every = cfg.train.eval_every or max(1, num_records // cfg.train.batch_size)

    def validate(step: int, state: train_step.TrainState) -> None:
        val = scoring.validate(cfg, run, state.trainable)
        if val is not None:
            ckpts.save_best(step, state.trainable, val)
            if writer:
                writer.scalars(step, {f"val/{k}": v for k, v in val.items()})

    preempted = PreemptionWatch(ckpts.latest.reached_preemption)
    start = int(state.step)
    meter = progress.Progress(steps, start, cfg.train.batch_size)
    try:
        if start and preempted(start):  # SIGTERM before the first step of a resumed run
            raise Preempted(preempted.message(f"step {start} is saved in {workdir}"))
        if start and (start % eval_every == 0 or start == steps) \
                and (ckpts.best_saved_step() or 0) < start:
            # Stopped between this step's latest save and its best save (killed, disk full):
            # score it now, or the resumed run could pick another best than the uninterrupted
            # one. The same weights and data give the same score, and a worse one is not kept.
            validate(start, state)
        for step in range(start + 1, steps + 1):
            batch = parallel.global_batch(mesh, next(data_iter), ("image", "label"))
            state, metric_sums = step_fn(state, run.frozen, batch, metric_sums)
            last = step == steps
            saves = step % cfg.train.checkpoint_every == 0 or last
            logs = saves or step % cfg.train.log_every == 0
            if logs:
                metric_sums = _log_metrics(metric_sums, step, meter, writer, schedules, mesh)
            if saves:
                with meter.paused():  # img/s counts training steps only
                    ckpts.save(step, state, data_iter, force=True)
            if step == cfg.train.fault_after_step \
                    and cfg.train.fault_process in (-1, jax.process_index()):
                ckpts.wait()
                os.kill(os.getpid(), getattr(signal, cfg.train.fault_signal))
                # A Python handler runs at once; JAX's notifier looks at its flag once a second
                # (kListenInterval, preemption_notifier.cc), then the processes agree on a step.
                # Waiting here for both keeps the agreed step from depending on the machine's
                # load (the other processes wait meanwhile in the next step's collectives).
                time.sleep(0.5 if preempted.processes == 1 else 3.0)
            if preempted(step):
                if not saves:
                    if not logs:
                        metric_sums = _log_metrics(metric_sums, step, meter, writer,
                                                   schedules, mesh)
                    ckpts.save(step, state, data_iter, force=True)
                ckpts.wait()
                raise Preempted(preempted.message(f"saved step {step} to {workdir}"))
            if step % eval_every == 0 or last:
                with meter.paused():
                    validate(step, state)
        ckpts.wait()
    finally:
        preempted.close()
        ckpts.close()
        if writer:
            writer.close()

    del state  # the optimizer state is not needed any more; free it before the diagnostics
    trainable, step, which = rebuild.restore_for_eval(cfg, workdir, run)
    adaptation.run_diagnostics(cfg, workdir, run, trainable, head0, step=step, checkpoint=which)
    if not cfg.train.eval_after_training:
        return {}
    return evaluate.evaluate(cfg, workdir, run=run, trainable=trainable, checkpoint=(which, step))


def _log_metrics(metric_sums: dict, step: int, meter: progress.Progress, writer, schedules,
                 mesh) -> dict:
    host = jax.device_get(metric_sums)
    count = max(float(host.pop("count")), 1.0)
    means = {k: float(v) / count for k, v in host.items()}
    if not np.isfinite(means["loss"]):
        raise TrainingDiverged(
            f"loss became {means['loss']} by step {step}; training stopped and the last good "
            "checkpoint was kept. Lower config.optim.lr or enable config.optim.grad_clip")
    means |= {name: float(fn(step)) for name, fn in schedules.items()}
    line = meter.update(step, means)
    log.info(line)
    if writer:
        writer.scalars(step, {f"train/{k}": v for k, v in means.items()}
                       | {"train/images_per_s": meter.images_per_s})
    return train_step.zero_metric_sums(metric_sums.keys(), mesh)
