"""Did the backbone adapt, and did it matter? Diagnostics written at the end of every run.

A detector whose backbone barely moves is a linear probe in disguise (issue 11: at Effort's lr
for 200 steps the merged weights moved by 1e-3 of their norm and FMSD, Effort and the linear
probe agreed to three decimals). So every training run measures, once, after the loop, on the
checkpoint that evaluation uses (best on validation, else the latest):

* **the backbone's contribution**: validation AUC of the trained detector minus the validation
  AUC of the *pretrained* backbone carrying the *trained* head, on the split that selects
  checkpoints (`eval.splits_from_train` of the training datasets). Noise is a paired bootstrap
  over validation videos (`diagnostics.bootstrap` resamples, fixed seed): videos are drawn with
  replacement, both detectors are scored on the same draw, and the 95 % percentile interval of
  the difference is reported. When that interval contains 0 and the estimate is under
  NEGLIGIBLE_AUC, the log and results.md say "the backbone did not adapt; the head did the
  work"; a larger estimate whose interval contains 0 is reported as too uncertain to tell.
  A linear probe's backbone is frozen by construction: its contribution is 0 without scoring
  twice, and the files say so. Note what the number is: the trained head was fitted to the
  adapted features, so a positive contribution can include the head's mismatch with the
  pretrained features.
* **how far each adapted layer moved**: ‖W − W₀‖/‖W₀‖ of the merged weight of every candidate
  (layer, projection) cell (decomposed regimes: from the factor changes, exactly 0 for a cell
  the mask left out; full fine-tuning: the dense kernel; linear probe: zeros, not measured).
* **the singular spectrum before and after** of the `diagnostics.spectra` adapted cells that
  moved most (one SVD each, never all layers), and the head's relative change.
* **the orthogonality residuals** of the artifact bases (the three parts of L_orth; decomposed
  regimes only).

Cost: one extra validation pass (the pretrained-backbone detector), a few small SVDs and
Gram products; nothing per step. The pretrained weights come from the run itself for the
decomposed regimes (the frozen initial factors U₀, s₀, V₀); full fine-tuning reloads
`model.init_from` once.

Files, beside results.json (process 0 writes them):

    diagnostics.json
      regime: str                   method.regime of the run
      step, checkpoint: int, str    which checkpoint was measured ('best' | 'latest')
      contribution: null | {        null: no validation split (reason in 'contribution_note')
        split, datasets, num_frames, num_videos,
        frame_auc, video_auc: float           trained minus pretrained-backbone (Δ AUC)
        trained, pretrained_backbone: {frame_auc, video_auc}
        ci95: {frame_auc: [lo, hi], video_auc: [lo, hi]}   paired bootstrap over videos
        resamples: int, unit: 'video' | 'frame'
        within_noise: bool          the frame-level interval contains 0
        verdict: str                one sentence; NO_ADAPTATION when within noise and negligible
      }
      contribution_note: str        why contribution is null, or a remark (linear probe)
      weight_change: {targets, relative: L×T list, mask: L×T list of bool, note}
      head_change: float            ‖head − head₀‖/‖head₀‖ (kernel and bias together)
      spectra: [{layer, target, relative_change, before: [...], after: [...]}]
      orthogonality: null | {within, between, semantic}
    adaptation.png                  relative change per cell, spectra, Δ singular values
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from fmsd_jax import atomic, parallel
from fmsd_jax.data import pipeline
from fmsd_jax.evaluators import metrics, plots, result_files, scoring
from fmsd_jax.evaluators.metrics import paired_bootstrap, weighted_auc
from fmsd_jax.method import decompose as decomp
from fmsd_jax.method.losses import orthogonality_terms, weight_change_of
from fmsd_jax.model.detector import HeadParam
from fmsd_jax.model.vit import ATTN_PROJECTIONS
from fmsd_jax.run import factory, rebuild
from fmsd_jax.run.workdir_files import ADAPTATION_PNG, DIAGNOSTICS_JSON

log = logging.getLogger("fmsd_jax")
NO_ADAPTATION = "the backbone did not adapt; the head did the work"
# A contribution this small is "no adaptation" even where the interval is narrow enough to tell;
# a larger one whose interval still contains 0 is "too few validation videos to tell".
NEGLIGIBLE_AUC = 0.01


# ---------------------------------------------------------------------------------------------
# The pretrained reference


def head_snapshot(trainable: nnx.State) -> nnx.State:
    """Device copies of the head's leaves: the step donates the trainable state's buffers."""
    return jax.tree.map(jnp.copy, nnx.filter_state(trainable, HeadParam))


def pretrained_params(cfg: mlc.ConfigDict, run: rebuild.Run) -> nnx.State | None:
    """The pretrained dense backbone of a full fine-tuning run (None for other regimes, whose
    pretrained weights are already in the run: U₀, s₀, V₀, or a frozen backbone)."""
    if cfg.method.regime != "full":
        return None
    det = factory.build_detector(cfg)
    params = nnx.state(det, nnx.All(nnx.Param, nnx.Not(HeadParam)))
    return parallel.shard_tree(run.mesh, params)


def pretrained_backbone(run: rebuild.Run, trainable: nnx.State,
                        params: nnx.State | None = None) -> nnx.State:
    """`trainable` with every backbone leaf back at its pretrained value and the head kept.

    Decomposed layers get their initial factors U₀, s₀, V₀ back (the pretrained weight to one
    fp32 rounding, the exact start of training); `params` (full fine-tuning) overwrite the
    dense backbone. `trainable` itself is left untouched.
    """
    model = nnx.merge(run.graphdef, jax.tree.map(lambda x: x, trainable), run.frozen)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, decomp.DecomposedDense):
            m.u[...], m.s[...], m.v[...] = m.u0[...], m.s0[...], m.v0[...]
    if params is not None:
        nnx.update(model, params)
    ref = nnx.state(model, nnx.Any(*_trainable_types(trainable)))
    return jax.tree.map(lambda r, t: r, ref, trainable)  # same tree as `trainable`


def _trainable_types(trainable: nnx.State) -> set[type]:
    types = set()
    jax.tree.map(lambda v: types.add(type(v)), trainable,
                 is_leaf=lambda x: isinstance(x, nnx.Variable))
    return types


def contribution_record(trained: np.ndarray, pretrained: np.ndarray, labels: np.ndarray,
                        video_ids: np.ndarray | None, *, resamples: int, seed: int = 0) -> dict:
    """Δ AUC (trained − pretrained backbone) at frame and video level with 95 % intervals."""
    if video_ids is None:
        vids, unit = np.arange(len(labels)), "frame"
    else:
        vids, unit = np.asarray(video_ids), "video"
    _, groups = np.unique(vids.astype(str), return_inverse=True)
    out: dict[str, Any] = {"num_frames": int(len(labels)), "num_videos": int(groups.max() + 1),
                           "resamples": int(resamples), "unit": unit, "trained": {},
                           "pretrained_backbone": {}, "ci95": {}}
    levels = {"frame_auc": (trained, pretrained, labels, groups)}
    if video_ids is not None:
        vt, vy, _ = metrics.aggregate_by_video(trained, labels, vids)
        vp, _, _ = metrics.aggregate_by_video(pretrained, labels, vids)
        levels["video_auc"] = (vt, vp, vy, np.arange(len(vy)))
    for key, (pa, pb, y, g) in levels.items():
        ones = np.ones((1, len(y)))
        auc_a, auc_b = float(weighted_auc(pa, y, ones)[0]), float(weighted_auc(pb, y, ones)[0])
        out["trained"][key], out["pretrained_backbone"][key] = auc_a, auc_b
        out[key] = auc_a - auc_b
        diffs = paired_bootstrap(pa, pb, y, g, resamples=resamples, seed=seed)
        diffs = diffs[np.isfinite(diffs)]
        out["ci95"][key] = ([float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]
                            if diffs.size else [math.nan, math.nan])
    lo, hi = out["ci95"]["frame_auc"]
    out["within_noise"] = bool(not (lo > 0 or hi < 0))
    out["verdict"] = _verdict(out)
    return out


def _verdict(c: dict) -> str:
    lo, hi = c["ci95"]["frame_auc"]
    span = f"frame AUC {c['frame_auc']:+.4f}, 95% interval [{lo:+.4f}, {hi:+.4f}]"
    if c["within_noise"] and abs(c["frame_auc"]) <= NEGLIGIBLE_AUC:
        return f"{NO_ADAPTATION} ({span}: within noise of zero)"
    if c["within_noise"]:
        return (f"the backbone's contribution cannot be told from zero on this validation split "
                f"({span}, which contains 0; more validation videos would narrow it)")
    if c["frame_auc"] > 0:
        return f"the adapted backbone adds to the head ({span})"
    return f"the adapted backbone is worse than the pretrained one under the same head ({span})"


def backbone_contribution(cfg: mlc.ConfigDict, run: rebuild.Run, trainable: nnx.State,
                          reference: nnx.State) -> tuple[dict | None, str]:
    """(record, note): the contribution on the checkpoint-selection split, or None and why."""
    split = cfg.eval.splits_from_train
    names = [n for n in cfg.data.train_dataset if pipeline.has_split(cfg.data, n, split)]
    if not names:
        return None, f"no {split!r} split in {tuple(cfg.data.train_dataset)}: not measured"
    predict = scoring.make_predict_fn(run.graphdef, run.mesh)
    parts: dict[str, list[np.ndarray]] = {"a": [], "b": [], "y": [], "v": []}
    for name in names:
        acc = scoring.score_split(cfg, run, trainable, name, split, predict)
        ref = scoring.score_split(cfg, run, reference, name, split, predict)
        (pa, y), (pb, _) = acc.arrays(), ref.arrays()
        vids = acc.video_ids()
        parts["a"].append(pa)
        parts["b"].append(pb)
        parts["y"].append(y)
        parts["v"].append(np.asarray([f"{name}/{v}" for v in vids], dtype=object)
                          if vids is not None else np.arange(len(y)).astype(str))
    y = np.concatenate(parts["y"])
    if np.unique(y >= 1).size < 2:
        return None, f"the {split!r} split holds a single class: AUC undefined, not measured"
    rec = contribution_record(np.concatenate(parts["a"]), np.concatenate(parts["b"]), y,
                              np.concatenate(parts["v"]), resamples=cfg.diagnostics.bootstrap,
                              seed=cfg.seed)
    return {"split": split, "datasets": names, **rec}, ""


# ---------------------------------------------------------------------------------------------
# Weight movement, spectra, orthogonality


def _kernels(model: nnx.Module, targets: tuple[str, ...]) -> dict[str, Any]:
    blocks = model.backbone.transformer.blocks
    return {t: getattr(blocks.attn if t in ATTN_PROJECTIONS else blocks.mlp, t) for t in targets}


def _weights(model: nnx.Module, ref: nnx.Module, target: str) -> tuple[jax.Array, jax.Array]:
    """(current, pretrained) stacked weight of one candidate projection."""
    layer = _kernels(model, (target,))[target]
    if isinstance(layer, decomp.DecomposedDense):
        a0 = jnp.einsum("...ir,...r,...or->...io", layer.u0[...], layer.s0[...], layer.v0[...],
                        precision=jax.lax.Precision.HIGHEST)
        return layer.merged_weight(), layer.semantic[...] + a0
    return layer.kernel[...], _kernels(ref, (target,))[target].kernel[...]


def measure(run: rebuild.Run, targets: tuple[str, ...], trainable: nnx.State,
            reference: nnx.State, head0: nnx.State, *, num_spectra: int) -> dict:
    """Relative weight change per cell, head change, spectra, orthogonality; no files."""
    repl = parallel.replicated(run.mesh)
    decomposed = any(isinstance(v, decomp.ArtifactFactor) for v in
                     jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(x, nnx.Variable)))

    def cells(trainable, reference, frozen, head0):
        model = nnx.merge(run.graphdef, trainable, frozen)
        ref = nnx.merge(run.graphdef, reference, frozen)
        rel = []
        for t, layer in _kernels(model, targets).items():
            if isinstance(layer, decomp.DecomposedDense):
                d2, w2 = weight_change_of(layer)
            else:
                w0 = _kernels(ref, (t,))[t].kernel[...]
                d2 = jnp.sum((layer.kernel[...] - w0) ** 2, axis=(-2, -1))
                w2 = jnp.sum(w0**2, axis=(-2, -1))
            rel.append(jnp.sqrt(d2 / w2))
        head = nnx.filter_state(trainable, HeadParam)
        num = sum(jnp.sum((a - b) ** 2) for a, b in
                  zip(jax.tree.leaves(head), jax.tree.leaves(head0), strict=True))
        den = sum(jnp.sum(b**2) for b in jax.tree.leaves(head0))
        orth = orthogonality_terms(model) if decomposed else {}
        return jnp.stack(rel, axis=-1), jnp.sqrt(num / den), orth

    rel, head, orth = jax.device_get(jax.jit(cells, out_shardings=repl)(
        trainable, reference, run.frozen, head0))
    rel = np.asarray(rel, np.float64)
    mask = np.asarray(run.mask, bool) & (rel > 0)
    order = np.argsort(-np.where(mask, rel, -1).ravel(), kind="stable")[:num_spectra]
    picks = tuple((int(i // rel.shape[1]), int(i % rel.shape[1])) for i in order
                  if mask.ravel()[i])

    def spectra(trainable, reference, frozen):
        model = nnx.merge(run.graphdef, trainable, frozen)
        ref = nnx.merge(run.graphdef, reference, frozen)
        out = []
        for li, ti in picks:
            w, w0 = _weights(model, ref, targets[ti])
            out.append((jnp.linalg.svd(w0[li].astype(jnp.float32), compute_uv=False),
                        jnp.linalg.svd(w[li].astype(jnp.float32), compute_uv=False)))
        return out

    svals = jax.device_get(jax.jit(spectra, out_shardings=repl)(
        trainable, reference, run.frozen)) if picks else []
    return {
        "relative": rel,
        "head_change": float(head),
        "spectra": [{"layer": li, "target": targets[ti], "relative_change": float(rel[li, ti]),
                     "before": np.asarray(b, float).tolist(),
                     "after": np.asarray(a, float).tolist()}
                    for (li, ti), (b, a) in zip(picks, svals, strict=True)],
        "orthogonality": {k: float(v) for k, v in orth.items()} if orth else None,
    }


# ---------------------------------------------------------------------------------------------
# The run-level entry point


def run_diagnostics(cfg: mlc.ConfigDict, workdir: Path, run: rebuild.Run, trainable: nnx.State,
                    head0: nnx.State, *, step: int | None = None,
                    checkpoint: str = "") -> dict:
    """Measure, log, and (process 0) write diagnostics.json and adaptation.png."""
    regime = cfg.method.regime
    targets = tuple(cfg.method.targets)
    params = pretrained_params(cfg, run)
    reference = pretrained_backbone(run, trainable, params)
    if regime == "linear_probe":
        contribution, note = None, ("linear probe: the backbone is frozen by construction, so "
                                    "its contribution is 0; not measured")
    else:
        contribution, note = backbone_contribution(cfg, run, trainable, reference)
    measured = measure(run, targets, trainable, reference, head0,
                       num_spectra=cfg.diagnostics.spectra)
    rel = measured.pop("relative")
    wc_note = {"linear_probe": "linear probe: the backbone is frozen; zeros by construction",
               "full": "full fine-tuning: every parameter trains; shown are the candidate "
                       "projections' kernels"}.get(regime, "merged weight W_s + Σ U_k s_k V_kᵀ "
                                                           "against the pretrained one")
    record = {
        "regime": regime, "step": step, "checkpoint": checkpoint,
        "contribution": contribution, "contribution_note": note,
        "weight_change": {"targets": list(targets), "relative": rel.tolist(),
                          "mask": np.asarray(run.mask, bool).tolist(), "note": wc_note},
        **measured,
    }
    _log(record)
    if jax.process_index() == 0:
        atomic.write_json(workdir / DIAGNOSTICS_JSON, record)
        plots.plot_adaptation(record, workdir / ADAPTATION_PNG,
                              title="Backbone adaptation: "
                                    + result_files.run_title(regime, workdir))
    return record


def _log(record: dict) -> None:
    rel = np.asarray(record["weight_change"]["relative"])
    mask = np.asarray(record["weight_change"]["mask"], bool)
    moved = rel[mask] if mask.any() else rel.ravel()
    log.info("adaptation: adapted layers moved ‖W−W₀‖/‖W₀‖ median %.3g, max %.3g (%d cells); "
             "head moved %.3g", float(np.median(moved)) if moved.size else 0.0,
             float(moved.max()) if moved.size else 0.0, int(mask.sum()), record["head_change"])
    c = record["contribution"]
    if c is None:
        log.info("backbone contribution: %s", record["contribution_note"])
    else:
        log.info("backbone contribution on %s: %s (video AUC %+.4f)", c["split"], c["verdict"],
                 c["video_auc"])


def read(workdir: str | Path) -> dict | None:
    path = Path(workdir) / DIAGNOSTICS_JSON
    return atomic.read_json(path) if path.is_file() else None
