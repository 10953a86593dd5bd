"""Forgery-aware layer masking: per-layer gradient bias/variance and layer selection (§1.3).

Which gradient is "the layer gradient" g_l(t)?  By default the gradient of the mini-batch
training loss with respect to the *dense* pretrained weight W_l (in × out) of each candidate
projection, taken on the dense model before decomposition. Reasons:

* It is a property of the layer, not of K and d: the mask is chosen once, then any
  decomposition trains under it (the ablations vary K, d with the mask fixed).
* It is what the backward pass computes anyway: dL/dW_l = Σ_samples xᵀδ is formed once per
  mini-batch from activations and output gradients — never per sample — so one estimator step
  costs one forward + backward plus an elementwise moment update (bench/decomposed_step.py,
  row "mask estimator"). Frozen parameters (MLPs, norms, embeddings, head) are not
  differentiated.
* The artifact-factor gradient is the projection of dL/dW onto the K·d weakest singular
  directions: a small, noise-dominated slice at the pretrained point.

The estimator is generic over *what* is differentiated — the gradient is taken w.r.t. whatever
`trainable_state` holds, and each leaf is assigned to a (layer, target) cell by its path — so
the same function scores artifact factors of a decomposed model (split with
`trainable_filter('fmsd')` and a head-free filter) for re-estimation during training
(FMSD v1's dynamic masking). `candidate_split` builds the default dense split.

Moments accumulate on device with Welford's update (no fp32 cancellation between E‖g‖² and
‖ḡ‖² when a layer's gradient is consistent): per element, mean and M2 are carried across T
batches in one jitted step per batch (donated; on a mesh, placed like the candidate weights,
which a run splits over fsdp as in training) and reduced to (L, n_targets) cells only at the
end; one host transfer in total.

Definitions (DESIGN.md §1.3), per cell c with element set E_c and ḡ = mean_t g(t):
    bias_c     = Σ_{e∈E_c} ḡ_e²                       = ‖ḡ_c‖²
    variance_c = Σ_{e∈E_c} mean_t (g_e(t) − ḡ_e)²     = mean_t ‖g_c(t) − ḡ_c‖²   (1/T)
    score_c    = bias_c / (variance_c + eps)          ('bias_variance')
    gsnr_c     = mean_{e∈E_c} ḡ_e² / (var_e + eps)    ('gsnr', per-element average)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fmsd_jax.method.decompose import target_of_path
from fmsd_jax.model.vit import ATTN_PROJECTIONS
from fmsd_jax.parallel import on_mesh

SCORES = ("bias_variance", "gsnr")


def candidate_filter(targets: Sequence[str] = ATTN_PROJECTIONS) -> Callable[..., bool]:
    """nnx filter: the stacked dense kernels of the candidate projections."""
    targets = tuple(targets)

    def filt(path: tuple[Any, ...], x: Any) -> bool:
        return (
            isinstance(x, nnx.Param)
            and bool(path)
            and str(path[-1]) == "kernel"
            and target_of_path(path, targets) is not None
        )

    return filt


def candidate_split(
    model: nnx.Module, targets: Sequence[str] = ATTN_PROJECTIONS
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, candidate kernels, everything else) of a dense model, for the estimator."""
    return nnx.split(model, candidate_filter(targets), ...)


def _cell_columns(state: nnx.State, targets: Sequence[str]) -> list[int]:
    cols = []
    for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]:
        col = target_of_path(path, targets)
        if col is None:
            raise ValueError(
                f"state leaf {jax.tree_util.keystr(path)} is not inside a candidate "
                f"projection {tuple(targets)}; split the model with "
                "candidate_split() or a filter that selects only those"
            )
        cols.append(col)
    return cols


Moments = tuple[jax.Array, Any, Any]  # (count, per-element mean, per-element M2)


def init_moments(state: nnx.State) -> Moments:
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state)
    return jnp.zeros((), jnp.float32), zeros, jax.tree.map(jnp.copy, zeros)


@functools.lru_cache(maxsize=16)
def make_moment_update(
    graphdef: nnx.GraphDef, loss_fn: Callable[..., tuple[jax.Array, Any]]
) -> Callable[[Moments, nnx.State, nnx.State, Any], Moments]:
    """The per-batch estimator step (un-jitted): one gradient + a Welford update.

    Cached per (graphdef, loss_fn), so estimating again on the same model structure (other
    seeds, `--mode mask`'s stability replicates) reuses jit's compiled step.
    """

    def grad_of(params, frozen, batch):
        def loss_of(p):
            return loss_fn(nnx.merge(graphdef, p, frozen), batch)[0]

        return jax.grad(loss_of)(params)

    def update(acc, params, frozen, batch):
        count, mean, m2 = acc
        g = grad_of(params, frozen, batch)
        n = count + 1.0
        delta = jax.tree.map(lambda g_, m_: g_.astype(jnp.float32) - m_, g, mean)
        mean = jax.tree.map(lambda m_, d_: m_ + d_ / n, mean, delta)
        m2 = jax.tree.map(
            lambda s_, d_, g_, m_: s_ + d_ * (g_.astype(jnp.float32) - m_), m2, delta, g, mean
        )
        return n, mean, m2

    return update


Placement = tuple[Any, Any, Any]  # shardings of (candidates, everything else, batch)


def default_placement(
    mesh: Mesh, candidates: nnx.State, rest: nnx.State, data_axis: str = "data"
) -> Placement:
    """Parameters replicated and the batch split over `data_axis` (a run passes its own)."""
    repl = NamedSharding(mesh, P())
    return (jax.tree.map(lambda _: repl, candidates), jax.tree.map(lambda _: repl, rest),
            NamedSharding(mesh, P(data_axis)))


def moment_shardings(mesh: Mesh, placement: Placement) -> Any:
    """The moments (count, mean, M2) live like the candidates they accumulate."""
    cand = placement[0]
    return NamedSharding(mesh, P()), cand, cand


def jit_moment_update(
    graphdef: nnx.GraphDef,
    loss_fn: Callable[..., tuple[jax.Array, Any]],
    mesh: Mesh | None = None,
    placement: Placement | None = None,
) -> Callable[[Moments, nnx.State, nnx.State, Any], Moments]:
    """The jitted estimator step exactly as `estimate_layer_scores` runs it (the planner
    compiles this same function for a TPU slice): moments donated; with a mesh, arguments
    placed by `placement` (the run's shardings; see `default_placement`) and the step traced
    on the mesh, so that fsdp-split weights are gathered per layer as in the train step."""
    if mesh is not None and placement is None:  # the candidates' shapes are unknown here
        raise TypeError("jit_moment_update: a mesh needs its placement "
                        "(masking.default_placement or the run's)")
    leaves, treedef = jax.tree.flatten(placement)  # shardings hash; their containers do not
    return _jitted_moment_update(graphdef, loss_fn, mesh, treedef, tuple(leaves))


@functools.lru_cache(maxsize=16)
def _jitted_moment_update(graphdef, loss_fn, mesh, placement_def, placement_leaves):
    """One jitted step per (structure, loss, mesh, placement): a new jax.jit of a new on_mesh
    closure per call retraced and recompiled it for every stability seed."""
    update = make_moment_update(graphdef, loss_fn)
    if mesh is None:
        return jax.jit(update, donate_argnums=0)
    placement = jax.tree.unflatten(placement_def, placement_leaves)
    cand, rest, batch = placement
    acc = moment_shardings(mesh, placement)
    return jax.jit(on_mesh(update, mesh), in_shardings=(acc, cand, rest, batch),
                   out_shardings=acc, donate_argnums=0)


def estimate_layer_scores(
    graphdef: nnx.GraphDef,
    trainable_state: nnx.State,
    frozen_state: nnx.State,
    batches: Iterable[Mapping[str, Any]],
    *,
    loss_fn: Callable[..., tuple[jax.Array, Any]],
    targets: Sequence[str] = ATTN_PROJECTIONS,
    eps: float = 1e-12,
    score: str = "bias_variance",
    num_batches: int | None = None,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    placement: Placement | None = None,
) -> dict[str, np.ndarray]:
    """Gradient bias, variance and score of every (layer, target) cell over T batches.

    `trainable_state` holds the leaves to differentiate (stacked, leading axis L); `loss_fn`
    is the training objective, loss_fn(model, batch) -> (loss, aux). With `mesh`, arguments
    are placed by `placement` (a run passes its own shardings; default: batches split over
    `data_axis`, parameters and moments replicated); the mini-batch gradient (a mean over the
    global batch) is the same as on one device. Returns numpy arrays
    bias, variance, gsnr, score of shape (L, len(targets)) and the batch count T.
    """
    if score not in SCORES:
        raise ValueError(f"unknown layer score {score!r}; use one of {SCORES}")
    targets = tuple(targets)
    cols = _cell_columns(trainable_state, targets)
    leaves0 = jax.tree.leaves(trainable_state)
    num_layers = {x.shape[0] for x in leaves0}
    if len(num_layers) != 1:
        raise ValueError(f"candidate leaves disagree on the stacked layer axis: {num_layers}")
    (L,) = num_layers

    data = None
    if mesh is not None and placement is None:
        placement = default_placement(mesh, trainable_state, frozen_state, data_axis)
    step = jit_moment_update(graphdef, loss_fn, mesh, placement)
    acc = init_moments(trainable_state)
    if mesh is not None:
        acc = jax.device_put(acc, moment_shardings(mesh, placement))
        trainable_state = jax.device_put(trainable_state, placement[0])
        frozen_state = jax.device_put(frozen_state, placement[1])
        data = placement[2]

    t = 0
    for batch in batches:
        if num_batches is not None and t >= num_batches:
            break
        if data is not None:
            batch = jax.device_put(dict(batch), data)
        acc = step(acc, trainable_state, frozen_state, batch)
        t += 1
    if t == 0:
        raise ValueError("estimate_layer_scores got no batches; give T >= 2 mini-batches")

    bias, var, gsnr = jax.device_get(_reduce_moments(acc, tuple(cols), L,
                                                     len(targets), float(eps)))
    bias, var, gsnr = (np.asarray(a, np.float64) for a in (bias, var, gsnr))
    bv = bias / (var + eps)
    return dict(
        bias=bias,
        variance=var,
        gsnr=gsnr,
        score=bv if score == "bias_variance" else gsnr,
        num_batches=np.asarray(t),
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _reduce_moments(acc: Moments, cols: tuple, num_layers: int, num_targets: int, eps: float):
    """Per-cell bias ‖ḡ‖², variance and mean per-element GSNR from the accumulated moments; a
    module-level jit (static cell layout), so a second estimate does not compile it again."""
    count, mean, m2 = acc
    bias = jnp.zeros((num_layers, num_targets), jnp.float32)
    var = jnp.zeros_like(bias)
    gsnr_sum = jnp.zeros_like(bias)
    size = jnp.zeros_like(bias)
    for col, mu, s2 in zip(cols, jax.tree.leaves(mean), jax.tree.leaves(m2), strict=True):
        axes = tuple(range(1, mu.ndim))
        v_el = s2 / count
        bias = bias.at[:, col].add(jnp.sum(mu**2, axis=axes))
        var = var.at[:, col].add(jnp.sum(v_el, axis=axes))
        gsnr_sum = gsnr_sum.at[:, col].add(jnp.sum(mu**2 / (v_el + eps), axis=axes))
        size = size.at[:, col].add(float(np.prod(mu.shape[1:])))
    return bias, var, gsnr_sum / jnp.maximum(size, 1.0)


def select_layers(
    scores: Mapping[str, np.ndarray] | np.ndarray,
    *,
    top_k: int | None = None,
    threshold: float | None = None,
) -> np.ndarray:
    """Boolean (L, n_targets) mask: the top-k cells over all (layer, target) pairs, or the cells
    whose min-max-normalised score is >= threshold (Auto-SNR style). Exactly one of the two.
    """
    s = np.asarray(scores["score"] if isinstance(scores, Mapping) else scores, np.float64)
    if (top_k is None) == (threshold is None):
        raise ValueError("give exactly one of top_k or threshold to select_layers")
    if not np.all(np.isfinite(s)):
        raise ValueError("layer scores contain NaN/inf; check the loss on the scoring batches")
    mask = np.zeros(s.shape, bool)
    if top_k is not None:
        if not 1 <= top_k <= s.size:
            raise ValueError(f"top_k={top_k} must be in [1, {s.size}] (layers × targets)")
        # stable: ties go to the earlier layer/target
        order = np.argsort(-s.ravel(), kind="stable")[:top_k]
        mask.ravel()[order] = True
        return mask
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must be in [0, 1] (scores are min-max normed)")
    lo, hi = s.min(), s.max()
    norm = (s - lo) / (hi - lo) if hi > lo else np.ones_like(s)
    return norm >= threshold


def mask_report(
    scores: Mapping[str, np.ndarray], mask: np.ndarray, targets: Sequence[str]
) -> dict[str, Any]:
    """JSON-serialisable record of the selection, saved beside the checkpoint (DESIGN.md §1.3):
    the mask and every score array as nested lists, rows = layers, columns = `targets`."""
    out: dict[str, Any] = {"targets": list(targets), "mask": np.asarray(mask).astype(bool).tolist()}
    for k, v in scores.items():
        v = np.asarray(v)
        out[k] = v.tolist() if v.ndim else v.item()
    return out
