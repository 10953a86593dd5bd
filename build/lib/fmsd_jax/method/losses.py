"""FMSD regularisers (DESIGN.md §1.5), computed from small Gram matrices.

Both losses are sums over every decomposed matrix (all layers of all targets, like Effort's sum
over its 96 modules). A layer the mask leaves out keeps its initial factors, where both losses
are zero, so including it changes neither value nor update.

L_orth, for U and for V, is Effort's ‖ÛᵀÛ − I‖²_F on the concatenated basis Û = [U_r | U_a]
(U_a = [U_1 … U_K]) minus its frozen constant block ‖U_rᵀU_r − I‖²:

    ‖U_aᵀU_a − I‖²  (diagonal blocks: within-subspace orthonormality;
                     off-diagonal blocks: decorrelation between subspaces)
  + 2‖U_rᵀU_a‖²      (orthogonality to the semantic basis; the two off-diagonal blocks of Û)

Never an n × n product: U_aᵀU_a is (K·d)², and ‖U_rᵀX‖² = ‖X − U₀(U₀ᵀX)‖² on the square side
(U₀: the frozen initial artifact basis, whose complement is U_r), an (n × K·d) computation.

L_spec keeps the pretrained spectrum. 'frobenius' (Effort's L_ksv) is |‖Ŵ‖²_F − ‖W‖²_F| with
Ŵ = W_s + A, A = U_a diag(s) V_aᵀ, expanded so W is never rebuilt and the large constant
‖W_s‖² cancels exactly instead of in fp32:

    ‖Ŵ‖² − ‖W‖² = 2⟨W_s, A⟩ + ‖A‖² − Σ s₀²,   ⟨W_s, A⟩ = Σ_j s_j u_jᵀ(W_s v_j),
    ‖A‖² = Σ_ij s_i s_j (U_aᵀU_a)_ij (V_aᵀV_a)_ij.

'per_subspace' is Σ_k |‖U_k diag(s_k) V_kᵀ‖²_F − ‖s_k,0‖²|: each artifact subspace keeps its own
pretrained energy (cross terms with W_s are left to L_orth).

'squared' is (‖Ŵ‖²_F − ‖W₀‖²_F)², the same energy gap as 'frobenius' but with zero gradient at
initialisation. Why it exists: Effort's |·| has gradient sign(δ)·∇δ, and at step 0 δ is fp32
rounding noise while ∇δ w.r.t. s_j is 2·s_j, so the |·| form pushes every artifact singular value
by ∓2·s from the first step, its sign set by rounding (issue 11 measured this at more than half
of the CE's s-gradient at λ = 0.1 on the demo). The squared form only pulls back once the weight has
moved. It is computed from the *changes* of the factors, ΔU = U − U₀, Δs = s − s₀, ΔV = V − V₀:

    D = Ŵ − W₀ = X diag(a) Yᵀ,   X = [ΔU | U₀ | U₀],  a = [s | Δs | s₀],  Y = [V | V | ΔV],
    δ = ‖Ŵ‖² − ‖W₀‖² = 2⟨W_s, D⟩ + 2⟨A₀, D⟩ + ‖D‖²,

so at initialisation every term holds an exact zero factor: δ = 0 and its gradient 2·δ·∇δ = 0
exactly (not to rounding). W₀ = W_s + A₀ is the decomposed pretrained weight, equal to the
pretrained W to one fp32 rounding. Units: squared energy, so its λ is not comparable with the
|·| forms' λ. The same D gives the relative weight change ‖Ŵ − W₀‖/‖W₀‖ that the run's
diagnostics report (`weight_change_of`), without rebuilding W and without the cancellation of
‖Ŵ‖² − ‖W₀‖² computed from two large numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fmsd_jax.method.decompose import DecomposedDense

SPECTRAL_FORMS = ("frobenius", "per_subspace", "squared")
_HI = jax.lax.Precision.HIGHEST  # tiny products; keep them exact on TF32/bf16 hardware


def decomposed_modules(model: nnx.Module) -> list[DecomposedDense]:
    mods = [m for _, m in nnx.iter_modules(model) if isinstance(m, DecomposedDense)]
    if not mods:
        raise ValueError(
            "the model has no DecomposedDense layer; call decompose() first "
            "or set lambda_orth = lambda_spec = 0"
        )
    return mods


def _gram(x: jax.Array) -> jax.Array:
    return jnp.einsum("...ia,...ib->...ab", x, x, precision=_HI)


def _block_diag_mask(kd: int, k: int) -> jax.Array:
    d = kd // k
    idx = jnp.arange(kd) // d
    return (idx[:, None] == idx[None, :]).astype(jnp.float32)


def _semantic_overlap(x: jax.Array, x0: jax.Array, basis: jax.Array | None) -> jax.Array:
    """‖B_rᵀ X‖² per layer, B_r the frozen semantic basis of this side."""
    if basis is not None:  # long side of a rectangular weight: the basis is stored
        p = jnp.einsum("...ir,...ia->...ra", basis, x, precision=_HI)
        return jnp.sum(p**2, axis=(-2, -1))
    resid = x - jnp.einsum(
        "...ia,...ab->...ib",
        x0,
        jnp.einsum("...ia,...ib->...ab", x0, x, precision=_HI),
        precision=_HI,
    )
    return jnp.sum(resid**2, axis=(-2, -1))


def orthogonality_terms(model: nnx.Module) -> dict[str, jax.Array]:
    """within / between / semantic parts of L_orth, each summed over U and V and all layers."""
    within = between = semantic = jnp.zeros((), jnp.float32)
    for m in decomposed_modules(model):
        kd = m.s.shape[-1]
        bd = _block_diag_mask(kd, m.num_subspaces)
        eye = jnp.eye(kd, dtype=jnp.float32)
        for x, x0, basis in (
            (m.u[...], m.u0[...], m.semantic_u),
            (m.v[...], m.v0[...], m.semantic_v),
        ):
            d2 = (_gram(x) - eye) ** 2
            within = within + jnp.sum(d2 * bd)
            between = between + jnp.sum(d2 * (1.0 - bd))
            b = basis[...] if basis is not None else None
            semantic = semantic + 2.0 * jnp.sum(_semantic_overlap(x, x0, b))
    return dict(within=within, between=between, semantic=semantic)


def orthogonality_loss(model: nnx.Module) -> jax.Array:
    """L_orth = Σ over decomposed matrices and over U, V of ‖ÛᵀÛ − I‖²_F − const."""
    t = orthogonality_terms(model)
    return t["within"] + t["between"] + t["semantic"]


def _change_factors(m: DecomposedDense) -> tuple[jax.Array, jax.Array, jax.Array]:
    """D = Ŵ − W₀ as X diag(a) Yᵀ with an exact zero factor in every column at init."""
    u, s, v = m.u[...], m.s[...], m.v[...]
    u0, s0, v0 = m.u0[...], m.s0[...], m.v0[...]
    x = jnp.concatenate([u - u0, u0, u0], axis=-1)
    a = jnp.concatenate([s, s - s0, s0], axis=-1)
    y = jnp.concatenate([v, v, v - v0], axis=-1)
    return x, a, y


def _factored_energy(x: jax.Array, a: jax.Array, y: jax.Array) -> jax.Array:
    """‖X diag(a) Yᵀ‖²_F = Σ_ij a_i a_j (XᵀX)_ij (YᵀY)_ij, per stacked layer."""
    return jnp.sum(_gram(x) * _gram(y) * a[..., :, None] * a[..., None, :], axis=(-2, -1))


def _semantic_inner(m: DecomposedDense, x: jax.Array, a: jax.Array, y: jax.Array) -> jax.Array:
    """⟨W_s, X diag(a) Yᵀ⟩ = Σ_j a_j x_jᵀ (W_s y_j), per stacked layer."""
    wy = jnp.einsum("...io,...oa->...ia", m.semantic[...], y, precision=_HI)
    return jnp.einsum("...ia,...ia,...a->...", x, wy, a, precision=_HI)


def _energy_gap(m: DecomposedDense) -> tuple[jax.Array, jax.Array]:
    """(δ = ‖Ŵ‖² − ‖W₀‖², ‖D‖² = ‖Ŵ − W₀‖²) per stacked layer, both exactly 0 at init."""
    x, a, y = _change_factors(m)
    u0, s0, v0 = m.u0[...], m.s0[...], m.v0[...]
    d2 = _factored_energy(x, a, y)
    a0_d = jnp.einsum("...ia,...ib,...a,...b,...ja,...jb->...", u0, x, s0, a, v0, y,
                      precision=_HI)  # ⟨A₀, D⟩
    return 2.0 * (_semantic_inner(m, x, a, y) + a0_d) + d2, d2


def weight_change_of(m: DecomposedDense) -> tuple[jax.Array, jax.Array]:
    """(‖Ŵ − W₀‖²_F, ‖W₀‖²_F) of one (stacked) decomposed projection, W₀ = W_s + A₀.

    ‖Ŵ − W₀‖² is exactly 0 for a layer whose factors never changed (a layer the mask left out).
    """
    _, d2 = _energy_gap(m)
    u0, s0, v0 = m.u0[...], m.s0[...], m.v0[...]
    sem = m.semantic[...]
    w0 = (jnp.sum(sem.astype(jnp.float32) ** 2, axis=(-2, -1))
          + 2.0 * _semantic_inner(m, u0, s0, v0) + _factored_energy(u0, s0, v0))
    return d2, w0


def spectral_loss(model: nnx.Module, form: str = "frobenius") -> jax.Array:
    """L_spec in Effort's Frobenius-energy form, the per-subspace form or the squared form."""
    if form not in SPECTRAL_FORMS:
        raise ValueError(f"unknown spectral_form {form!r}; use one of {SPECTRAL_FORMS}")
    total = jnp.zeros((), jnp.float32)
    for m in decomposed_modules(model):
        if form == "squared":
            delta, _ = _energy_gap(m)
            total = total + jnp.sum(delta**2)
            continue
        u, s, v = m.u[...], m.s[...], m.v[...]
        # Σ_ij s_i s_j (UᵀU)_ij (VᵀV)_ij, elementwise before the block/total reduction.
        energy = _gram(u) * _gram(v) * s[..., :, None] * s[..., None, :]
        if form == "frobenius":
            wv = jnp.einsum("...io,...oa->...ia", m.semantic[...], v, precision=_HI)
            cross = jnp.einsum("...ia,...ia,...a->...", u, wv, s, precision=_HI)
            delta = 2.0 * cross + jnp.sum(energy, axis=(-2, -1)) - m.energy0[...]
            total = total + jnp.sum(jnp.abs(delta))
        else:
            kd = s.shape[-1]
            k = m.num_subspaces
            d = kd // k
            blocks = energy.reshape(*energy.shape[:-2], k, d, k, d)
            # diagonal over the two subspace axes -> (..., d, d, K); sum each block.
            e_k = jnp.sum(jnp.diagonal(blocks, axis1=-4, axis2=-2), axis=(-3, -2))
            e0 = jnp.sum((m.s0[...] ** 2).reshape(*s.shape[:-1], k, d), axis=-1)
            total = total + jnp.sum(jnp.abs(e_k - e0))
    return total
