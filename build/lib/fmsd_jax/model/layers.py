"""The layers the CLIP tower is built from: Dense (whose kernel the method may replace by
a decomposed one), LayerNorm, the fp32-gradient matmul and bias VJPs that keep bf16 compute
from rounding the weight gradients, and the attention implementations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# A matmul that contracts over at most this many elements costs no more per output element than
# the elementwise ops remat='dots' recomputes: the artifact path's up-projection (K*r of them).
SKINNY_CONTRACTION = 16


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
    # gets none), so the program's jaxpr, whose matmuls `--mode plan` counts, holds no dead dots.
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


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
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
