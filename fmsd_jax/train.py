"""The training loop: mask estimation, decomposition, a sharded jitted step, checkpoints, eval.

Modelled on Flax's NNX examples: the detector is `nnx.split` once into (graphdef, trainable,
frozen) by Variable type; the step is a pure function of (trainable, optimizer state, frozen,
batch) compiled once with explicit shardings and donated buffers. Metrics stay on device and
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
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import nnx, struct

from fmsd_jax import (
    assemble,
    atomic,
    build,
    checkpointing,
    diagnostics,
    evaluate,
    feedback,
    layer_mask,
    manifest,
    preflight,
    sharding,
)
from fmsd_jax.data import pipeline
from fmsd_jax.errors import AlreadyExists, BadInput, TrainingDiverged
from fmsd_jax.method.objective import make_loss_fn
from fmsd_jax.method.optimizer import learning_rates, make_optimizer
from fmsd_jax.model.vit import on_mesh

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


# ---------------------------------------------------------------------------------------------
# Assembly


# ---------------------------------------------------------------------------------------------
# The step


@struct.dataclass
class TrainState:
    """What the train step carries from one step to the next, and a training checkpoint's
    `state` item: the step count, the trainable leaves and the optimizer state of those only.

    A pytree (flax.struct), so jit shardings, donation and orbax take it as they took the dict
    it replaces; orbax stores it under the same keys, so older checkpoints restore into it."""

    step: jax.Array
    trainable: nnx.State
    opt_state: optax.OptState


def make_train_step(run: build.Run, loss_fn, tx: optax.GradientTransformation, state_shardings):
    """jit(step) with explicit shardings; trainable and optimizer state buffers are donated."""
    graphdef = run.graphdef
    batch_sh = sharding.batch_sharding(run.mesh)
    repl = sharding.replicated(run.mesh)
    frozen_sh = sharding.tree_shardings(run.mesh, run.frozen)

    def step(state, frozen, batch, metric_sums):
        def objective(trainable):
            model = nnx.merge(graphdef, trainable, frozen)
            return loss_fn(model, batch)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.trainable)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   **aux}
        metric_sums = {**{k: metric_sums[k] + v.astype(jnp.float32) for k, v in metrics.items()},
                       "count": metric_sums["count"] + 1.0}
        return TrainState(state.step + 1, trainable, opt_state), metric_sums

    return jax.jit(
        on_mesh(step, run.mesh),
        in_shardings=(state_shardings, frozen_sh, {"image": batch_sh, "label": batch_sh}, repl),
        out_shardings=(state_shardings, repl),
        donate_argnums=(0, 3),
    )


def init_metric_sums(run: build.Run, loss_fn, step_fn_sample_batch) -> dict:
    """Zeros with the keys the step produces (so the jitted signature never changes)."""
    _, aux = jax.eval_shape(
        lambda t, f, b: loss_fn(nnx.merge(run.graphdef, t, f), b),
        run.trainable, run.frozen, step_fn_sample_batch)
    keys = ["loss", "grad_norm", *aux.keys(), "count"]
    if run.abstract:
        repl = sharding.replicated(run.mesh)
        return {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=repl) for k in keys}
    return zero_metric_sums(keys, run.mesh)


def zero_metric_sums(keys, mesh) -> dict:
    """Replicated zeros, committed like the step's outputs (so the step never recompiles)."""
    return jax.device_put({k: jnp.zeros((), jnp.float32) for k in keys},
                          sharding.replicated(mesh))


def batch_spec(cfg: mlc.ConfigDict, batch_size: int, mesh, *, labels: bool = True) -> dict:
    """Shape, dtype and sharding of a global batch as the loader delivers it (uint8 NHWC)."""
    size, batch_sh = cfg.model.image_size, sharding.batch_sharding(mesh)
    spec = {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8,
                                          sharding=batch_sh)}
    if labels:
        spec["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sh)
    return spec


def make_state(run: build.Run, tx: optax.GradientTransformation
               ) -> tuple[TrainState, TrainState]:
    """(train state, its shardings): step, trainable leaves, optimizer state for them only.

    On an abstract run the state is ShapeDtypeStructs (the optimizer state from
    `jax.eval_shape(tx.init, ...)`), so the same code serves the planner."""
    if run.abstract:
        state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), run.trainable,
                           jax.eval_shape(tx.init, run.trainable))
        state = sharding.abstract_tree(run.mesh, state)
        return state, sharding.tree_shardings(run.mesh, state)
    state = TrainState(jnp.zeros((), jnp.int32), run.trainable, tx.init(run.trainable))
    state_sh = sharding.tree_shardings(run.mesh, state)
    return jax.device_put(state, state_sh), state_sh


def assemble_step(cfg: mlc.ConfigDict, run: build.Run, steps: int) -> dict:
    """Loss, optimizer, state, metric accumulators and the jitted step of a run: what `train`
    runs and what `--mode plan` compiles for a TPU slice, built by the same code."""
    loss_fn = make_loss_fn(assemble.objective_section(cfg))
    tx = make_optimizer(assemble.optim_section(cfg), trainable_state=run.trainable,
                        layer_mask=run.mask, spec=run.spec, total_steps=steps)
    state, state_sh = make_state(run, tx)
    sample = batch_spec(cfg, cfg.train.batch_size, run.mesh)
    return dict(loss_fn=loss_fn, tx=tx, state=state, state_shardings=state_sh, sample=sample,
                metric_sums=init_metric_sums(run, loss_fn, sample),
                step_fn=make_train_step(run, loss_fn, tx, state_sh))


# ---------------------------------------------------------------------------------------------
# The loop


def total_steps(cfg: mlc.ConfigDict, num_train_records: int) -> int:
    if cfg.train.total_steps:
        return int(cfg.train.total_steps)
    per_epoch = max(1, num_train_records // cfg.train.batch_size)
    return per_epoch * int(cfg.train.num_epochs)


def train(cfg: mlc.ConfigDict, workdir: str | Path) -> dict:
    """Train (resuming if WORKDIR holds a checkpoint), then evaluate on the test datasets."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_fits(mesh, cfg.train.batch_size)
    sharding.check_batch_fits(mesh, cfg.eval.batch_size, "config.eval.batch_size")
    preflight.check_config(cfg)
    assemble.check_init_from(cfg)
    checkpointing.check_resumable(workdir, cfg)
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
        atomic.write_json(workdir / checkpointing.CONFIG_JSON, cfg.to_dict())

    run = build.prepare(cfg, workdir, mesh)
    steps = total_steps(cfg, num_records)
    head0 = diagnostics.head_snapshot(run.trainable)  # the step donates run.trainable
    parts = assemble_step(cfg, run, steps)
    state, step_fn = parts["state"], parts["step_fn"]
    metric_sums = parts["metric_sums"]

    data_iter = iter(loader)
    ckpts = checkpointing.RunCheckpoints(workdir, max_to_keep=cfg.train.max_to_keep,
                                         select_metric=cfg.eval.select_metric,
                                         record=run.record)
    if ckpts.latest_step() is not None:
        state = ckpts.restore_latest(sharding.abstract_tree(mesh, state), data_iter)
        log.info("resumed from step %d", int(state.step))

    writer = feedback.TensorBoard(workdir / "tb") if jax.process_index() == 0 else None
    schedules = learning_rates(assemble.optim_section(cfg), steps)  # logged beside the loss
    eval_every = cfg.train.eval_every or max(1, num_records // cfg.train.batch_size)

    def validate(step: int, state: TrainState) -> None:
        val = evaluate.validate(cfg, run, state.trainable)
        if val is not None:
            ckpts.save_best(step, state.trainable, val)
            if writer:
                writer.scalars(step, {f"val/{k}": v for k, v in val.items()})

    preempted = PreemptionWatch(ckpts.latest.reached_preemption)
    start = int(state.step)
    progress = feedback.Progress(steps, start, cfg.train.batch_size)
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
            batch = sharding.global_batch(mesh, next(data_iter), ("image", "label"))
            state, metric_sums = step_fn(state, run.frozen, batch, metric_sums)
            last = step == steps
            saves = step % cfg.train.checkpoint_every == 0 or last
            logs = saves or step % cfg.train.log_every == 0
            if logs:
                metric_sums = _log_metrics(metric_sums, step, progress, writer, schedules, mesh)
            if saves:
                with progress.paused():  # img/s counts training steps only
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
                        metric_sums = _log_metrics(metric_sums, step, progress, writer,
                                                   schedules, mesh)
                    ckpts.save(step, state, data_iter, force=True)
                ckpts.wait()
                raise Preempted(preempted.message(f"saved step {step} to {workdir}"))
            if step % eval_every == 0 or last:
                with progress.paused():
                    validate(step, state)
        ckpts.wait()
    finally:
        preempted.close()
        ckpts.close()
        if writer:
            writer.close()

    del state  # the optimizer state is not needed any more; free it before the diagnostics
    trainable, step, which = build.restore_evaluated(cfg, workdir, run)
    diagnostics.run_diagnostics(cfg, workdir, run, trainable, head0, step=step, checkpoint=which)
    if not cfg.train.eval_after_training:
        return {}
    return evaluate.evaluate(cfg, workdir, run=run, trainable=trainable)


def _log_metrics(metric_sums: dict, step: int, progress, writer, schedules, mesh) -> dict:
    host = jax.device_get(metric_sums)
    count = max(float(host.pop("count")), 1.0)
    means = {k: float(v) / count for k, v in host.items()}
    if not np.isfinite(means["loss"]):
        raise TrainingDiverged(
            f"loss became {means['loss']} by step {step}; training stopped and the last good "
            "checkpoint was kept. Lower config.optim.lr or enable config.optim.grad_clip")
    means |= {name: float(fn(step)) for name, fn in schedules.items()}
    line = progress.update(step, means)
    log.info(line)
    if writer:
        writer.scalars(step, {f"train/{k}": v for k, v in means.items()}
                       | {"train/images_per_s": progress.images_per_s})
    return zero_metric_sums(metric_sums.keys(), mesh)


def mask_only(cfg: mlc.ConfigDict, workdir: str | Path) -> np.ndarray:
    """`--mode mask`: estimate, save and plot the layer mask, nothing else."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not (cfg.method.regime == "fmsd" and cfg.method.mask.enabled):
        raise BadInput(f"config.method.regime={cfg.method.regime!r} with mask.enabled="
                         f"{cfg.method.mask.enabled} uses no layer mask; nothing to estimate")
    if checkpointing.latest_saved_step(workdir) is not None:
        raise AlreadyExists(
            f"{workdir} holds checkpoints trained under its {checkpointing.MASK_JSON}; --mode "
            "mask would replace that record of their mask (they keep their own copy, which "
            "restoring reads). Estimate it in a new --workdir")
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_fits(mesh, cfg.train.batch_size)
    preflight.check_config(cfg)
    manifest.record(workdir, "mask", preflight.check_data(cfg, "mask"))
    detector = assemble.build_detector(cfg)
    nnx.update(detector, sharding.shard_tree(mesh, nnx.state(detector)))
    return layer_mask.estimate_mask(cfg, detector, workdir, mesh,
                                    stability_seeds=cfg.method.mask.stability_seeds)
