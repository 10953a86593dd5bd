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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fmsd_jax.method.decompose import DecomposedDense

SPECTRAL_FORMS = ("frobenius", "per_subspace")
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


def spectral_loss(model: nnx.Module, form: str = "frobenius") -> jax.Array:
    """L_spec in Effort's Frobenius-energy form or the per-subspace energy form."""
    if form not in SPECTRAL_FORMS:
        raise ValueError(f"unknown spectral_form {form!r}; use one of {SPECTRAL_FORMS}")
    total = jnp.zeros((), jnp.float32)
    for m in decomposed_modules(model):
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
