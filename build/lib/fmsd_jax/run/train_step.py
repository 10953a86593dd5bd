"""The train step, compiled once per run: a pure function of (state, frozen, batch,
metric sums) with explicit shardings and donation, plus the state it starts from. The same
function is what training runs, what `--mode plan` compiles for a TPU slice and what the
tests check for compile-once and mask-as-data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax
from flax import nnx, struct

from fmsd_jax import parallel
from fmsd_jax.method.objective import make_loss_fn
from fmsd_jax.method.optimizer import make_optimizer
from fmsd_jax.parallel import on_mesh
from fmsd_jax.run import factory, rebuild


@struct.dataclass
class TrainState:
    """What the train step carries from one step to the next, and a training checkpoint's
    `state` item: the step count, the trainable leaves and the optimizer state of those only.

    A pytree (flax.struct), so jit shardings, donation and orbax take it as they took the dict
    it replaces; orbax stores it under the same keys, so older checkpoints restore into it."""

    step: jax.Array
    trainable: nnx.State
    opt_state: optax.OptState


def make_train_step(run: rebuild.Run, loss_fn, tx: optax.GradientTransformation, state_shardings):
    """jit(step) with explicit shardings; trainable and optimizer state buffers are donated."""
    graphdef = run.graphdef
    batch_sh = parallel.batch_sharding(run.mesh)
    repl = parallel.replicated(run.mesh)
    frozen_sh = parallel.tree_shardings(run.mesh, run.frozen)

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


def init_metric_sums(run: rebuild.Run, loss_fn, step_fn_sample_batch) -> dict:
    """Zeros with the keys the step produces (so the jitted signature never changes)."""
    _, aux = jax.eval_shape(
        lambda t, f, b: loss_fn(nnx.merge(run.graphdef, t, f), b),
        run.trainable, run.frozen, step_fn_sample_batch)
    keys = ["loss", "grad_norm", *aux.keys(), "count"]
    if run.abstract:
        repl = parallel.replicated(run.mesh)
        return {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=repl) for k in keys}
    return zero_metric_sums(keys, run.mesh)


def zero_metric_sums(keys, mesh) -> dict:
    """Replicated zeros, committed like the step's outputs (so the step never recompiles)."""
    return jax.device_put({k: jnp.zeros((), jnp.float32) for k in keys},
                          parallel.replicated(mesh))


def batch_spec(cfg: mlc.ConfigDict, batch_size: int, mesh, *, labels: bool = True) -> dict:
    """Shape, dtype and sharding of a global batch as the loader delivers it (uint8 NHWC)."""
    size, batch_sh = cfg.model.image_size, parallel.batch_sharding(mesh)
    spec = {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8,
                                          sharding=batch_sh)}
    if labels:
        spec["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sh)
    return spec


def make_state(run: rebuild.Run, tx: optax.GradientTransformation
               ) -> tuple[TrainState, TrainState]:
    """(train state, its shardings): step, trainable leaves, optimizer state for them only.

    On an abstract run the state is ShapeDtypeStructs (the optimizer state from
    `jax.eval_shape(tx.init, ...)`), so the same code serves the planner."""
    if run.abstract:
        state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), run.trainable,
                           jax.eval_shape(tx.init, run.trainable))
        state = parallel.abstract_tree(run.mesh, state)
        return state, parallel.tree_shardings(run.mesh, state)
    state = TrainState(jnp.zeros((), jnp.int32), run.trainable, tx.init(run.trainable))
    state_sh = parallel.tree_shardings(run.mesh, state)
    return jax.device_put(state, state_sh), state_sh


def assemble_step(cfg: mlc.ConfigDict, run: rebuild.Run, steps: int) -> dict:
    """Loss, optimizer, state, metric accumulators and the jitted step of a run: what `train`
    runs and what `--mode plan` compiles for a TPU slice, built by the same code."""
    loss_fn = make_loss_fn(factory.objective_section(cfg))
    tx = make_optimizer(factory.optim_section(cfg), trainable_state=run.trainable,
                        layer_mask=run.mask, spec=run.spec, total_steps=steps)
    state, state_sh = make_state(run, tx)
    sample = batch_spec(cfg, cfg.train.batch_size, run.mesh)
    return dict(loss_fn=loss_fn, tx=tx, state=state, state_shardings=state_sh, sample=sample,
                metric_sums=init_metric_sums(run, loss_fn, sample),
                step_fn=make_train_step(run, loss_fn, tx, state_sh))


def total_steps(cfg: mlc.ConfigDict, num_train_records: int) -> int:
    if cfg.train.total_steps:
        return int(cfg.train.total_steps)
    per_epoch = max(1, num_train_records // cfg.train.batch_size)
    return per_epoch * int(cfg.train.num_epochs)
