"""CLIP vision weights into our tower: read, convert, resample the position embedding
to another image size, and assign into an existing module."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fmsd_jax.model.layers import LinearFactory, dense_factory
from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig
from fmsd_jax.model.weights.containers import (
    CheckpointError,
    PathLike,
    read_tensors,
    resolve_checkpoint,
)
from fmsd_jax.model.weights.layouts import (
    ACTIVATIONS,
    convert,
    find_layout,
    flat_key,
    infer_config,
    raise_problems,
)

# --------------------------------------------------------------------------------------------
# position embeddings


def _cubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of torch's bicubic upsampling (A = -0.75, align_corners=False,
    no antialias), as `F.interpolate` and hence Hugging Face and open_clip use it."""
    a = -0.75
    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        src = scale * (o + 0.5) - 0.5  # not clamped at 0 for cubic, unlike linear
        i0 = math.floor(src)
        t = src - i0
        w = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
             ((a + 2) * t - (a + 3)) * t * t + 1,
             ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
             ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a)
        for k in range(4):
            m[o, min(max(i0 - 1 + k, 0), in_size - 1)] += w[k]
    return m


def resample_pos_embedding(pos: np.ndarray, grid: int) -> np.ndarray:
    """The (1 + g*g, d) position table resampled to a grid x grid patch grid.

    The class token's row is kept; the patch rows are resized bicubically exactly as Hugging
    Face's `interpolate_pos_encoding` (and open_clip's `resize_pos_embed`) do, computed in
    float64, so the result matches theirs to float32 rounding (~1e-7 relative).
    """
    old = math.isqrt(pos.shape[0] - 1)
    if old * old + 1 != pos.shape[0]:
        raise ValueError(f"position table of {pos.shape[0]} rows is not 1 + a square grid")
    if old == grid:
        return pos
    w = _cubic_weights(old, grid)
    patches = pos[1:].astype(np.float64).reshape(old, old, -1)
    patches = np.einsum("ih,jw,hwd->ijd", w, w, patches).reshape(grid * grid, -1)
    return np.concatenate([pos[:1], patches.astype(pos.dtype)], axis=0)


# --------------------------------------------------------------------------------------------
# public API


def read_clip_vision(path: PathLike, image_size: int | None = None, *, heads: int | None = None,
                     activation: str | None = None) -> tuple[ViTConfig, dict[str, np.ndarray]]:
    """(config, float32 weights in our flat layout) of the CLIP vision tower in `path`.

    `image_size` other than the checkpoint's resamples the position table (see
    `resample_pos_embedding`). `heads` and `activation` override what the files beside the
    checkpoint say; only a bare state dict of a non-standard tower needs them. Keys of the
    returned dict are our nnx state paths joined by dots ("transformer.blocks.attn.q.kernel"),
    ready for `assign_weights` into an existing tower or detector backbone.
    """
    p = resolve_checkpoint(path)
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    container, tensors = read_tensors(p)
    layout = find_layout(p, list(tensors))
    cfg = infer_config(p, tensors, layout, container, heads, activation)
    weights, problems = convert(tensors, layout, cfg)
    raise_problems(p, f"the {layout.label} CLIP vision weights ({container}) do not match a "
                   f"ViT with width {cfg.width}, {cfg.layers} layers, patch "
                   f"{cfg.patch_size}, MLP {cfg.mlp_dim}, projection {cfg.proj_dim}",
                   problems)
    if image_size is not None and image_size != cfg.image_size:
        if image_size <= 0 or image_size % cfg.patch_size:
            raise ValueError(
                f"image_size {image_size} is not a positive multiple of the patch size "
                f"{cfg.patch_size} of {p}; choose a size whose side divides by the patch")
        weights["pos_embedding"] = resample_pos_embedding(weights["pos_embedding"],
                                                          image_size // cfg.patch_size)
        cfg = dataclasses.replace(cfg, image_size=image_size)
    return cfg, weights


def assign_weights(tower: nnx.Module, weights: Mapping[str, np.ndarray], *,
                   source: PathLike = "weights") -> None:
    """Put `weights` (our flat layout) into every `nnx.Param` of `tower`, strictly.

    Every parameter must be filled and every weight used, with equal shapes; otherwise the
    error lists each offending key. A parameter that already lives on devices keeps its
    sharding (the trainer loads into a sharded model); dtypes stay the tower's (float32).
    """
    flat = nnx.to_flat_state(nnx.state(tower, nnx.Param))
    targets = {flat_key(path): var for path, var in flat}
    problems = [f"missing   {k}  (expected {list(targets[k].get_value().shape)})"
                for k in targets if k not in weights]
    problems += [f"unused    {k}  {list(np.shape(weights[k]))}"
                 for k in weights if k not in targets]
    new = {}
    for path, var in flat:
        k = flat_key(path)
        if k not in weights:
            continue
        cur = var.get_value()
        w = np.asarray(weights[k])
        if tuple(w.shape) != tuple(cur.shape):
            problems.append(f"shape     {k}  {list(w.shape)}, expected {list(cur.shape)}")
            continue
        w = w.astype(cur.dtype, copy=False)
        sharding = getattr(cur, "sharding", None)
        new[path] = jax.device_put(w, sharding) if isinstance(cur, jax.Array) else jnp.asarray(w)
    raise_problems(source, "weights do not fit the tower's parameters", problems)
    nnx.update(tower, nnx.from_flat_state(new))


def load_clip_vision(path: PathLike, *, image_size: int | None = None,
                     dtype: str = "float32", attention_impl: str | None = None,
                     remat: str = "dots", linear_factory: LinearFactory = dense_factory,
                     rngs: nnx.Rngs | None = None, heads: int | None = None,
                     activation: str | None = None) -> CLIPVisionTower:
    """The CLIP vision tower in `path` with its weights in place.

    `dtype` is the compute dtype (parameters stay float32). Without `rngs` the tower is built
    abstractly and every parameter comes from the checkpoint, so no random initialisation is
    paid for; a `linear_factory` whose layers own parameters that no checkpoint holds needs
    `rngs` to initialise them, and its layers must still expose `kernel`/`bias` to be filled
    (decompose after loading otherwise).
    """
    cfg, weights = read_clip_vision(path, image_size, heads=heads, activation=activation)
    cfg = dataclasses.replace(cfg, dtype=dtype, attention_impl=attention_impl, remat=remat)

    def build(r: nnx.Rngs) -> CLIPVisionTower:
        return CLIPVisionTower(cfg, rngs=r, linear_factory=linear_factory)

    tower = nnx.eval_shape(lambda: build(nnx.Rngs(0))) if rngs is None else build(rngs)
    assign_weights(tower, weights, source=resolve_checkpoint(path))
    abstract = [flat_key(p) for p, v in nnx.to_flat_state(nnx.state(tower))
                if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if abstract:
        raise CheckpointError(
            f"{path}: the tower's linear_factory creates state the checkpoint does not hold "
            f"({abstract[:5]}); pass rngs= to initialise it")
    return tower
