"""Adaptation diagnostics: the bootstrap AUC is DeepfakeBench's AUC, a detector compared with
itself contributes exactly 0 and says so in words, and results.md / the chart show it."""

from __future__ import annotations

import numpy as np

from fmsd_jax.evaluators import adaptation, metrics, plots, result_files


def test_weighted_auc_is_dfb_auc_and_weights_are_multiplicities():
    rng = np.random.default_rng(0)
    p = np.round(rng.random(300), 2)  # many ties
    y = rng.integers(0, 2, 300)
    got = metrics.weighted_auc(p, y, np.ones((1, 300)))[0]
    np.testing.assert_allclose(got, metrics.compute_metrics(p, y)["frame_auc"], rtol=1e-12)
    w = rng.integers(0, 4, 300)
    rep = np.repeat(np.arange(300), w)
    np.testing.assert_allclose(metrics.weighted_auc(p, y, w[None].astype(float))[0],
                               metrics.compute_metrics(p[rep], y[rep])["frame_auc"], rtol=1e-12)


def _video_set(n_videos=40, frames=4, seed=0):
    rng = np.random.default_rng(seed)
    vids = np.repeat([f"v{i}" for i in range(n_videos)], frames)
    y = np.repeat(np.arange(n_videos) % 2, frames)
    base = 0.5 + 0.1 * (y - 0.5) + 0.2 * rng.standard_normal(y.size)
    return np.clip(base, 0.0, 1.0), y, vids


def test_same_detector_contributes_exactly_zero_and_says_so():
    p, y, vids = _video_set()
    c = adaptation.contribution_record(p, p.copy(), y, vids, resamples=200)
    assert c["frame_auc"] == 0.0 and c["video_auc"] == 0.0
    assert c["ci95"] == {"frame_auc": [0.0, 0.0], "video_auc": [0.0, 0.0]}
    assert c["within_noise"] and c["verdict"].startswith(adaptation.NO_ADAPTATION)
    assert (c["unit"], c["num_videos"], c["num_frames"]) == ("video", 40, 160)


def test_clearly_better_backbone_is_outside_noise():
    p, y, vids = _video_set()
    better = np.clip(p + 0.5 * (y - 0.5), 0.0, 1.0)
    c = adaptation.contribution_record(better, p, y, vids, resamples=200)
    lo, hi = c["ci95"]["frame_auc"]
    assert 0 < lo <= c["frame_auc"] <= hi
    assert not c["within_noise"] and "adds" in c["verdict"]
    # A pure-noise difference of the same detector (tiny jitter) stays within noise.
    jitter = np.clip(p + 1e-3 * np.random.default_rng(1).standard_normal(p.size), 0.0, 1.0)
    assert adaptation.contribution_record(jitter, p, y, vids, resamples=200)["within_noise"]


def _diag(contribution):
    rel = [[0.0, 0.02], [0.01, 0.0]]
    return {"regime": "fmsd", "step": 50, "checkpoint": "best", "contribution": contribution,
            "contribution_note": "" if contribution else "no 'val' split: not measured",
            "weight_change": {"targets": ["q", "v"], "relative": rel,
                              "mask": [[False, True], [True, False]], "note": "merged weight"},
            "head_change": 0.45,
            "spectra": [{"layer": 0, "target": "v", "relative_change": 0.02,
                         "before": [3.0, 2.0, 1.0], "after": [3.0, 2.0, 1.1]}],
            "orthogonality": {"within": 0.0, "between": 0.0, "semantic": 0.0}}


def test_results_md_shows_the_contribution_and_the_words(tmp_path):
    p, y, vids = _video_set()
    c = {"split": "val", "datasets": ["SynBlend"],
         **adaptation.contribution_record(p, p, y, vids, resamples=50)}
    row = {k: 0.5 for k in metrics.METRIC_KEYS}
    _, md = result_files.write_results(tmp_path, {"SynBlend": row}, diagnostics=_diag(c))
    text = md.read_text()
    assert "| AUC (frame) | " in text and "+0.0000 | [+0.0000, +0.0000] |" in text
    assert "The backbone did not adapt; the head did the work" in text
    assert "median 0.0150, max 0.0200" in text and "head moved 0.450" in text
    _, md = result_files.write_results(tmp_path, {"SynBlend": row}, diagnostics=_diag(None))
    assert "no 'val' split: not measured" in md.read_text()
    png = plots.plot_adaptation(_diag(c), tmp_path / "adaptation.png")
    assert png.stat().st_size > 10_000


def test_verdict_separates_no_adaptation_from_too_few_videos():
    def verdict(auc, lo, hi):
        return adaptation._verdict({"frame_auc": auc, "ci95": {"frame_auc": [lo, hi]},
                                    "within_noise": lo <= 0 <= hi})

    assert verdict(0.0, -0.01, 0.01).startswith(adaptation.NO_ADAPTATION)
    wide = verdict(0.19, -0.2, 0.7)  # the demo's 8 validation videos
    assert "cannot be told from zero" in wide and adaptation.NO_ADAPTATION not in wide
    assert verdict(0.19, 0.05, 0.3).startswith("the adapted backbone adds")
