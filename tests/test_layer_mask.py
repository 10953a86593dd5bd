"""Run-level layer masking: the estimator scores with the warmed head (not the random one), the
detector that training continues from keeps its fresh head, and the stability numbers."""

from __future__ import annotations

import json

import numpy as np
from conftest import counting_compiles, make_cfg
from flax import nnx

from fmsd_jax import parallel
from fmsd_jax.method import masking
from fmsd_jax.run import factory, layer_selection


def test_estimator_scores_with_the_warmed_head(monkeypatch, tmp_path, tiny_clip_checkpoint,
                                               tiny_benchmark):
    cfg = make_cfg(tiny_clip_checkpoint, tiny_benchmark, **{"method.mask.warmup_steps": "3"})
    mesh = parallel.make_mesh(cfg.mesh)
    det = factory.build_detector(cfg)
    fresh = np.asarray(det.head_kernel[...]).copy()
    warmed, record = layer_selection.warm_head(cfg, det, mesh, seed=cfg.seed)
    warmed = np.asarray(warmed["head_kernel"][...])
    assert record["kind"] == "warmed" and not record["continues_into_training"]
    assert not np.allclose(warmed, fresh)

    seen = []
    real = masking.estimate_layer_scores

    def spy(graphdef, candidates, rest, *args, **kwargs):
        seen.append(np.asarray(nnx.merge(graphdef, candidates, rest).head_kernel[...]))
        return real(graphdef, candidates, rest, *args, **kwargs)

    monkeypatch.setattr(masking, "estimate_layer_scores", spy)
    layer_selection.estimate_mask(cfg, det, tmp_path, mesh)
    np.testing.assert_array_equal(seen[-1], warmed)  # the estimator's head is the warmed head
    np.testing.assert_array_equal(np.asarray(det.head_kernel[...]), fresh)  # training's is not
    saved = json.loads((tmp_path / "layer_mask.json").read_text())
    assert saved["head"]["kind"] == "warmed" and saved["head"]["warmup_steps"] == 3
    assert saved["stability"] is None  # training measures replicate 0 only

    cfg0 = make_cfg(tiny_clip_checkpoint, tiny_benchmark, **{"method.mask.warmup_steps": "0"})
    layer_selection.estimate_mask(cfg0, det, tmp_path, mesh)
    np.testing.assert_array_equal(seen[-1], fresh)
    assert json.loads((tmp_path / "layer_mask.json").read_text())["head"]["kind"] == "random"


def test_stability_numbers():
    a = np.arange(8.0).reshape(2, 4)
    masks = [a >= 6, a >= 6, a < 2]
    st = layer_selection.stability([0, 1, 2], [a, a * 3.0, -a], masks)
    np.testing.assert_allclose(st["spearman"], [[1, 1, -1], [1, 1, -1], [-1, -1, 1]])
    np.testing.assert_allclose(st["overlap"], [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    assert st["min_spearman"] == -1.0
    np.testing.assert_allclose(st["mean_spearman"], -1 / 3)
    np.testing.assert_allclose(st["mean_overlap"], 1 / 3)


def test_the_estimator_compiles_once_for_every_stability_seed(tmp_path, tiny_clip_checkpoint,
                                                              tiny_benchmark, monkeypatch):
    """--mode mask repeats the estimate per head/data seed: the first replicate compiles the
    warm-up and estimator steps, the others reuse them (each built new ones)."""
    cfg = make_cfg(tiny_clip_checkpoint, tiny_benchmark, **{"method.mask.warmup_steps": "2"})
    mesh = parallel.make_mesh(cfg.mesh)
    calls: list[int] = []
    monkeypatch.setattr(layer_selection, "layer_scores",
                        counting_compiles(layer_selection.layer_scores, calls))
    layer_selection.estimate_mask(cfg, factory.build_detector(cfg), tmp_path, mesh,
                                  stability_seeds=3)
    assert len(calls) == 3 and calls[0] >= 2  # the warm-up and the estimator step at least
    assert calls[1:] == [0, 0], calls
