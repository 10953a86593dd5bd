"""CLIP vision tower in Flax NNX, faithful to OpenAI CLIP / Hugging Face `CLIPVisionModel`.

Every detail that changes the numbers is CLIP's: quick_gelu, LayerNorm eps 1e-5, the class
token prepended *before* the position embedding is added, `ln_pre` on the embeddings, `ln_post`
on the class token (Hugging Face's `pooler_output`) and an optional bias-free projection.

The transformer blocks hold their parameters stacked along a leading layer axis and run under
`jax.lax.scan` (DESIGN.md §3: an unrolled loop doubles the CPU training step). Per-layer
choices made by the method (which layers train) are therefore data along that axis, never
structure. Each of q, k, v, out (and fc1, fc2) is built by `ViTConfig.linear_factory`, so the
method can swap a dense layer for a decomposed one without touching this file.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fmsd_jax.model.layers import (
    ATTENTION_IMPLS,
    SKINNY_CONTRACTION,
    LayerNorm,
    LinearFactory,
    activation,
    dense_factory,
    einsum_attention,
    matmul,
    resolve_attention_impl,
)
from fmsd_jax.parallel import gather_weights

# Architectures of the public CLIP vision towers; `tiny` is for tests and the demo.
VARIANTS: dict[str, dict[str, int]] = {
    "B/32": dict(width=768, layers=12, heads=12, patch_size=32, mlp_dim=3072, proj_dim=512),
    "B/16": dict(width=768, layers=12, heads=12, patch_size=16, mlp_dim=3072, proj_dim=512),
    "L/14": dict(width=1024, layers=24, heads=16, patch_size=14, mlp_dim=4096, proj_dim=768),
    "H/14": dict(width=1280, layers=32, heads=16, patch_size=14, mlp_dim=5120, proj_dim=1024),
    "tiny": dict(width=64, layers=2, heads=4, patch_size=8, mlp_dim=256, proj_dim=32),
}

ATTN_PROJECTIONS = ("q", "k", "v", "out")
MLP_PROJECTIONS = ("fc1", "fc2")
REMAT_POLICIES = ("dots", "none", "full")


def save_wide_dots(prim: Any, *avals: Any, **params: Any) -> bool:
    """remat='dots': keep every matmul output except skinny contractions, which are recomputed.

    Why not jax's checkpoint_dots: it also keeps each decomposed projection's artifact output
    ((x U diag s) Vᵀ, a full-width activation from a K*r contraction), four per block. The
    compiled TPU step showed FMSD holding more activation memory per image than full
    fine-tuning because of them (B/16 on v5e-8: 0.086 against 0.074 GiB per image; 0.071 with
    them recomputed), for a recompute of K*r/width of the block's matmul FLOPs."""
    if prim is not jax.lax.dot_general_p:
        return False
    (contracting, _), _ = params["dimension_numbers"]
    return math.prod(avals[0].shape[d] for d in contracting) > SKINNY_CONTRACTION


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Geometry and numerics of a CLIP vision tower."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    patch_size: int = 16
    mlp_dim: int = 3072
    proj_dim: int | None = 512  # None: no visual projection (pooled feature only)
    image_size: int = 224
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"  # CLIP's x * sigmoid(1.702 x); "gelu" for other towers
    dtype: str = "float32"  # compute dtype; parameters are always float32
    # None: 'einsum' on CPU, jax.nn.dot_product_attention's own choice elsewhere; 'einsum';
    # or an implementation of jax.nn.dot_product_attention ('xla', 'cudnn'). See Attention.
    attention_impl: str | None = None
    # Pad the token sequence to a multiple of this inside the transformer; padded tokens are
    # masked out as keys, so outputs are unchanged. None: 8 under 'cudnn' (jax's cuDNN path
    # rejects odd lengths such as ViT-B/16's 197 when training), otherwise no padding.
    token_multiple: int | None = None
    # What a block keeps for the backward pass (REMAT_POLICIES): 'dots' keeps the matmul
    # outputs and recomputes the cheap elementwise ops (LayerNorm, GELU, softmax), 'none' keeps
    # everything, 'full' recomputes the whole block (least memory, one more forward).
    remat: str = "dots"

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat {self.remat!r}; use one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; use one of "
                             f"{ATTENTION_IMPLS}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.token_multiple is not None and self.token_multiple < 1:
            raise ValueError(f"token_multiple must be None or >= 1, got {self.token_multiple}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size "
                f"{self.patch_size}; choose a size whose side divides by the patch"
            )

    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> ViTConfig:
        if name not in VARIANTS:
            raise ValueError(f"unknown ViT variant {name!r}; known: {sorted(VARIANTS)}")
        return cls(**{**VARIANTS[name], **overrides})

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + 1

    @property
    def padded_tokens(self) -> int:
        """Sequence length inside the transformer (num_tokens rounded up; see token_multiple)."""
        multiple = self.token_multiple
        if multiple is None:
            multiple = 8 if resolve_attention_impl(self.attention_impl) == "cudnn" else 1
        return -(-self.num_tokens // multiple) * multiple

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with separate q, k, v, out projections (each decomposable)."""

    def __init__(self, cfg: ViTConfig, factory: LinearFactory, rngs: nnx.Rngs):
        d, dt = cfg.width, cfg.compute_dtype
        self.q = factory(d, d, name="q", dtype=dt, rngs=rngs)
        self.k = factory(d, d, name="k", dtype=dt, rngs=rngs)
        self.v = factory(d, d, name="v", dtype=dt, rngs=rngs)
        self.out = factory(d, d, name="out", dtype=dt, rngs=rngs)
        self.heads = cfg.heads
        self.impl = cfg.attention_impl

    def __call__(self, x: jax.Array, num_valid: int | None = None) -> jax.Array:
        """Self-attention over x (b, t, d); tokens at positions >= num_valid are padding and
        are never attended to (their own rows are computed and ignored by the caller)."""
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        impl = resolve_attention_impl(self.impl)
        padded = num_valid is not None and num_valid < t
        if impl == "einsum":
            o = einsum_attention(q, k, v, num_valid)
        else:
            # Only key lengths: padded queries still see every real key, so their rows stay
            # finite and no masked-out row (a softmax over nothing) is ever formed.
            lengths = jnp.full((b,), num_valid, jnp.int32) if padded else None
            o = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                             implementation=impl)
        return self.out(o.reshape(b, t, d))


class MLP(nnx.Module):
    def __init__(self, cfg: ViTConfig, factory: LinearFactory, rngs: nnx.Rngs):
        dt = cfg.compute_dtype
        self.fc1 = factory(cfg.width, cfg.mlp_dim, name="fc1", dtype=dt, rngs=rngs)
        self.fc2 = factory(cfg.mlp_dim, cfg.width, name="fc2", dtype=dt, rngs=rngs)
        self.act = activation(cfg.activation)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class Block(nnx.Module):
    """Pre-LN residual block: x + attn(ln_1 x), then + mlp(ln_2 x)."""

    def __init__(self, cfg: ViTConfig, factory: LinearFactory, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(cfg.width, cfg.layer_norm_eps)
        self.attn = Attention(cfg, factory, rngs)
        self.ln_2 = LayerNorm(cfg.width, cfg.layer_norm_eps)
        self.mlp = MLP(cfg, factory, rngs)

    def __call__(self, x: jax.Array, num_valid: int | None = None) -> jax.Array:
        x = x + self.attn(self.ln_1(x), num_valid)
        return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):
    """`layers` blocks whose parameters are stacked on axis 0 and run under `lax.scan`."""

    def __init__(self, cfg: ViTConfig, factory: LinearFactory, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=cfg.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, factory, rngs)

        self.blocks = make_blocks(rngs)
        self.num_layers = cfg.layers
        self.remat = cfg.remat

    def __call__(self, x: jax.Array, num_valid: int | None = None) -> jax.Array:
        """x (b, t, d); positions >= num_valid are padding (see Attention)."""
        graphdef, state = nnx.split(self.blocks)

        def body(h, layer_state):
            return nnx.merge(graphdef, gather_weights(layer_state))(h, num_valid), None

        # Why 'dots' is the default: with everything saved, the scan stacks every elementwise
        # intermediate (and a copy of each layer's weights) into (layers, ...) buffers that
        # are allocated and zero-filled afresh each step; keeping only the matmul outputs cut
        # a ViT-B/16 FMSD step's temporaries 1631 -> 1062 MiB and its time 1.5-7 % on CPU
        # (issue 7), the recomputed elementwise work being cheap next to the matmuls.
        if self.remat == "full":
            body = jax.checkpoint(body, prevent_cse=False)
        elif self.remat == "dots":
            body = jax.checkpoint(body, prevent_cse=False, policy=save_wide_dots)
        x, _ = jax.lax.scan(body, x, state)
        return x


class CLIPVisionTower(nnx.Module):
    """CLIP's image encoder. `__call__` returns the pooled feature (ln_post of the class token).

    Images are NHWC float32, already normalised with CLIP's mean and std.
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs,
                 linear_factory: LinearFactory = dense_factory):
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.width
        init = nnx.initializers.normal(d**-0.5)
        # conv1 of CLIP has no bias; stored as (p, p, 3, d) so a patch reshape is a matmul.
        self.patch_embed = nnx.Param(init(rngs.params(), (p, p, 3, d), jnp.float32))
        self.class_embedding = nnx.Param(init(rngs.params(), (d,), jnp.float32))
        self.pos_embedding = nnx.Param(init(rngs.params(), (cfg.num_tokens, d), jnp.float32))
        self.ln_pre = LayerNorm(d, cfg.layer_norm_eps)
        self.transformer = Transformer(cfg, linear_factory, rngs)
        self.ln_post = LayerNorm(d, cfg.layer_norm_eps)
        self.proj = (nnx.Param(init(rngs.params(), (d, cfg.proj_dim), jnp.float32))
                     if cfg.proj_dim else None)

    def embed_patches(self, images: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, h, w, c = images.shape
        p = cfg.patch_size
        if (h, w, c) != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(
                f"expected images of shape (B, {cfg.image_size}, {cfg.image_size}, 3) (NHWC), "
                f"got {tuple(images.shape)}; resize the input or build the tower with "
                f"image_size={h}"
            )
        dt = cfg.compute_dtype
        x = images.astype(dt).reshape(b, h // p, p, w // p, p, c)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
        kernel, cls, pos = gather_weights(
            (self.patch_embed[...], self.class_embedding[...], self.pos_embedding[...]))
        x = matmul(x, kernel.reshape(p * p * c, cfg.width), dt)
        # The embeddings are added in float32 whatever the compute dtype, so that their
        # gradients (sums over the batch) are float32 too; ln_pre computes in float32 anyway.
        cls = jnp.broadcast_to(cls, (b, 1, cfg.width))
        return (jnp.concatenate([cls, x.astype(jnp.float32)], axis=1) + pos).astype(dt)

    def tokens(self, images: jax.Array) -> jax.Array:
        """All output tokens of the last block (before ln_post)."""
        x = self.ln_pre(self.embed_patches(images))
        t, padded = x.shape[1], self.cfg.padded_tokens
        if padded == t:
            return self.transformer(x)
        x = jnp.pad(x, ((0, 0), (0, padded - t), (0, 0)))
        return self.transformer(x, num_valid=t)[:, :t]

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.ln_post(self.tokens(images)[:, 0]).astype(jnp.float32)

    def embed(self, images: jax.Array) -> jax.Array:
        """The projected CLIP image embedding (CLIPModel.get_image_features)."""
        if self.proj is None:
            raise ValueError("this tower has no visual projection (proj_dim=None)")
        pooled = self(images)
        return pooled @ self.proj[...]


def num_params(module: nnx.Module, filt: Any = nnx.Param) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, filt)))
