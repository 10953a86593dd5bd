"""The reference train step: a pure function of (trainable, opt_state, frozen, batch).

train.py's production step follows this shape (DESIGN.md §2): the model is split once by
Variable type; only the trainable state is differentiated (frozen weights are closed-over
inputs, so XLA never computes their gradients); the trainable and optimizer states are
donated; no host sync. Sharding is the caller's: jit follows the input shardings, or wrap with
explicit in/out_shardings.

    graphdef, trainable, frozen = nnx.split(model, trainable_filter(regime), ...)
    tx = make_optimizer(cfg.optim, trainable_state=trainable, layer_mask=mask, spec=spec,
                        total_steps=n)
    opt_state = tx.init(trainable)
    step = make_train_step(graphdef, tx, make_loss_fn(cfg))
    trainable, opt_state, aux = step(trainable, opt_state, frozen, batch)
    nnx.update(model, trainable)   # when the module is needed again (eval, merge, export)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax
from flax import nnx

StepFn = Callable[
    [nnx.State, Any, nnx.State, Mapping[str, jax.Array]],
    tuple[nnx.State, Any, dict[str, jax.Array]],
]


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]],
    *,
    jit: bool = True,
) -> StepFn:
    def train_step(trainable, opt_state, frozen, batch):
        def loss_of(t):
            return loss_fn(nnx.merge(graphdef, t, frozen), batch)

        (_, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, aux

    return jax.jit(train_step, donate_argnums=(0, 1)) if jit else train_step
