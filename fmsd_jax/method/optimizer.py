"""The masked optimizer: Adam(W) over the trainable state only, the layer mask applied last.

Config fields (`cfg.optim`, an ml_collections ConfigDict or any mapping/object; Effort's
defaults in brackets):

    name: 'adam' | 'adamw'        ['adam'; Effort uses torch Adam, whose weight decay is an L2
                                   term added to the gradient; 'adamw' decouples it]
    lr: float                      [2e-4]   artifact factors (and, in 'full', the backbone)
    head_lr: float | None          [None -> lr]
    weight_decay: float            [5e-4]
    head_weight_decay: float|None  [None -> weight_decay]
    b1, b2, eps                    [0.9, 0.999, 1e-8]
    schedule: 'constant'|'cosine'  ['constant'; Effort has no scheduler]
    warmup_steps: int              [0]      linear warm-up from 0, both schedules
    grad_clip: float | None        [None]   global-norm clipping of the (masked) gradient

The layer mask — (L, n_targets), `spec.targets` order — is *state* of the optimizer, not a
constant of the compiled step: `set_layer_mask(opt_state, mask)` swaps it without recompiling.
It multiplies each stacked artifact factor's gradient (so clipping and Adam's moments see only
selected layers) and, last of all, its update (so weight decay cannot move a masked-out layer:
its factors get an exact 0 and stay bit-identical). Head leaves are never masked. The
optimizer is built for the trainable state only, so frozen leaves own no state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fmsd_jax.method.decompose import ArtifactFactor, DecompositionSpec, target_of_path
from fmsd_jax.model.detector import HeadParam

DEFAULTS: dict[str, Any] = dict(
    name="adam",
    lr=2e-4,
    head_lr=None,
    weight_decay=5e-4,
    head_weight_decay=None,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    schedule="constant",
    warmup_steps=0,
    grad_clip=None,
)


def optim_config(opt_cfg: Any = None) -> dict[str, Any]:
    """Fields of `opt_cfg` (a ConfigDict, mapping or object) over DEFAULTS; unknown fields fail."""
    out = dict(DEFAULTS)
    if opt_cfg is None:
        return out
    items = (
        dict(opt_cfg)
        if isinstance(opt_cfg, Mapping)
        else dict(opt_cfg.items())
        if hasattr(opt_cfg, "items")
        else vars(opt_cfg)
    )
    unknown = set(items) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown optim field(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    out.update({k: v for k, v in items.items()})
    if out["name"] not in ("adam", "adamw"):
        raise ValueError(f"optim.name={out['name']!r}: use 'adam' (Effort) or 'adamw'")
    if out["schedule"] not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule={out['schedule']!r}: use 'constant' or 'cosine'")
    return out


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


def learning_rates(opt_cfg: Any, total_steps: int) -> dict[str, optax.Schedule]:
    """{'lr': backbone schedule, 'head_lr': head schedule}, the ones make_optimizer uses (optax
    transforms do not expose theirs), for the training log and TensorBoard."""
    c = optim_config(opt_cfg)
    head_lr = c["lr"] if c["head_lr"] is None else c["head_lr"]
    return {name: make_schedule(value, schedule=c["schedule"],
                                warmup_steps=int(c["warmup_steps"]), total_steps=total_steps)
            for name, value in (("lr", c["lr"]), ("head_lr", head_lr))}


def _adam(
    lr: float, wd: float, c: dict[str, Any], total_steps: int
) -> optax.GradientTransformation:
    sched = make_schedule(
        lr, schedule=c["schedule"], warmup_steps=int(c["warmup_steps"]), total_steps=total_steps
    )
    parts = []
    if c["name"] == "adam" and wd:
        parts.append(optax.add_decayed_weights(wd))  # torch Adam: L2 in the gradient
    parts.append(optax.scale_by_adam(b1=c["b1"], b2=c["b2"], eps=c["eps"]))
    if c["name"] == "adamw" and wd:
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
    opt_cfg: Any,
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
    c = optim_config(opt_cfg)
    head_lr = c["lr"] if c["head_lr"] is None else c["head_lr"]
    head_wd = c["weight_decay"] if c["head_weight_decay"] is None else c["head_weight_decay"]
    groups = {
        "body": _adam(c["lr"], c["weight_decay"], c, total_steps),
        "head": _adam(head_lr, head_wd, c, total_steps),
    }

    def labels(params):
        return jax.tree.map(
            lambda v: v.replace("head" if isinstance(v, HeadParam) else "body"),
            params,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )

    parts = []
    if c["grad_clip"]:
        parts.append(optax.clip_by_global_norm(float(c["grad_clip"])))
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
