"""Layer masking: moments vs numpy on a problem with a known answer, the real CE gradient, layer
selection, and the estimator sharded over 8 virtual CPU devices == 1 device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmsd_jax.method.masking import (
    candidate_split,
    estimate_layer_scores,
    mask_report,
    select_layers,
)
from fmsd_jax.method.objective import CROSS_ENTROPY, make_loss_fn
from fmsd_jax.model.detector import Detector
from fmsd_jax.model.vit import ATTN_PROJECTIONS, CLIPVisionTower, ViTConfig

CFG = ViTConfig(width=32, layers=3, heads=2, patch_size=8, mlp_dim=48, proj_dim=None, image_size=16)


def detector(seed: int = 0) -> Detector:
    return Detector(CLIPVisionTower(CFG, rngs=nnx.Rngs(seed)), rngs=nnx.Rngs(seed + 1))


def test_known_answer_consistent_vs_noise_layers():
    """A linear loss Σ⟨W_lj, G_lj(t)⟩ has gradient exactly G(t): cells with a constant G plus a
    little noise must out-score cells whose G is pure noise, and the moments must match numpy."""
    det = detector()
    graphdef, cand, rest = candidate_split(det)
    L, n_t, T = CFG.layers, len(ATTN_PROJECTIONS), 6
    rng = np.random.default_rng(0)
    consistent = np.zeros((L, n_t), bool)
    consistent[[0, 1, 2, 2], [0, 3, 1, 2]] = True
    base = rng.normal(size=(L, n_t, 32, 32))
    noise = rng.normal(size=(T, L, n_t, 32, 32))
    grads = np.where(consistent[None, :, :, None, None], base[None] + 0.1 * noise, noise)
    grads = grads.astype(np.float32)

    def loss_fn(model, batch):
        attn = model.backbone.transformer.blocks.attn
        loss = sum(
            jnp.sum(getattr(attn, t).kernel[...] * batch["g"][:, j])
            for j, t in enumerate(ATTN_PROJECTIONS)
        )
        return loss, {}

    out = estimate_layer_scores(
        graphdef,
        cand,
        rest,
        [{"g": g} for g in grads],
        loss_fn=loss_fn,
        targets=ATTN_PROJECTIONS,
        eps=1e-8,
    )
    g64 = grads.astype(np.float64)
    mean = g64.mean(0)
    bias = np.sum(mean**2, axis=(-2, -1))
    var = np.mean(np.sum((g64 - mean) ** 2, axis=(-2, -1)), axis=0)
    gsnr = np.mean(mean**2 / (((g64 - mean) ** 2).mean(0) + 1e-8), axis=(-2, -1))
    np.testing.assert_allclose(out["bias"], bias, rtol=1e-5)
    np.testing.assert_allclose(out["variance"], var, rtol=1e-5)
    np.testing.assert_allclose(out["score"], bias / (var + 1e-8), rtol=1e-5)
    np.testing.assert_allclose(out["gsnr"], gsnr, rtol=1e-4)
    assert int(out["num_batches"]) == T
    np.testing.assert_array_equal(select_layers(out, top_k=int(consistent.sum())), consistent)
    np.testing.assert_array_equal(select_layers(out, threshold=0.5), consistent)
    report = json.loads(json.dumps(mask_report(out, consistent, ATTN_PROJECTIONS)))
    assert report["mask"] == consistent.tolist() and report["num_batches"] == T
    np.testing.assert_allclose(report["score"], out["score"])
    gsnr_out = dict(out, score=out["gsnr"])
    np.testing.assert_array_equal(select_layers(gsnr_out, top_k=4), consistent)
    # Pure-noise cells score about the level layer_mask.noise_floor reports, 1/(T-1).
    from fmsd_jax.config_base import base_config
    from fmsd_jax.run import layer_selection

    floor = layer_selection.noise_floor(base_config(), out)
    np.testing.assert_allclose(floor, 1 / (T - 1))
    np.testing.assert_allclose(out["score"][~consistent].mean(), floor, rtol=0.1)


def test_cross_entropy_moments_match_per_batch_gradients():
    det = detector(1)
    graphdef, cand, rest = candidate_split(det)
    loss_fn = make_loss_fn(CROSS_ENTROPY)
    rng = np.random.default_rng(1)
    batches = [
        dict(
            image=rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
            label=rng.integers(0, 2, size=4),
        )
        for _ in range(4)
    ]
    out = estimate_layer_scores(
        graphdef, cand, rest, batches, loss_fn=loss_fn, eps=1e-20, score="gsnr"
    )

    @jax.jit
    def grad(c, b):
        return jax.grad(lambda c: loss_fn(nnx.merge(graphdef, c, rest), b)[0])(c)

    gs = [grad(cand, b) for b in batches]
    attn = lambda g, t: np.asarray(
        g["backbone"]["transformer"]["blocks"]["attn"][t]["kernel"][...], np.float64
    )
    for j, t in enumerate(ATTN_PROJECTIONS):
        stack = np.stack([attn(g, t) for g in gs])  # (T, L, in, out)
        mean = stack.mean(0)
        bias = np.sum(mean**2, axis=(-2, -1))
        var = np.mean(np.sum((stack - mean) ** 2, axis=(-2, -1)), axis=0)
        # GSNR per element: mean² / (variance + eps), averaged over the layer's elements.
        gsnr = np.mean(mean**2 / (((stack - mean) ** 2).mean(0) + 1e-20), axis=(-2, -1))
        np.testing.assert_allclose(out["bias"][:, j], bias, rtol=1e-4)
        np.testing.assert_allclose(out["variance"][:, j], var, rtol=1e-4)
        np.testing.assert_allclose(out["gsnr"][:, j], gsnr, rtol=1e-3)
    # score='gsnr' scores by it, not by bias/variance (a different array here)
    np.testing.assert_array_equal(out["score"], out["gsnr"])
    assert not np.allclose(out["score"], out["bias"] / (out["variance"] + 1e-20))


def test_select_layers_rules():
    s = np.array([[1.0, 5.0], [3.0, 2.0]])
    np.testing.assert_array_equal(select_layers(s, top_k=2), [[False, True], [True, False]])
    np.testing.assert_array_equal(select_layers(s, threshold=0.5), [[False, True], [True, False]])
    np.testing.assert_array_equal(select_layers(s, threshold=0.0), np.ones((2, 2), bool))
    np.testing.assert_array_equal(
        select_layers(np.ones((2, 2)), threshold=0.9), np.ones((2, 2), bool)
    )
    with pytest.raises(ValueError, match="exactly one"):
        select_layers(s)
    with pytest.raises(ValueError, match="top_k"):
        select_layers(s, top_k=9)
    with pytest.raises(ValueError, match="NaN"):
        select_layers(np.array([[np.nan]]), top_k=1)


_SHARDED = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh
    from fmsd_jax.method.masking import candidate_split, estimate_layer_scores
    from fmsd_jax.method.objective import CROSS_ENTROPY, make_loss_fn
    from fmsd_jax.model.detector import Detector
    from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig

    assert jax.device_count() == 8, jax.devices()
    cfg = ViTConfig(width=32, layers=3, heads=2, patch_size=8, mlp_dim=48, proj_dim=None,
                    image_size=16)
    det = Detector(CLIPVisionTower(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    g, c, r = candidate_split(det)
    rng = np.random.default_rng(0)
    batches = [dict(image=rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
                    label=rng.integers(0, 2, size=16)) for _ in range(3)]
    one = estimate_layer_scores(g, c, r, batches, loss_fn=make_loss_fn(CROSS_ENTROPY))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    many = estimate_layer_scores(g, c, r, batches, loss_fn=make_loss_fn(CROSS_ENTROPY), mesh=mesh)
    for k in ("bias", "variance", "score", "gsnr"):
        np.testing.assert_allclose(many[k], one[k], rtol=2e-4, err_msg=k)
    # A run's placement: data 4 x fsdp 2, every weight split over fsdp and gathered per layer.
    from fmsd_jax import parallel
    from fmsd_jax.run import layer_selection
    parallel.FSDP_MIN_SIZE = 0
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), parallel.BATCH_AXES)
    placement = layer_selection.estimator_placement(mesh, c, r)
    assert "fsdp" in str(jax.tree.leaves(placement[0])[0].spec)
    fsdp = estimate_layer_scores(g, c, r, batches, loss_fn=make_loss_fn(CROSS_ENTROPY), mesh=mesh,
                                 placement=placement)
    for k in ("bias", "variance", "score", "gsnr"):
        np.testing.assert_allclose(fsdp[k], one[k], rtol=2e-4, err_msg=k)
    print("SHARDED_OK")
""")


def test_sharded_estimator_equals_single_device():
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    res = subprocess.run(
        [sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and "SHARDED_OK" in res.stdout, res.stderr[-4000:]
