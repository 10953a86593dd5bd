"""Multi-artifact SVD decomposition of the candidate projections (DESIGN.md §1.4).

A dense weight W (in × out, n = min(in, out)) with SVD W = U Σ Vᵀ (singular values descending)
becomes

    W = W_s + Σ_k U_k diag(s_k) V_kᵀ,      k = 1..K, each of rank d, K·d < n,

where (U_k, s_k, V_k) are the k-th group of d triplets among the K·d smallest ones, in order,
and W_s is the frozen semantic part.

Storage decision — the semantic part is stored *dense* (one in × out `SemanticWeight`), not as
its rank-r factors. Reason (bench/decomposed_step.py, row "semantic factored"): r ≈ n, so a
factored semantic part costs two matmuls and twice the weight bytes in every forward for
nothing — W_s is frozen, so no gradient is ever taken with respect to it, and its dense form is
exactly as cheap as the pretrained layer. W_s is computed as W − Σ_k U_k diag(s_k) V_kᵀ (the
residual form) rather than re-synthesised from the top r triplets: W_s + artifact part then
equals W to one fp32 rounding whatever the accuracy of the SVD, so the decomposed model starts
at the pretrained function. Mathematically both forms are identical.

The L_orth term "orthogonality to the semantic basis" needs U_r, V_r. For a square weight (q, k,
v, out) the semantic basis is the orthogonal complement of the *initial* artifact basis, so
U_r U_rᵀ = I − U₀U₀ᵀ and ‖U_rᵀX‖² = ‖X − U₀(U₀ᵀX)‖², an (in × K·d) computation; U₀, s₀, V₀
(tiny) are kept as a frozen `SpectralReference`, which also holds the pretrained energies that
L_spec compares against. Only for the long side of a rectangular weight (fc1's V, fc2's U) is the
complement not spanned by the column space, and there the semantic basis itself is kept as a
frozen `SemanticBasis` (same size as W; only built when MLP layers are targets).

The forward is factorised, x·W_s + ((x·U)·s)·Vᵀ + b, so training never rebuilds W nor
materialises an in × out weight gradient. `mode='rebuild'` (Effort's design) exists for the
benchmark only.

Blocks are stacked on a leading layer axis (vit.py); every array here carries that axis when it
lives in the model and loses it inside the scan body, where nnx.merge of one layer's slice
yields a per-layer `DecomposedDense`. Every candidate layer is decomposed; which of them train
is decided by the layer mask in the optimizer (DESIGN.md §3).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fmsd_jax.model.detector import HeadParam
from fmsd_jax.model.layers import Dense, add_bias
from fmsd_jax.model.vit import ATTN_PROJECTIONS, MLP_PROJECTIONS


class SemanticWeight(nnx.Variable):
    """The frozen semantic part W_s of a decomposed weight (never trained, never differentiated)."""


class SemanticBasis(nnx.Variable):
    """Frozen semantic singular vectors of the long side of a rectangular weight (L_orth only)."""


class SpectralReference(nnx.Variable):
    """Frozen pretrained quantities (initial artifact factors and energies) used by the losses."""


class ArtifactFactor(nnx.Param):
    """A trainable factor (U_k, s_k or V_k) of an artifact subspace."""


FROZEN_TYPES = (SemanticWeight, SemanticBasis, SpectralReference)

REGIMES = ("fmsd", "effort", "full", "linear_probe")


def trainable_filter(regime: str) -> Any:
    """The nnx filter of the Variables a training regime differentiates and updates.

    'fmsd': artifact factors + head; 'full': every nnx.Param (run it on the dense model; the
    frozen types above are not Params, so a decomposed model keeps W_s frozen even here);
    'linear_probe': the head only.
    """
    if regime in ("fmsd", "effort"):  # Effort is FMSD with K=1, d=1 and no mask
        return nnx.Any(ArtifactFactor, HeadParam)
    if regime == "full":
        return nnx.Param
    if regime == "linear_probe":
        return HeadParam
    raise ValueError(f"unknown training regime {regime!r}; use one of {REGIMES}")


@dataclasses.dataclass(frozen=True)
class DecompositionSpec:
    """What `decompose` did: saved in every checkpoint (and as decomposition.json beside them)."""

    targets: tuple[str, ...]
    num_subspaces: int  # K
    rank: int  # d
    num_layers: int  # L
    shapes: dict[str, tuple[int, int]]  # target -> (in, out)
    semantic_rank: dict[str, int]  # target -> r = n - K·d

    @property
    def artifact_dim(self) -> int:
        return self.num_subspaces * self.rank

    @property
    def mask_shape(self) -> tuple[int, int]:
        return (self.num_layers, len(self.targets))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["shapes"] = {k: list(v) for k, v in self.shapes.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecompositionSpec:
        return cls(
            targets=tuple(d["targets"]),
            num_subspaces=int(d["num_subspaces"]),
            rank=int(d["rank"]),
            num_layers=int(d["num_layers"]),
            shapes={k: (int(v[0]), int(v[1])) for k, v in d["shapes"].items()},
            semantic_rank={k: int(v) for k, v in d["semantic_rank"].items()},
        )

    @classmethod
    def from_json(cls, s: str) -> DecompositionSpec:
        return cls.from_dict(json.loads(s))


class DecomposedDense(nnx.Module):
    """y = x·W_s + ((x·U)·s)·Vᵀ + b, with K artifact subspaces of rank d concatenated.

    U is (in, K·d), s (K·d,), V (out, K·d); subspace k owns columns [k·d, (k+1)·d). Keeping
    them concatenated makes the artifact path two skinny matmuls whatever K is; the losses
    recover the per-subspace blocks by reshaping.
    """

    def __init__(
        self,
        semantic: jax.Array,
        u: jax.Array,
        s: jax.Array,
        v: jax.Array,
        bias: jax.Array | None,
        *,
        num_subspaces: int,
        dtype: Any,
        reference: dict[str, jax.Array],
        semantic_basis: dict[str, jax.Array],
        mode: str = "factorised",
    ):
        if mode not in ("factorised", "rebuild"):
            raise ValueError(
                f"unknown DecomposedDense mode {mode!r}; use 'factorised' or 'rebuild'"
            )
        self.semantic = SemanticWeight(semantic)
        self.u = ArtifactFactor(u)
        self.s = ArtifactFactor(s)
        self.v = ArtifactFactor(v)
        self.bias = nnx.Param(bias) if bias is not None else None
        # Initial artifact factors and pretrained energies (see module docstring).
        self.u0 = SpectralReference(reference["u0"])
        self.s0 = SpectralReference(reference["s0"])
        self.v0 = SpectralReference(reference["v0"])
        self.energy0 = SpectralReference(reference["energy0"])  # ‖W‖²_F − ‖W_s‖²_F = Σ s₀²
        self.semantic_u = SemanticBasis(semantic_basis["u"]) if "u" in semantic_basis else None
        self.semantic_v = SemanticBasis(semantic_basis["v"]) if "v" in semantic_basis else None
        self.num_subspaces = num_subspaces
        self.dtype = dtype
        self.mode = mode

    @property
    def in_features(self) -> int:
        return self.semantic.shape[-2]

    @property
    def out_features(self) -> int:
        return self.semantic.shape[-1]

    def artifact_weight(self) -> jax.Array:
        """Σ_k U_k diag(s_k) V_kᵀ (in × out, stacked if the module is). For merge/export only."""
        u, s, v = self.u[...], self.s[...], self.v[...]
        return jnp.einsum("...ir,...r,...or->...io", u, s, v, precision=jax.lax.Precision.HIGHEST)

    def merged_weight(self) -> jax.Array:
        return self.semantic[...] + self.artifact_weight()

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        x = x.astype(dt)
        if self.mode == "rebuild":  # Effort: W = W_main + U diag(S) Vᵀ every step.
            y = x @ self.merged_weight().astype(dt)
        else:
            y = x @ self.semantic[...].astype(dt)
            y = y + artifact_path(x, self.u[...], self.s[...], self.v[...])
        if self.bias is not None:
            y = add_bias(y, self.bias[...])
        return y


@jax.custom_vjp
def artifact_path(x: jax.Array, u: jax.Array, s: jax.Array, v: jax.Array) -> jax.Array:
    """((x·U)·diag(s))·Vᵀ in x's dtype, with the gradients of U, s, V summed in float32.

    Why a custom VJP: under bf16 compute, autodiff forms each factor's gradient as a bf16 dot
    or reduce over the batch, and on a sharded batch XLA all-reduces those bf16 partial sums
    across chips before the cast back to the fp32 parameter (seen in the compiled TPU step,
    tests/test_plan.py). Here the batch contractions produce float32, so the cross-chip sums
    are float32 too. The forward and the input gradient are unchanged; the recomputed skinny
    matmuls cost K·d/width of a layer's FLOPs.
    """
    dt = x.dtype
    return ((x @ u.astype(dt)) * s.astype(dt)) @ v.astype(dt).T


def _artifact_fwd(x, u, s, v):
    dt = x.dtype
    a = x @ u.astype(dt)
    return (a * s.astype(dt)) @ v.astype(dt).T, (x, a, u, s, v)


def _artifact_bwd(res, g):
    x, a, u, s, v = res
    dt, f32 = x.dtype, jnp.float32
    z = a * s.astype(dt)
    dz = g @ v.astype(dt)
    dv = jnp.einsum("...o,...k->ok", g, z, preferred_element_type=f32)
    ds = jnp.einsum("...k,...k->k", dz, a, preferred_element_type=f32)
    da = dz * s.astype(dt)
    du = jnp.einsum("...i,...k->ik", x, da, preferred_element_type=f32)
    dx = (da @ u.astype(dt).T).astype(dt)
    return dx, du.astype(u.dtype), ds.astype(s.dtype), dv.astype(v.dtype)


artifact_path.defvjp(_artifact_fwd, _artifact_bwd)


# ----------------------------------------------------------------------------------------------
# Surgery


def _blocks(model: nnx.Module) -> nnx.Module:
    tower = model.backbone if hasattr(model, "backbone") else model
    if not hasattr(tower, "transformer"):
        raise TypeError(f"expected a Detector or CLIPVisionTower, got {type(model).__name__}")
    return tower.transformer.blocks


def _parent(blocks: nnx.Module, target: str) -> nnx.Module:
    if target in ATTN_PROJECTIONS:
        return blocks.attn
    if target in MLP_PROJECTIONS:
        return blocks.mlp
    raise ValueError(
        f"unknown target projection {target!r}; choose from {ATTN_PROJECTIONS + MLP_PROJECTIONS}"
    )


@functools.partial(jax.jit, static_argnums=(1, 2))
def _svd_tail(
    w: jax.Array, num_subspaces: int, rank: int
) -> tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array, jax.Array, jax.Array]:
    """SVD of a stack (L, in, out) → the frozen references and the K·d smallest triplets.

    One jitted computation per weight shape (batched over L; on an accelerator the SVD runs
    there). W_s is not formed here but by `semantic_part`, the function a restore calls too."""
    _, n_in, n_out = w.shape
    n = min(n_in, n_out)
    r = n - num_subspaces * rank
    u, s, vh = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)  # s descending
    ua, sa, va = u[..., r:], s[..., r:], jnp.swapaxes(vh[..., r:, :], -1, -2)
    # Own buffers: the trainable factors are donated by the train step, the references not.
    ref = dict(u0=jnp.copy(ua), s0=jnp.copy(sa), v0=jnp.copy(va), energy0=jnp.sum(sa**2, axis=-1))
    basis = {}
    if n_in > n:  # U's long side: its semantic columns do not complete U₀ to the identity.
        basis["u"] = u[..., :r]
    if n_out > n:
        basis["v"] = jnp.swapaxes(vh[..., :r, :], -1, -2)
    return ref, basis, ua, sa, va


@jax.jit
def semantic_part(w: jax.Array, u0: jax.Array, s0: jax.Array, v0: jax.Array) -> jax.Array:
    """W_s = W − Σ_k U₀ diag(s₀) V₀ᵀ of a stack (L, in, out), from the tail's triplets.

    Both `decompose` (triplets from the SVD) and `decompose_from_reference` (triplets read
    from a checkpoint) form W_s by this one compiled function, so the two give bit-identical
    W_s: the same product compiled inside the SVD's jit differed from a separately compiled
    one in the last ulp (XLA fuses and orders the contraction differently there)."""
    artifact = jnp.einsum("lir,lr,lor->lio", u0, s0, v0, precision=jax.lax.Precision.HIGHEST)
    return w - artifact


def _decompose_stacked(
    w: jax.Array, num_subspaces: int, rank: int
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array], jax.Array, jax.Array, jax.Array]:
    """SVD of a stack (L, in, out) → semantic part, artifact factors and frozen references."""
    ref, basis, ua, sa, va = _svd_tail(w, num_subspaces, rank)
    return semantic_part(w, ua, sa, va), ref, basis, ua, sa, va


def _dense_layer(blocks: nnx.Module, target: str) -> tuple[nnx.Module, Dense]:
    """(the block holding `target`, its `Dense`): a candidate layer not yet decomposed."""
    parent = _parent(blocks, target)
    layer = getattr(parent, target)
    if not isinstance(layer, Dense):
        raise TypeError(
            f"blocks.{target} is a {type(layer).__name__}, not a Dense; was the model "
            "already decomposed? merge() it first"
        )
    return parent, layer


def decompose(
    model: nnx.Module,
    *,
    targets: Sequence[str] = ATTN_PROJECTIONS,
    num_subspaces: int,
    rank: int,
    mode: str = "factorised",
) -> DecompositionSpec:
    """Replace every candidate projection of every block, in place, by a `DecomposedDense`.

    `model` is a `Detector` or a `CLIPVisionTower`. All L layers of each target are
    decomposed by one batched SVD (the mask chooses which of them train). Returns the JSON-
    serialisable spec that `merge`, the losses, the optimizer and a restore need.
    """
    targets = tuple(targets)
    if num_subspaces < 1 or rank < 1:
        raise ValueError(f"num_subspaces ({num_subspaces}) and rank ({rank}) must be >= 1")
    if len(set(targets)) != len(targets) or not targets:
        raise ValueError(f"targets must be distinct and non-empty, got {targets}")
    blocks = _blocks(model)
    shapes, sem_rank, num_layers = {}, {}, None
    for t in targets:
        parent, layer = _dense_layer(blocks, t)
        w = layer.kernel[...]
        if w.ndim != 3:
            raise ValueError(f"expected a stacked (L, in, out) kernel for {t}, got {w.shape}")
        L, n_in, n_out = w.shape
        n = min(n_in, n_out)
        if num_subspaces * rank >= n:
            raise ValueError(
                f"K·d = {num_subspaces}·{rank} must be smaller than min(in, out) = "
                f"{n} of {t}; lower num_subspaces or rank"
            )
        semantic, ref, basis, ua, sa, va = _decompose_stacked(w, num_subspaces, rank)
        bias = layer.bias[...] if layer.bias is not None else None
        new = DecomposedDense(
            semantic,
            ua,
            sa,
            va,
            bias,
            num_subspaces=num_subspaces,
            dtype=layer.dtype,
            reference=ref,
            semantic_basis=basis,
            mode=mode,
        )
        setattr(parent, t, new)
        shapes[t] = (n_in, n_out)
        sem_rank[t] = n - num_subspaces * rank
        num_layers = L
    return DecompositionSpec(
        targets=targets,
        num_subspaces=num_subspaces,
        rank=rank,
        num_layers=int(num_layers),
        shapes=shapes,
        semantic_rank=sem_rank,
    )


def spectral_reference(model: nnx.Module, targets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """target → what the SVD of its stacked weight produced besides W_s: the tail's triplets
    u0 (L, in, K·d), s0 (L, K·d), v0 (L, out, K·d), their energy0 (L,) and, on the long side of
    a rectangular weight, the semantic basis semantic_u (L, in, r) / semantic_v (L, out, r).

    This is what a checkpoint stores so that `decompose_from_reference` rebuilds the same
    decomposed layers with no SVD (for q, k, v, out it is in×K·d per layer, not in×out)."""
    out: dict[str, dict[str, Any]] = {}
    for t, layer in decomposed_layers(model, targets).items():
        ref = {name: getattr(layer, name)[...] for name in ("u0", "s0", "v0", "energy0")}
        for name in ("semantic_u", "semantic_v"):
            if getattr(layer, name) is not None:
                ref[name] = getattr(layer, name)[...]
        out[t] = ref
    return out


def reference_shapes(spec: DecompositionSpec) -> dict[str, dict[str, tuple[int, ...]]]:
    """The array shapes `spectral_reference` gives for a model decomposed as `spec`."""
    kd, L = spec.artifact_dim, spec.num_layers
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for t in spec.targets:
        n_in, n_out = spec.shapes[t]
        r = spec.semantic_rank[t]
        shapes = {"u0": (L, n_in, kd), "s0": (L, kd), "v0": (L, n_out, kd), "energy0": (L,)}
        if n_in > min(n_in, n_out):
            shapes["semantic_u"] = (L, n_in, r)
        if n_out > min(n_in, n_out):
            shapes["semantic_v"] = (L, n_out, r)
        out[t] = shapes
    return out


# `reference_mismatch` above which a weight is not the one the reference was taken from: the
# same weights give ~1e-6 in float32 (rounding), an unrelated weight ~1, and a weight changed
# by a relative ε about ε (a fine-tuned or otherwise edited copy of the checkpoint's weights).
REFERENCE_TOLERANCE = 1e-2


@jax.jit
def reference_mismatch(w: jax.Array, u0: jax.Array, s0: jax.Array, v0: jax.Array) -> jax.Array:
    """How far `w` (L, in, out) is from being the weight whose SVD gave the tail triplets
    (u0, s0, v0): ‖U₀ᵀW − diag(s₀)V₀ᵀ‖_F, the largest over layers, relative to the
    ‖W‖_F·sqrt(K·d / in) that the projection of an unrelated weight onto K·d directions has.

    A decomposition rebuilt without an SVD takes W_s = W − U₀ diag(s₀) V₀ᵀ on trust; pointing
    `model.init_from` at another checkpoint of the same geometry would otherwise pass every
    shape check and silently score with a W_s the run never trained with."""
    w32, u32, v32 = (x.astype(jnp.float32) for x in (w, u0, v0))
    resid = jnp.einsum("lik,lio->lko", u32, w32) - s0.astype(jnp.float32)[..., None] * \
        jnp.swapaxes(v32, 1, 2)
    kd, n_in = u0.shape[-1], w.shape[1]
    scale = jnp.linalg.norm(w32, axis=(1, 2)) * jnp.sqrt(kd / n_in)
    return jnp.max(jnp.linalg.norm(resid, axis=(1, 2)) / jnp.maximum(scale, 1e-30))


def decompose_from_reference(
    model: nnx.Module,
    spec: DecompositionSpec,
    reference: dict[str, dict[str, Any]],
    *,
    mode: str = "factorised",
) -> None:
    """`decompose` without the SVD: the layers a run trained with, from its saved reference.

    Each candidate `Dense` of `model` (the pretrained weights W) becomes the `DecomposedDense`
    that `decompose` made at the start of training: W_s = W − Σ_k U₀ diag(s₀) V₀ᵀ by the same
    compiled `semantic_part`, so W_s is bit-identical to training's whatever an SVD on this
    backend would give (near-degenerate singular values need not reproduce the tail); the
    artifact factors start at copies of U₀, s₀, V₀ (a restore then overwrites them).
    """
    blocks = _blocks(model)
    want = reference_shapes(spec)
    for t in spec.targets:
        parent, layer = _dense_layer(blocks, t)
        w = layer.kernel[...]
        if tuple(w.shape) != (spec.num_layers, *spec.shapes[t]):
            raise ValueError(f"{t}: the weight is {tuple(w.shape)}, the decomposition was made "
                             f"of ({spec.num_layers}, {spec.shapes[t][0]}, {spec.shapes[t][1]})")
        ref = reference.get(t, {})
        got = {name: tuple(np.shape(x)) for name, x in ref.items()}
        if got != want[t]:
            raise ValueError(f"{t}: the saved reference holds {got}, a decomposition as "
                             f"{spec.num_subspaces}x{spec.rank} needs {want[t]}")
        u0, s0, v0 = (jnp.asarray(ref[k]) for k in ("u0", "s0", "v0"))
        mismatch = float(reference_mismatch(w, u0, s0, v0))
        if mismatch > REFERENCE_TOLERANCE:
            raise ValueError(
                f"{t}: these are not the weights the reference was taken from (their tail "
                f"subspace leaves a residual of {mismatch:.2g} of what an unrelated weight "
                f"would, above {REFERENCE_TOLERANCE:g})")
        basis = {k[-1]: jnp.asarray(ref[k]) for k in ("semantic_u", "semantic_v") if k in ref}
        new = DecomposedDense(
            semantic_part(w, u0, s0, v0),
            jnp.copy(u0),  # own buffers: the train step donates the trainable factors
            jnp.copy(s0),
            jnp.copy(v0),
            layer.bias[...] if layer.bias is not None else None,
            num_subspaces=spec.num_subspaces,
            dtype=layer.dtype,
            reference=dict(u0=u0, s0=s0, v0=v0, energy0=jnp.asarray(ref["energy0"])),
            semantic_basis=basis,
            mode=mode,
        )
        setattr(parent, t, new)


def decomposed_layers(model: nnx.Module, targets: Sequence[str]) -> dict[str, DecomposedDense]:
    """target → the stacked `DecomposedDense` of that projection."""
    blocks = _blocks(model)
    out = {}
    for t in targets:
        layer = getattr(_parent(blocks, t), t)
        if not isinstance(layer, DecomposedDense):
            raise TypeError(f"blocks.{t} is a {type(layer).__name__}, not decomposed")
        out[t] = layer
    return out


def merge(model: nnx.Module) -> list[str]:
    """Fold every decomposed projection back into a plain stacked `Dense`, in place.

    W = W_s + Σ_k U_k diag(s_k) V_kᵀ, so the exported detector costs exactly the base ViT.
    Returns the merged target names.
    """
    blocks = _blocks(model)
    merged = []
    for t in ATTN_PROJECTIONS + MLP_PROJECTIONS:
        parent = _parent(blocks, t)
        layer = getattr(parent, t, None)
        if not isinstance(layer, DecomposedDense):
            continue
        w = layer.merged_weight()
        dense = Dense(
            w.shape[-2],
            w.shape[-1],
            dtype=layer.dtype,
            use_bias=layer.bias is not None,
            rngs=nnx.Rngs(0),
        )
        dense.kernel = nnx.Param(w)
        if layer.bias is not None:
            dense.bias = nnx.Param(layer.bias[...])
        setattr(parent, t, dense)
        merged.append(t)
    return merged


def target_of_path(path: Sequence[Any], targets: Sequence[str]) -> int | None:
    """Column of the layer mask that a state leaf (by its path) belongs to, or None.

    A leaf belongs to a target when its path runs through `blocks.attn.<t>` / `blocks.mlp.<t>`.
    Used to map stacked leaves onto the (L, n_targets) mask; it reads names only to place a
    leaf, never to decide what trains (that is the Variable type).
    """
    keys = [getattr(p, "key", getattr(p, "name", p)) for p in path]
    keys = [str(k) for k in keys]
    for i in range(len(keys) - 1):
        if keys[i] in ("attn", "mlp") and keys[i + 1] in targets and "blocks" in keys[:i]:
            return list(targets).index(keys[i + 1])
    return None
