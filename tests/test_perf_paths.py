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
from fmsd_jax.model.layers import einsum_attention, resolve_attention_impl
from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig


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
    with pytest.raises(ValueError, match="attention_impl"):
        ViTConfig.from_variant("tiny", attention_impl="flash")


def _detector_grads(impl: str, token_multiple: int | None = None, remat: str = "dots",
                    temp_bytes: dict | None = None) -> tuple[jax.Array, nnx.State]:
    cfg = ViTConfig.from_variant("tiny", image_size=32, attention_impl=impl,
                                 token_multiple=token_multiple, remat=remat)
    det = Detector(CLIPVisionTower(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    decompose(det, num_subspaces=2, rank=2)
    graphdef, trainable, frozen = nnx.split(det, ArtifactFactor, ...)
    images = jnp.asarray(np.random.default_rng(0).standard_normal((3, 32, 32, 3)), jnp.float32)

    def loss(t):
        return jnp.sum(nnx.merge(graphdef, t, frozen)(images) ** 2)

    fn = jax.jit(jax.value_and_grad(loss))
    if temp_bytes is not None:
        temp_bytes[remat] = fn.lower(trainable).compile().memory_analysis().temp_size_in_bytes
    return fn(trainable)


def test_decomposed_detector_same_loss_and_factor_grads_with_einsum():
    (l_e, g_e), (l_x, g_x) = _detector_grads("einsum"), _detector_grads("xla")
    np.testing.assert_allclose(l_e, l_x, rtol=1e-5)
    chex.assert_trees_all_close(g_e, g_x, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_padded_tokens_change_nothing(impl):
    """The cuDNN path pads 197 tokens to 200 (jax refuses odd lengths in training); padding
    must be invisible: masked as keys, sliced off after the last block. Checked here with the
    implementations CPU has; tiny at 32 px has 17 tokens, padded to 24."""
    assert ViTConfig.from_variant("tiny", image_size=32, token_multiple=8).padded_tokens == 24
    assert ViTConfig.from_variant("B/16", attention_impl="cudnn").padded_tokens == 200
    assert ViTConfig.from_variant("B/16", attention_impl="xla").padded_tokens == 197
    (l_p, g_p), (l_u, g_u) = _detector_grads(impl, 8), _detector_grads(impl)
    np.testing.assert_allclose(l_p, l_u, rtol=1e-6)
    chex.assert_trees_all_close(g_p, g_u, atol=1e-6, rtol=1e-5)


def test_key_mask_of_einsum_attention_matches_xla_seq_lengths():
    q, k, v, _ = _qkvg(jnp.float32, shape=(2, 24, 4, 16))
    lengths = jnp.full((2,), 17, jnp.int32)
    ref = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                       implementation="xla")
    out = einsum_attention(q, k, v, num_valid=17)
    chex.assert_trees_all_close(out, ref, atol=2e-6, rtol=2e-6)
    # and it is attention over the first 17 keys alone, for every query
    chex.assert_trees_all_close(out, _reference(q, k[:, :17], v[:, :17]), atol=2e-6, rtol=2e-6)


def test_uint8_pixels_normalised_on_device_equal_host_normalisation():
    """The pipeline ships uint8 and the detector normalises; the logits must be those of the
    CLIP-normalised float image (x/255 - mean) / std computed on the host in float64."""
    from fmsd_jax.data.config import CLIP_MEAN, CLIP_STD
    cfg = ViTConfig.from_variant("tiny", image_size=32)
    det = Detector(CLIPVisionTower(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1),
                   pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    host = ((pixels / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)).astype(np.float32)
    np.testing.assert_allclose(det.normalise(jnp.asarray(pixels)), host, atol=1e-6)
    chex.assert_trees_all_close(jax.jit(lambda x: det(x))(pixels), det(jnp.asarray(host)),
                                atol=1e-5, rtol=1e-5)
    bare = Detector(CLIPVisionTower(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="pixel_mean"):
        bare(jnp.asarray(pixels))


def test_remat_policies_change_memory_not_results():
    """'dots' (the default) and 'full' recompute parts of each block in the backward pass;
    the gradients must be those of keeping everything ('none')."""
    temp: dict[str, int] = {}
    (l_n, g_n) = _detector_grads("einsum", remat="none", temp_bytes=temp)
    for policy in ("dots", "full"):
        l_p, g_p = _detector_grads("einsum", remat=policy, temp_bytes=temp)
        np.testing.assert_allclose(l_p, l_n, rtol=1e-6)
        chex.assert_trees_all_close(g_p, g_n, atol=1e-6, rtol=1e-5)
    assert temp["full"] < temp["dots"] < temp["none"], temp  # XLA's compiled temporaries
    with pytest.raises(ValueError, match="remat"):
        ViTConfig.from_variant("tiny", remat=True)


def test_dots_recomputes_the_artifact_output_instead_of_keeping_it(monkeypatch):
    """remat='dots' keeps matmul outputs but not the skinny artifact path's (K*r contraction):
    fewer temporaries than jax's checkpoint_dots, and bit-identical results."""
    from fmsd_jax.model import vit

    temp: dict[str, int] = {}
    l_w, g_w = _detector_grads("einsum", remat="dots", temp_bytes=temp)
    wide = temp["dots"]
    monkeypatch.setattr(vit, "save_wide_dots", jax.checkpoint_policies.checkpoint_dots)
    l_a, g_a = _detector_grads("einsum", remat="dots", temp_bytes=temp)
    assert wide < temp["dots"], (wide, temp["dots"])
    np.testing.assert_array_equal(l_w, l_a)
    chex.assert_trees_all_equal(g_w, g_a)
