"""Every attention implementation computes the reference attention, forward and gradients.

The fast paths exist for speed only (bench/vs_pytorch.py, issue 7), so they must be
numerically the reference: `jax.nn.dot_product_attention(implementation='xla')`, jitted, on the
CLIP geometry's layout (batch, tokens, heads, head_dim), and inside a decomposed detector.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmsd_jax.method.decompose import ArtifactFactor, decompose
from fmsd_jax.model.detector import Detector
from fmsd_jax.model.vit import (
    CLIPVisionTower,
    ViTConfig,
    einsum_attention,
    resolve_attention_impl,
)


def _reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def _qkvg(dtype, shape=(2, 17, 4, 16)):
    keys = jax.random.split(jax.random.key(0), 4)
    return [jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in keys]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 3e-2)])
def test_einsum_attention_matches_reference_fwd_and_grads(dtype, tol):
    q, k, v, g = _qkvg(dtype)

    def grads(fn):
        loss = lambda q, k, v: jnp.vdot(fn(q, k, v).astype(jnp.float32), g.astype(jnp.float32))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    out = jax.jit(einsum_attention)(q, k, v)
    ref = jax.jit(_reference)(q, k, v)
    assert out.dtype == ref.dtype == dtype
    chex.assert_trees_all_close(out.astype(jnp.float32), ref.astype(jnp.float32),
                                atol=tol, rtol=tol)
    (lo, go), (lr, gr) = grads(einsum_attention), grads(_reference)
    chex.assert_trees_all_close(lo, lr, atol=tol * 10, rtol=tol)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x.astype(jnp.float32), go),
                                jax.tree.map(lambda x: x.astype(jnp.float32), gr),
                                atol=tol, rtol=tol)


def test_default_is_einsum_on_cpu_and_unknown_is_refused():
    if jax.default_backend() == "cpu":
        assert resolve_attention_impl(None) == "einsum"
    assert resolve_attention_impl("xla") == "xla"
    with pytest.raises(ValueError, match="attention_impl"):
        ViTConfig.from_variant("tiny", attention_impl="flash")


def _detector_grads(impl: str) -> tuple[jax.Array, nnx.State]:
    cfg = ViTConfig.from_variant("tiny", image_size=32, attention_impl=impl)
    det = Detector(CLIPVisionTower(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    decompose(det, num_subspaces=2, rank=2)
    graphdef, trainable, frozen = nnx.split(det, ArtifactFactor, ...)
    images = jnp.asarray(np.random.default_rng(0).standard_normal((3, 32, 32, 3)), jnp.float32)

    def loss(t):
        return jnp.sum(nnx.merge(graphdef, t, frozen)(images) ** 2)

    return jax.jit(jax.value_and_grad(loss))(trainable)


def test_decomposed_detector_same_loss_and_factor_grads_with_einsum():
    (l_e, g_e), (l_x, g_x) = _detector_grads("einsum"), _detector_grads("xla")
    np.testing.assert_allclose(l_e, l_x, rtol=1e-5)
    chex.assert_trees_all_close(g_e, g_x, atol=1e-5, rtol=1e-4)
