"""The masked optimizer: Adam(W) over the trainable state only, the layer mask applied last.

Settings (`OptimConfig`, built from `config.optim` by `fmsd_jax.run.factory.optim_section`;
config_base.py holds every default and its reason, this module none):

    name: 'adam' | 'adamw'   Effort uses torch Adam, whose weight decay is an L2 term added to
                             the gradient; 'adamw' decouples it
    lr, weight_decay         artifact factors (and, in 'full', the backbone)
    head_lr, head_weight_decay   the linear head
    b1, b2, eps              Adam's
    schedule: 'constant' | 'cosine'; warmup_steps: linear warm-up from 0, both schedules
    grad_clip: float         global-norm clipping of the (masked) gradient; 0 disables

The layer mask — (L, n_targets), `spec.targets` order — is *state* of the optimizer, not a
constant of the compiled step: `set_layer_mask(opt_state, mask)` swaps it without recompiling.
It multiplies each stacked artifact factor's gradient (so clipping and Adam's moments see only
selected layers) and, last of all, its update (so weight decay cannot move a masked-out layer:
its factors get an exact 0 and stay bit-identical). Head leaves are never masked. The
optimizer is built for the trainable state only, so frozen leaves own no state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fmsd_jax.method.decompose import ArtifactFactor, DecompositionSpec, target_of_path
from fmsd_jax.model.detector import HeadParam

NAMES = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer's settings, typed. No field has a default: config_base.py is the one
    default table, so an optimizer built here and one built by a run cannot disagree."""

    name: str
    lr: float
    head_lr: float
    weight_decay: float
    head_weight_decay: float
    b1: float
    b2: float
    eps: float
    schedule: str
    warmup_steps: int
    grad_clip: float

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"optim.name={self.name!r}: use 'adam' (Effort) or 'adamw'")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}: use 'constant' or 'cosine'")


def make_schedule(
    lr: float, *, schedule: str, warmup_steps: int, total_steps: int
) -> optax.Schedule:
    if schedule == "constant":
        if warmup_steps:
            return optax.join_schedules(
                [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
                [warmup_steps],
            )
        return optax.constant_schedule(lr)
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1), end_value=0.0
    )


def learning_rates(opt: OptimConfig, total_steps: int) -> dict[str, optax.Schedule]:
    """{'lr': backbone schedule, 'head_lr': head schedule}, the ones make_optimizer uses (optax
    transforms do not expose theirs), for the training log and TensorBoard."""
    return {name: make_schedule(value, schedule=opt.schedule,
                                warmup_steps=int(opt.warmup_steps), total_steps=total_steps)
            for name, value in (("lr", opt.lr), ("head_lr", opt.head_lr))}


def _adam(lr: float, wd: float, opt: OptimConfig, total_steps: int
          ) -> optax.GradientTransformation:
    sched = make_schedule(
        lr, schedule=opt.schedule, warmup_steps=int(opt.warmup_steps), total_steps=total_steps
    )
    parts = []
    if opt.name == "adam" and wd:
        parts.append(optax.add_decayed_weights(wd))  # torch Adam: L2 in the gradient
    parts.append(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps))
    if opt.name == "adamw" and wd:
        parts.append(optax.add_decayed_weights(wd))
    parts.append(optax.scale_by_learning_rate(sched))
    return optax.chain(*parts)


class LayerMaskState(NamedTuple):
    mask: jax.Array  # (L, n_targets) float32; data, so a new mask never recompiles
    inner: optax.OptState


def _leaf_columns(state: Any, targets: tuple[str, ...]) -> list[int | None]:
    """Mask column of each leaf of a trainable state (None: not a masked leaf)."""
    cols: list[int | None] = []
    flat = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    for path, var in flat:
        masked = isinstance(var, ArtifactFactor)
        col = target_of_path(path, targets) if masked else None
        if masked and col is None:
            raise ValueError(
                f"artifact factor {jax.tree_util.keystr(path)} is outside the "
                f"decomposed targets {targets}"
            )
        leaves = jax.tree.leaves(var)
        cols.extend([col] * len(leaves))
    return cols


def _apply_mask(tree: Any, mask: jax.Array, cols: list[int | None]) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for x, col in zip(leaves, cols, strict=True):
        if col is None or x is None:
            out.append(x)
        else:
            m = mask[:, col].astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            out.append(x * m)
    return jax.tree.unflatten(treedef, out)


def layer_masked(
    inner: optax.GradientTransformation, layer_mask: Any, columns: list[int | None]
) -> optax.GradientTransformation:
    """Mask gradients before `inner` and its updates after it, by the (L, n_targets) mask."""
    mask0 = jnp.asarray(np.asarray(layer_mask), jnp.float32)

    def init(params):
        return LayerMaskState(mask=mask0, inner=inner.init(params))

    def update(updates, state, params=None):
        g = _apply_mask(updates, state.mask, columns)
        u, inner_state = inner.update(g, state.inner, params)
        return _apply_mask(u, state.mask, columns), LayerMaskState(state.mask, inner_state)

    return optax.GradientTransformation(init, update)


def set_layer_mask(opt_state: LayerMaskState, layer_mask: Any) -> LayerMaskState:
    """A new layer mask for the same compiled step (shape and dtype unchanged)."""
    new = jnp.asarray(np.asarray(layer_mask), jnp.float32)
    if new.shape != opt_state.mask.shape:
        raise ValueError(f"layer mask shape {new.shape} != {opt_state.mask.shape}")
    old = opt_state.mask
    # Same placement *and* committedness as the old mask, or jit would see a new signature.
    if getattr(old, "committed", False):
        new = jax.device_put(new, old.sharding)
    return opt_state._replace(mask=new)


def make_optimizer(
    opt: OptimConfig,
    *,
    trainable_state: nnx.State,
    layer_mask: Any | None,
    spec: DecompositionSpec | None,
    total_steps: int,
) -> optax.GradientTransformation:
    """optax transformation for `trainable_state` (an nnx.State from the regime's split).

    Groups by Variable type: `HeadParam` gets head_lr/head_weight_decay, every other trainable
    leaf (artifact factors; in 'full', all backbone params) lr/weight_decay. Chain:
    layer-mask(grad) → clip → per-group Adam(W) + schedule → layer-mask(update).
    `layer_mask` None means all layers (the Effort setting); `spec` None means no decomposed
    leaves (full fine-tuning, linear probe).
    """
    groups = {
        "body": _adam(opt.lr, opt.weight_decay, opt, total_steps),
        "head": _adam(opt.head_lr, opt.head_weight_decay, opt, total_steps),
    }

    def labels(params):
        return jax.tree.map(
            lambda v: v.replace("head" if isinstance(v, HeadParam) else "body"),
            params,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )

    parts = []
    if opt.grad_clip:
        parts.append(optax.clip_by_global_norm(float(opt.grad_clip)))
    parts.append(optax.multi_transform(groups, labels))
    tx = optax.chain(*parts)

    if spec is None:
        if any(
            isinstance(v, ArtifactFactor)
            for v in jax.tree.leaves(trainable_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        ):
            raise ValueError("trainable state has artifact factors; pass the DecompositionSpec")
        return tx
    targets = tuple(spec.targets)
    if layer_mask is None:
        layer_mask = np.ones(spec.mask_shape, np.float32)
    if tuple(np.shape(layer_mask)) != spec.mask_shape:
        raise ValueError(
            f"layer mask shape {np.shape(layer_mask)} != (layers, targets) "
            f"{spec.mask_shape} for targets {targets}"
        )
    return layer_masked(tx, layer_mask, _leaf_columns(trainable_state, targets))


def optimizer_state_bytes(opt_state: Any) -> int:
    return int(
        sum(
            np.prod(x.shape) * x.dtype.itemsize
            for x in jax.tree.leaves(opt_state)
            if hasattr(x, "shape")
        )
    )
