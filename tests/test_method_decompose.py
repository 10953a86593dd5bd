"""Decomposed linear layer: init/merge equality, Effort's construction, Variable-type split."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import production_step
from flax import nnx

from fmsd_jax.method.decompose import (
    ArtifactFactor,
    DecomposedDense,
    DecompositionSpec,
    SemanticWeight,
    SpectralReference,
    decompose,
    decomposed_layers,
    merge,
    trainable_filter,
)
from fmsd_jax.method.decompose import _decompose_stacked as _decompose_stacked
from fmsd_jax.model.detector import Detector, HeadParam
from fmsd_jax.model.layers import Dense
from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig

# Smaller than the 'tiny' variant (same structure): compile time dominates these tests.
CFG = ViTConfig(width=32, layers=2, heads=2, patch_size=8, mlp_dim=48, proj_dim=None, image_size=16)


def make_detector(seed: int = 0, cfg: ViTConfig = CFG) -> Detector:
    return Detector(CLIPVisionTower(cfg, rngs=nnx.Rngs(seed)), rngs=nnx.Rngs(seed + 1))


def images(n: int = 4, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 16, 16, 3)), jnp.float32)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


class InitEqualityTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_outputs_equal_dense(self):
        x = images()
        for k, d in [(1, 1), (2, 4), (5, 3)]:
            det = make_detector()
            ref_feats = det.features(x)
            ref_logits = det(x)
            decompose(det, num_subspaces=k, rank=d)
            graphdef, state = nnx.split(det)

            @self.variant
            def fwd(state, x, graphdef=graphdef):
                m = nnx.merge(graphdef, state)
                return m.features(x), m(x)

            feats, logits = fwd(state, x)
            chex.assert_trees_all_equal_shapes_and_dtypes(feats, ref_feats)
            assert rel_err(feats, ref_feats) <= 1e-5, (k, d)
            assert rel_err(logits, ref_logits) <= 1e-5, (k, d)

    def test_mlp_targets_and_rebuild_mode(self):
        x = images()
        det = make_detector(3)
        ref = det.features(x)
        targets = ("q", "k", "v", "out", "fc1", "fc2")
        spec = decompose(det, targets=targets, num_subspaces=3, rank=5)
        assert spec.shapes["fc1"] == (32, 48) and spec.semantic_rank["fc2"] == 32 - 15
        fc1 = det.backbone.transformer.blocks.mlp.fc1
        assert fc1.semantic_v is not None and fc1.semantic_u is None  # V is the long side
        assert rel_err(det.features(x), ref) <= 1e-5
        det2 = make_detector(3)
        decompose(det2, targets=targets, num_subspaces=3, rank=5, mode="rebuild")
        assert rel_err(det2.features(x), ref) <= 1e-5


def test_stacked_layout_and_split_by_type():
    det = make_detector()
    spec = decompose(det, num_subspaces=2, rank=3)
    layers = decomposed_layers(det, spec.targets)
    for layer in layers.values():
        chex.assert_shape(layer.semantic[...], (2, 32, 32))
        chex.assert_shape(layer.u[...], (2, 32, 6))
        chex.assert_shape(layer.s[...], (2, 6))
        chex.assert_shape(layer.v[...], (2, 32, 6))
    _, trainable, frozen = nnx.split(det, trainable_filter("fmsd"), ...)
    kinds = {
        type(v) for v in jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))
    }
    assert kinds == {ArtifactFactor, HeadParam}
    frozen_kinds = {
        type(v) for v in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))
    }
    assert SemanticWeight in frozen_kinds and SpectralReference in frozen_kinds
    assert ArtifactFactor not in frozen_kinds and HeadParam not in frozen_kinds
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    assert n_train == 4 * 2 * (32 + 1 + 32) * 6 + 32 * 2 + 2
    _, probe, _ = nnx.split(det, trainable_filter("linear_probe"), ...)
    assert sum(x.size for x in jax.tree.leaves(probe)) == 32 * 2 + 2
    with pytest.raises(ValueError, match="regime"):
        trainable_filter("lora")
    # The singular values of each artifact subspace are the tail, descending, in order.
    s = np.asarray(layers["q"].s[...])
    assert np.all(np.diff(s, axis=-1) <= 0)


def test_spec_json_roundtrip_and_errors():
    det = make_detector()
    spec = decompose(det, targets=("q", "v"), num_subspaces=2, rank=2)
    again = DecompositionSpec.from_json(json.dumps(json.loads(spec.to_json())))
    assert again == spec and again.mask_shape == (2, 2)
    with pytest.raises(TypeError, match="already decomposed"):
        decompose(det, targets=("q",), num_subspaces=1, rank=1)
    with pytest.raises(ValueError, match="smaller than"):
        decompose(make_detector(), num_subspaces=4, rank=8)


def test_merge_equals_decomposed_after_training():
    det = make_detector(5)
    spec = decompose(det, num_subspaces=2, rank=4)
    batch = dict(image=np.asarray(images(4, 1)), label=np.array([0, 1, 1, 0], np.int32))
    # The production train step (train.make_train_step), one device, both regularisers on.
    step = production_step(det, regime="fmsd", spec=spec, batch=batch,
                           optim={"lr": 5e-2, "head_lr": 5e-2}, lambda_orth=0.1,
                           lambda_spec=0.1, total_steps=10)
    init_u = np.asarray(step.trainable["backbone"]["transformer"]["blocks"]["attn"]["q"]["u"][...])
    on_mesh = step.device_batch(batch)
    for _ in range(3):
        step(on_mesh)
    assert all(np.isfinite(v) for v in step.mean_metrics().values())
    nnx.update(det, jax.device_get(step.trainable))
    moved = np.asarray(det.backbone.transformer.blocks.attn.q.u[...])
    assert np.abs(moved - init_u).max() > 1e-3  # the steps did something
    x = images(4, 2)
    before = det(x)
    assert merge(det) == list(spec.targets)
    assert isinstance(det.backbone.transformer.blocks.attn.q, Dense)
    chex.assert_shape(det.backbone.transformer.blocks.attn.q.kernel[...], (2, 32, 32))
    assert rel_err(det(x), before) <= 1e-5
    # The exported model is a plain detector: no method Variables left.
    assert not nnx.state(det, nnx.Any(ArtifactFactor, SemanticWeight, SpectralReference))


# ----------------------------------------------------------------------------------------------
# Effort (K = 1, d = 1): independent numpy construction and torch forward/backward.


def effort_numpy(w_torch: np.ndarray):
    """Effort's SVDResidualLinear init on a torch-layout (out, in) weight, in float64."""
    u, s, vh = np.linalg.svd(w_torch.astype(np.float64), full_matrices=False)
    r = min(w_torch.shape) - 1
    w_main = u[:, :r] @ np.diag(s[:r]) @ vh[:r]
    return w_main, u[:, r:], s[r:], vh[r:]


def test_effort_k1_d1_matches_numpy_recipe():
    det = make_detector(7)
    blocks = det.backbone.transformer.blocks
    dense = {t: np.asarray(getattr(blocks.attn, t).kernel[...]) for t in ("q", "k", "v", "out")}
    spec = decompose(det, num_subspaces=1, rank=1)
    assert spec.semantic_rank == {t: 31 for t in ("q", "k", "v", "out")}
    layers = decomposed_layers(det, spec.targets)
    for t, w in dense.items():
        for layer in range(CFG.layers):
            w_main, u_res, s_res, vh_res = effort_numpy(w[layer].T)  # torch is W.T
            dec = layers[t]
            sem = np.asarray(dec.semantic[...][layer])
            assert rel_err(sem, w_main.T) <= 1e-5
            # fp32 SVD accuracy is relative to the largest singular value, not the smallest.
            np.testing.assert_allclose(
                np.asarray(dec.s[...][layer]), s_res, atol=1e-6 * np.linalg.norm(w[layer], 2)
            )
            res = np.outer(np.asarray(dec.u[...][layer, :, 0]), np.asarray(dec.v[...][layer, :, 0]))
            ref = (u_res @ np.diag(s_res) @ vh_res).T
            np.testing.assert_allclose(
                res * np.asarray(dec.s[...][layer, 0]), ref, atol=1e-5 * np.abs(w).max()
            )
    n_train = sum(x.size for x in jax.tree.leaves(nnx.state(det, ArtifactFactor)))
    assert n_train == CFG.layers * 4 * (32 + 1 + 32)  # Effort: (in + 1 + out) per matrix


def test_effort_layer_forward_and_grads_match_torch():
    """One decomposed layer vs Effort's torch forward x @ (W_main + U diag(S) Vh)ᵀ + b."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(24, 16)).astype(np.float32)  # ours: (in, out)
    b = rng.normal(size=(16,)).astype(np.float32)
    x = rng.normal(size=(5, 24)).astype(np.float32)
    c = rng.normal(size=(5, 16)).astype(np.float32)
    sem, ref, basis, ua, sa, va = _decompose_stacked(jnp.asarray(w)[None], 1, 1)
    first = lambda tree: jax.tree.map(lambda a: a[0], tree)  # one layer of the L = 1 stack
    layer = DecomposedDense(
        sem[0],
        ua[0],
        sa[0],
        va[0],
        jnp.asarray(b),
        num_subspaces=1,
        dtype=jnp.float32,
        reference=first(ref),
        semantic_basis=first(basis),
    )
    graphdef, params, rest = nnx.split(layer, ArtifactFactor, ...)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(jnp.asarray(x)) * c)

    val, grads = jax.value_and_grad(loss)(params)

    w_main, u_res, s_res, vh_res = effort_numpy(w.T)
    torch = pytest.importorskip("torch")  # the numpy reference tests above run without it
    tw = torch.tensor(w_main, dtype=torch.float64)
    tu = torch.tensor(u_res, requires_grad=True)
    ts = torch.tensor(s_res, requires_grad=True)
    tv = torch.tensor(vh_res, requires_grad=True)
    y = torch.tensor(x, dtype=torch.float64) @ (tw + tu @ torch.diag(ts) @ tv).T
    tl = ((y + torch.tensor(b, dtype=torch.float64)) * torch.tensor(c, dtype=torch.float64)).sum()
    tl.backward()
    np.testing.assert_allclose(float(val), tl.item(), rtol=1e-5)
    # torch's (out, in) layout transposes the roles: our u is Effort's Vh row, our v its U
    # column. Singular vectors have a sign ambiguity: align on u's sign (v flips with it).
    sign = np.sign(np.asarray(ua)[0, :, 0] @ vh_res[0])
    np.testing.assert_allclose(np.asarray(grads["s"][...]), ts.grad.numpy(), rtol=1e-4)
    np.testing.assert_allclose(
        sign * np.asarray(grads["u"][...])[:, 0], tv.grad.numpy()[0], rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        sign * np.asarray(grads["v"][...])[:, 0], tu.grad.numpy()[:, 0], rtol=1e-4, atol=1e-4
    )


def test_decompose_from_reference_rebuilds_the_svd_decomposition_bit_for_bit(monkeypatch):
    """What a checkpoint keeps (spectral_reference) and the pretrained weights rebuild every
    Variable of the SVD's decomposition exactly (W_s by the same compiled semantic_part),
    MLP targets' semantic bases included, with no SVD run."""
    from fmsd_jax.method import decompose as decomp

    targets = ("q", "k", "v", "out", "fc1", "fc2")
    by_svd = make_detector(11)
    spec = decompose(by_svd, targets=targets, num_subspaces=2, rank=3)
    reference = decomp.spectral_reference(by_svd, targets)
    shapes = {t: {k: tuple(np.shape(x)) for k, x in ref.items()} for t, ref in reference.items()}
    assert shapes == decomp.reference_shapes(spec)
    assert set(shapes["fc1"]) == {"u0", "s0", "v0", "energy0", "semantic_v"}  # V: long side
    assert set(shapes["fc2"]) == {"u0", "s0", "v0", "energy0", "semantic_u"}
    host = jax.tree.map(np.asarray, reference)  # as a restore gives it back

    def no_svd(*_args, **_kwargs):
        raise AssertionError("an SVD ran")

    monkeypatch.setattr(decomp, "_svd_tail", no_svd)
    monkeypatch.setattr(jnp.linalg, "svd", no_svd)
    rebuilt = make_detector(11)
    decomp.decompose_from_reference(rebuilt, spec, host)
    want = jax.tree_util.tree_flatten_with_path(nnx.state(by_svd))[0]
    got = jax.tree_util.tree_flatten_with_path(nnx.state(rebuilt))[0]
    assert [k for k, _ in got] == [k for k, _ in want]
    for (key, a), (_, b) in zip(want, got, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(key)
    x = images()
    assert np.array_equal(np.asarray(rebuilt(x)), np.asarray(by_svd(x)))

    with pytest.raises(TypeError, match="already decomposed"):
        decomp.decompose_from_reference(rebuilt, spec, host)
    short = {**host, "q": {**host["q"], "u0": host["q"]["u0"][..., :1]}}
    with pytest.raises(ValueError, match=r"q: the saved reference holds .*'u0': \(2, 32, 1\)"):
        decomp.decompose_from_reference(make_detector(11), spec, short)
    wide = ViTConfig(width=48, layers=2, heads=2, patch_size=8, mlp_dim=48, proj_dim=None,
                     image_size=16)
    with pytest.raises(ValueError, match=r"q: the weight is \(2, 48, 48\), the decomposition "
                                         r"was made of \(2, 32, 32\)"):
        decomp.decompose_from_reference(make_detector(11, wide), spec, host)


def test_a_reference_refuses_other_weights_of_the_same_geometry():
    """Same shapes, other weights (another seed's tower, or the trained ones edited by 5 %):
    W_s would be W' − U₀ diag(s₀) V₀ᵀ, a model the run never trained. The check measures
    ~1e-7 on the right weights, ~1 on unrelated ones and ~the edit on an edited copy."""
    from fmsd_jax.method import decompose as decomp

    targets = ("q", "v", "fc1")
    by_svd = make_detector(11)
    spec = decompose(by_svd, targets=targets, num_subspaces=2, rank=2)
    ref = decomp.spectral_reference(by_svd, targets)
    pretrained = decomp._blocks(make_detector(11))
    w = {t: np.asarray(decomp._dense_layer(pretrained, t)[1].kernel[...]) for t in targets}
    for t in targets:
        same = float(decomp.reference_mismatch(w[t], ref[t]["u0"], ref[t]["s0"], ref[t]["v0"]))
        edited = w[t] * (1 + 0.05 * np.random.default_rng(0).standard_normal(w[t].shape))
        assert same < 1e-5, (t, same)
        assert 0.01 < float(decomp.reference_mismatch(edited, ref[t]["u0"], ref[t]["s0"],
                                                      ref[t]["v0"])) < 0.2, t
    host = jax.tree.map(np.asarray, ref)
    with pytest.raises(ValueError, match="q: these are not the weights the reference was "
                                         "taken from"):
        decomp.decompose_from_reference(make_detector(12), spec, host)
    decomp.decompose_from_reference(make_detector(11), spec, host)  # the right ones pass
