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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

# Architectures of the public CLIP vision towers; `tiny` is for tests and the demo.
VARIANTS: dict[str, dict[str, int]] = {
    "B/32": dict(width=768, layers=12, heads=12, patch_size=32, mlp_dim=3072, proj_dim=512),
    "B/16": dict(width=768, layers=12, heads=12, patch_size=16, mlp_dim=3072, proj_dim=512),
    "L/14": dict(width=1024, layers=24, heads=16, patch_size=14, mlp_dim=4096, proj_dim=768),
    "H/14": dict(width=1280, layers=32, heads=16, patch_size=14, mlp_dim=5120, proj_dim=1024),
    "tiny": dict(width=64, layers=2, heads=4, patch_size=8, mlp_dim=256, proj_dim=32),
}

ATTN_PROJECTIONS = ("q", "k", "v", "out")
FSDP_AXIS = "fsdp"  # the mesh axis that splits the weights (fmsd_jax/sharding.py)
MLP_PROJECTIONS = ("fc1", "fc2")
REMAT_POLICIES = ("dots", "none", "full")
# A matmul that contracts over at most this many elements costs no more per output element than
# the elementwise ops remat='dots' recomputes: the artifact path's up-projection (K*r of them).
SKINNY_CONTRACTION = 16


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


class Dense(nnx.Module):
    """y = x W + b with W stored (in, out) in float32 and applied in the compute dtype."""

    def __init__(self, in_features: int, out_features: int, *, dtype: Any, use_bias: bool = True,
                 rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
        self.dtype = dtype

    @property
    def in_features(self) -> int:
        return self.kernel.shape[-2]

    @property
    def out_features(self) -> int:
        return self.kernel.shape[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul(x, self.kernel[...], self.dtype)
        if self.bias is not None:
            y = add_bias(y, self.bias[...])
        return y


# ---------------------------------------------------------------------------------------------
# Parameter gradients summed in float32, and weights gathered per layer under fsdp.
#
# Why: under a bf16 compute dtype, autodiff forms a weight's gradient as a bf16 dot (x^T g) or
# bf16 reduce (sum of g, for a bias) over the batch, and on a sharded batch XLA sums those bf16
# partial results across chips before the cast back to the fp32 parameter (seen in compiled
# TPU steps, tests/test_plan.py). These VJPs form the batch contractions in float32, so every
# cross-chip sum of a parameter gradient is float32. Under a float32 compute dtype they are
# plain autodiff (the CPU programs are unchanged).


def matmul(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    """x @ w in `dtype`; w's gradient is summed over the batch in float32."""
    if jnp.dtype(dtype) == jnp.float32:
        return x.astype(dtype) @ w.astype(dtype)
    return _matmul_f32_grad(x.astype(dtype), w)


@jax.custom_vjp
def _matmul_f32_grad(x: jax.Array, w: jax.Array) -> jax.Array:
    return x @ w.astype(x.dtype)


def _matmul_fwd(x, w):
    # symbolic_zeros: the backward forms only the gradients that are needed (a frozen weight
    # gets none), so the program's jaxpr, whose matmuls plan.py counts, holds no dead dots.
    # The flags travel as the residuals' structure (None: needed, (): not), never as arrays.
    flags = tuple(None if a.perturbed else () for a in (x, w))
    x, w = x.value, w.value
    return x @ w.astype(x.dtype), (x, w, flags)


def _matmul_bwd(res, g):
    x, w, (x_flag, w_flag) = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        g = jnp.zeros(g.shape, g.dtype)
    dx = dw = None
    if x_flag is None:
        dx = (g @ w.astype(g.dtype).T).astype(x.dtype)
    if w_flag is None:
        dw = jnp.einsum("...i,...o->io", x, g, preferred_element_type=jnp.float32)
        dw = dw.astype(w.dtype)
    return dx, dw


_matmul_f32_grad.defvjp(_matmul_fwd, _matmul_bwd, symbolic_zeros=True)


def add_bias(y: jax.Array, b: jax.Array) -> jax.Array:
    """y + b in y's dtype; b's gradient is summed over the batch in float32."""
    if y.dtype == jnp.float32:
        return y + b.astype(y.dtype)
    return _bias_f32_grad(y, b)


@jax.custom_vjp
def _bias_f32_grad(y: jax.Array, b: jax.Array) -> jax.Array:
    return y + b.astype(y.dtype)


def _bias_fwd(y, b):
    return y + b.astype(y.dtype), b


def _bias_bwd(b, g):
    db = jnp.sum(g, axis=tuple(range(g.ndim - 1)), dtype=jnp.float32)
    return g, db.astype(b.dtype)


_bias_f32_grad.defvjp(_bias_fwd, _bias_bwd)


def fsdp_size() -> int:
    """Size of the `fsdp` axis of the mesh the program is traced under (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or FSDP_AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[FSDP_AXIS])


def gather_weights(tree: Any) -> Any:
    """A layer's weights replicated for use: FSDP's per-layer all-gather.

    Weights are stored split over the `fsdp` mesh axis (sharding.param_sharding). Left to
    itself, XLA keeps a split weight in place and instead moves the activations: for a weight
    split on the axis the matmul contracts, an all-reduce of every layer's activations
    (DESIGN.md §6). Constraining each layer's weights to be replicated where they are used
    makes the cost a weight all-gather per layer (forward, and again in the backward, where
    remat recomputes it) while activations stay split over the batch. The gradient is left
    unconstrained, so XLA sums it straight into the split layout (a reduce-scatter).
    A no-op unless the program is traced under a mesh whose fsdp axis is larger than one
    (`on_mesh`): single-device and data-only programs are unchanged.
    """
    if fsdp_size() == 1:
        return tree
    return jax.tree.map(_replicate, tree)


@jax.custom_vjp
def _replicate(w: jax.Array) -> jax.Array:
    return jax.lax.with_sharding_constraint(w, P())


_replicate.defvjp(lambda w: (_replicate(w), None), lambda _, g: (g,))


def on_mesh(fn: Callable, mesh: Any) -> Callable:
    """`fn`, traced with `mesh` as the context mesh: what lets `gather_weights` act.

    Wrap the function handed to jax.jit (the train step, the evaluation step, the mask
    estimator's update); None: `fn` unchanged."""
    if mesh is None:
        return fn

    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


LinearFactory = Callable[..., nnx.Module]


def dense_factory(in_features: int, out_features: int, *, name: str, dtype: Any,
                  rngs: nnx.Rngs) -> nnx.Module:
    """The default linear layer; `name` (q, k, v, out, fc1, fc2) lets a custom factory choose."""
    del name
    return Dense(in_features, out_features, dtype=dtype, rngs=rngs)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 whatever the compute dtype (bf16 statistics drift)."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unknown activation {name!r}; use 'quick_gelu' (CLIP) or 'gelu'")


ATTENTION_IMPLS = (None, "einsum", "xla", "cudnn")


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     num_valid: int | None = None) -> jax.Array:
    """softmax(q kᵀ / √d) v for (batch, tokens, heads, head_dim) inputs, as explicit matmuls.

    Why it exists: on CPU, XLA's lowering of `jax.nn.dot_product_attention` is slower than
    this form, mostly in the backward (bench/vs_pytorch.py, issue 7: ViT-B/16 batch 8, one
    thread, attention fwd+bwd per block 102 → 71 ms, interleaved). What makes it faster: heads
    are moved in front of tokens once, so all four matmuls of forward and backward are plain
    batched (b·h) matmuls without per-dot transposes, and the 1/√d scale is folded into q (a
    (t × d) multiply instead of a (t × t) one). Numerics follow the XLA path: scores and
    softmax in float32, probabilities cast back to the value dtype; equal to it to float32
    rounding (tests/test_perf_paths.py). Keys at positions >= num_valid are masked out.
    """
    dt = v.dtype
    scale = q.shape[-1] ** -0.5
    q = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # (b, h, t, d)
    k = k.transpose(0, 2, 1, 3)
    v = v.transpose(0, 2, 1, 3)
    s = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)
    if num_valid is not None and num_valid < s.shape[-1]:
        s = jnp.where(jnp.arange(s.shape[-1]) < num_valid, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(dt)
    return jnp.matmul(p, v).transpose(0, 2, 1, 3)


def resolve_attention_impl(impl: str | None) -> str | None:
    """The implementation `Attention` runs for a config value (None picks by backend)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; use one of {ATTENTION_IMPLS}")
    if impl is None and jax.default_backend() == "cpu":
        return "einsum"
    return impl


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
        self.act = _activation(cfg.activation)

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
