"""FMSD regularisers: zero at init, positive after perturbation, exact vs the naive dense
formulas, gradients vs finite differences, and λ = 0 costs nothing."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import objective_settings
from flax import nnx

from fmsd_jax.method.decompose import ArtifactFactor, decompose, decomposed_layers
from fmsd_jax.method.losses import orthogonality_loss, orthogonality_terms, spectral_loss
from fmsd_jax.method.objective import CROSS_ENTROPY, ObjectiveConfig, make_loss_fn
from fmsd_jax.model.detector import Detector
from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig

CFG = ViTConfig(width=32, layers=2, heads=2, patch_size=8, mlp_dim=48, proj_dim=None, image_size=16)
TARGETS = ("q", "k", "v", "out", "fc1", "fc2")  # square and both rectangular layouts


def decomposed(seed: int = 0, k: int = 3, d: int = 2):
    det = Detector(CLIPVisionTower(CFG, rngs=nnx.Rngs(seed)), rngs=nnx.Rngs(seed + 1))
    dense = {
        t: np.asarray(
            getattr(
                det.backbone.transformer.blocks.attn
                if t in ("q", "k", "v", "out")
                else det.backbone.transformer.blocks.mlp,
                t,
            ).kernel[...]
        )
        for t in TARGETS
    }
    spec = decompose(det, targets=TARGETS, num_subspaces=k, rank=d)
    return det, dense, spec


def perturb(det, scale: float = 0.05, seed: int = 0):
    graphdef, factors, rest = nnx.split(det, ArtifactFactor, ...)
    rng = np.random.default_rng(seed)  # host noise: no per-shape jax.random compiles
    factors = jax.tree.map(
        lambda x: x + scale * rng.standard_normal(x.shape).astype(np.float32), factors
    )
    return graphdef, factors, rest


def naive(det, dense, spec, form="frobenius"):
    """Effort's formulas on dense matrices, in float64 numpy (with the frozen U_r, V_r from an
    independent SVD of the pretrained weight)."""
    orth = spec_loss = 0.0
    kd = spec.num_subspaces * spec.rank
    layers = decomposed_layers(det, spec.targets)
    for t, layer in layers.items():
        for li in range(spec.num_layers):
            w = dense[t][li].astype(np.float64)
            u_full, _, vh_full = np.linalg.svd(w, full_matrices=False)
            r = min(w.shape) - kd
            ua = np.asarray(layer.u[...][li], np.float64)
            sa = np.asarray(layer.s[...][li], np.float64)
            va = np.asarray(layer.v[...][li], np.float64)
            for basis, a in ((u_full[:, :r], ua), (vh_full[:r].T, va)):
                uh = np.concatenate([basis, a], axis=1)
                g = uh.T @ uh - np.eye(uh.shape[1])
                const = basis.T @ basis - np.eye(r)
                orth += np.sum(g**2) - np.sum(const**2)
            w_s = np.asarray(layer.semantic[...][li], np.float64)
            w_hat = w_s + ua @ np.diag(sa) @ va.T
            if form == "frobenius":
                spec_loss += abs(np.sum(w_hat**2) - np.sum(w**2))
            elif form == "squared":
                spec_loss += (np.sum(w_hat**2) - np.sum(w**2)) ** 2
            else:
                s0 = np.asarray(layer.s0[...][li], np.float64)
                for k in range(spec.num_subspaces):
                    sl = slice(k * spec.rank, (k + 1) * spec.rank)
                    a_k = ua[:, sl] @ np.diag(sa[sl]) @ va[:, sl].T
                    spec_loss += abs(np.sum(a_k**2) - np.sum(s0[sl] ** 2))
    return orth, spec_loss


class LossesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_zero_at_init_positive_after_perturbation(self):
        det, _, _ = decomposed()
        graphdef, state = nnx.split(det)

        @self.variant
        def losses(state):
            m = nnx.merge(graphdef, state)
            return (
                orthogonality_terms(m),
                spectral_loss(m, "frobenius"),
                spectral_loss(m, "per_subspace"),
            )

        terms, fro, per = losses(state)
        for v in (*terms.values(), fro, per):
            assert abs(float(v)) < 1e-4, (terms, fro, per)
        g, factors, rest = perturb(det)
        det2 = nnx.merge(g, factors, rest)
        terms, fro, per = losses(nnx.split(det2)[1])
        for v in (*terms.values(), fro, per):
            assert float(v) > 1e-3


def test_matches_naive_dense_formulas():
    det, dense, spec = decomposed(k=3, d=2)
    det = nnx.merge(*perturb(det, 0.03, seed=1))
    orth_ref, fro_ref = naive(det, dense, spec, "frobenius")
    _, per_ref = naive(det, dense, spec, "per_subspace")
    _, sq_ref = naive(det, dense, spec, "squared")
    np.testing.assert_allclose(float(orthogonality_loss(det)), orth_ref, rtol=1e-4)
    np.testing.assert_allclose(float(spectral_loss(det, "squared")), sq_ref, rtol=1e-3)
    np.testing.assert_allclose(float(spectral_loss(det, "frobenius")), fro_ref, rtol=1e-3)
    np.testing.assert_allclose(float(spectral_loss(det, "per_subspace")), per_ref, rtol=1e-4)


@pytest.mark.parametrize("which", ["orth", "frobenius", "per_subspace", "squared"])
def test_gradients_match_finite_differences(which):
    det, _, _ = decomposed(seed=2, k=2, d=2)
    graphdef, factors, rest = perturb(det, 0.05, seed=3)
    with jax.enable_x64(True):
        f64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
        factors, rest = f64(factors), f64(rest)

        @jax.jit
        def loss(p):
            m = nnx.merge(graphdef, p, rest)
            return orthogonality_loss(m) if which == "orth" else spectral_loss(m, which)

        g = jax.grad(loss)(factors)
        leaves, treedef = jax.tree.flatten(factors)
        rng = np.random.default_rng(4)
        direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), factors)
        h = 1e-5
        shift = jax.jit(lambda sgn: jax.tree.map(lambda x, v: x + sgn * h * v, factors, direction))
        fd = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * h)
        analytic = sum(
            jnp.vdot(a, b)
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(direction), strict=True)
        )
        np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-6)


def test_squared_form_has_exactly_zero_gradient_at_init_unlike_effort():
    """Effort's |δ| pushes every s_j by ∓2·s_j at step 0 (δ is rounding noise); (δ)² does not."""
    det, _, _ = decomposed(k=2, d=1)
    graphdef, factors, rest = nnx.split(det, ArtifactFactor, ...)

    def grads(form):
        return jax.grad(lambda f: spectral_loss(nnx.merge(graphdef, f, rest), form))(factors)

    squared = grads("squared")
    assert float(spectral_loss(det, "squared")) == 0.0
    for leaf in jax.tree.leaves(squared):
        assert not np.any(np.asarray(leaf)), "squared form: non-zero gradient at init"
    s_grad = np.abs(np.asarray(grads("frobenius")["backbone"]["transformer"]["blocks"]["attn"]
                               ["q"]["s"][...]))
    s0 = np.asarray(det.backbone.transformer.blocks.attn.q.s0[...])
    np.testing.assert_allclose(s_grad, 2 * s0, rtol=1e-3)  # |∂|δ|/∂s_j| = 2·s_j at init


def test_weight_change_exact_zero_unchanged_and_hand_value_when_moved():
    from fmsd_jax.method.losses import weight_change_of

    det, dense, spec = decomposed(k=2, d=1)
    q = decomposed_layers(det, spec.targets)["q"]
    d2, w0 = weight_change_of(q)
    assert not np.any(np.asarray(d2))
    np.testing.assert_allclose(np.asarray(w0), np.sum(dense["q"].astype(np.float64) ** 2,
                                                      axis=(1, 2)), rtol=1e-5)
    # s_j -> s_j + c on layer 0 only: Ŵ − W₀ = c·u_j v_jᵀ, so ‖Ŵ − W₀‖ = |c| (unit vectors).
    c = 0.25
    q.s[...] = q.s[...].at[0, 1].add(c)
    d2, _ = weight_change_of(q)
    np.testing.assert_allclose(np.sqrt(np.asarray(d2)), [c, 0.0], rtol=1e-5, atol=0)


def test_zero_lambda_is_not_traced():
    """With λ = 0 the objective runs on a model that has no decomposed layer at all."""
    det = Detector(CLIPVisionTower(CFG, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    batch = dict(image=jnp.ones((2, 16, 16, 3)), label=jnp.array([0, 1]))
    loss, aux = make_loss_fn(CROSS_ENTROPY)(det, batch)
    assert float(aux["orth"]) == 0.0 and float(aux["spec"]) == 0.0
    np.testing.assert_allclose(float(loss), float(aux["ce"]))
    with pytest.raises(ValueError, match="no DecomposedDense"):
        make_loss_fn(objective_settings(lambda_orth=1.0))(det, batch)
    # and the jaxpr of the λ = 0 objective has no trace of the regulariser on a decomposed model
    det2, _, _ = decomposed()
    g, s = nnx.split(det2)
    n0 = len(jax.make_jaxpr(
        lambda s: make_loss_fn(CROSS_ENTROPY)(nnx.merge(g, s), batch)[0])(s).eqns)
    both = objective_settings(lambda_orth=1.0, lambda_spec=1.0)
    n1 = len(jax.make_jaxpr(lambda s: make_loss_fn(both)(nnx.merge(g, s), batch)[0])(s).eqns)
    assert n1 > n0


def test_objective_config_fields():
    """The typed settings refuse what the objective cannot do, and the loss weights each term
    by its λ (the config section → ObjectiveConfig step is factory.objective_section's,
    tested in test_method_optimizer.py)."""
    oc = ObjectiveConfig(lambda_orth=0.5, lambda_spec=0.1, spectral_form="per_subspace")
    with pytest.raises(ValueError, match="spectral_form"):
        ObjectiveConfig(lambda_orth=0.0, lambda_spec=0.0, spectral_form="nuclear")
    with pytest.raises(ValueError, match=">= 0"):
        ObjectiveConfig(lambda_orth=-1.0, lambda_spec=0.0, spectral_form="squared")
    with pytest.raises(TypeError, match="spectral_form"):  # no field has a default
        ObjectiveConfig(lambda_orth=0.0, lambda_spec=0.0)  # type: ignore[call-arg]
    det, _, _ = decomposed()
    batch = dict(image=jnp.ones((2, 16, 16, 3)), label=jnp.array([0, 1]))
    det = nnx.merge(*perturb(det))
    loss, aux = make_loss_fn(oc)(det, batch)
    chex.assert_trees_all_close(loss, aux["ce"] + 0.5 * aux["orth"] + 0.1 * aux["spec"], rtol=1e-6)
    np.testing.assert_allclose(float(aux["spec"]), float(spectral_loss(det, "per_subspace")),
                               rtol=1e-6)
    assert float(aux["orth"]) > 0 and float(aux["spec"]) > 0  # the weights are tested
    assert set(aux) == {"loss", "ce", "orth", "spec", "accuracy"}
