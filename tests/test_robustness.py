"""`--mode robustness`: the plan's checks, the output schema and tables from known numbers,
and one end-to-end run on the tiny fixture (a subset of levels)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import draw, make_cfg, too_small

from fmsd_jax.data import perturbations as pt
from fmsd_jax.data import pipeline
from fmsd_jax.evaluators import robustness_report
from fmsd_jax.modes import robustness, train


def fake_scores(cfg, datasets=("A",)):
    """Per-evaluation metric dicts with AUCs that encode (type index, level)."""
    items = robustness.perturbation_grid(cfg)
    keys = list(dict.fromkeys(p.key for p in items))
    clean = {d: {"frame_auc": 0.9, "video_auc": 0.95, "num_frames": 10, "num_videos": 2}
             for d in datasets}
    scores = {d: {(p.key, p.level): {"frame_auc": 0.8 - 0.1 * keys.index(p.key) - 0.01 * p.level,
                                     "video_auc": math.nan if p.key == keys[-1] else 0.7,
                                     "mean_abs_prob_change": 0.01 * p.level}
                  for p in items} for d in datasets}
    return clean, scores


@pytest.fixture()
def cfg(tiny_clip_checkpoint, tiny_benchmark):
    c = make_cfg(tiny_clip_checkpoint, tiny_benchmark, **{"method.regime": "effort"})
    c.robustness.types = ("CS", "GB", "VC")
    c.robustness.levels = (1, 5)
    return c


def test_plan_checks_the_config_before_any_work(cfg):
    assert [(p.key, p.level) for p in robustness.perturbation_grid(cfg)] == [
        ("CS", 1), ("CS", 5), ("GB", 1), ("GB", 5), ("VC", 1), ("VC", 5)]
    cfg.robustness.types = ("CS", "XX")
    with pytest.raises(ValueError, match=r"config.robustness.types: \['XX'\]"):
        robustness.perturbation_grid(cfg)
    cfg.robustness.types = ("RS",)
    with pytest.raises(ValueError, match="RS"):  # a GenD type under the DeeperForensics protocol
        robustness.perturbation_grid(cfg)
    cfg.robustness.protocol = "gend"
    cfg.robustness.levels = (4,)
    with pytest.raises(ValueError, match=r"levels: \[4\] out of range for type 'RS'.*1\.\.3"):
        robustness.perturbation_grid(cfg)
    cfg.robustness.protocol = "lipforensics"
    with pytest.raises(ValueError, match="config.robustness.protocol"):
        robustness.perturbation_grid(cfg)
    cfg.robustness.protocol = "deeperforensics"
    cfg.robustness.types = ()
    cfg.robustness.levels = ()
    assert len(robustness.perturbation_grid(cfg)) == 35  # 7 types x 5 levels


def test_an_unknown_dataset_fails_before_the_model_is_built(cfg, tmp_path):
    cfg.robustness.datasets = ("SynBlend", "Nope")
    with pytest.raises(FileNotFoundError, match="'Nope' not found"):
        robustness.robustness(cfg, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written, no checkpoint looked for


def test_schema_means_and_flags_from_known_numbers(cfg, tmp_path):
    clean, scores = fake_scores(cfg)
    result = robustness.summarise(cfg, clean, scores)
    assert set(result) >= {"protocol", "settings", "where_applied", "types", "datasets"}
    assert result["settings"] == {"protocol": "deeperforensics", "types": ["CS", "GB", "VC"],
                                  "levels": [1, 5], "seed": 0,
                                  "datasets": ["SynBlend", "SynUpsample"]}
    a = result["datasets"]["A"]
    assert a["clean"] == {"frame_auc": 0.9, "video_auc": 0.95, "num_frames": 10, "num_videos": 2}
    cs = a["types"]["CS"]
    assert cs["levels"]["1"] == {"frame_auc": 0.79, "video_auc": 0.7,
                                 "mean_abs_prob_change": 0.01}
    assert cs["mean"]["frame_auc"] == pytest.approx((0.79 + 0.75) / 2)
    # VC's video AUC is undefined: null in JSON, and the overall mean is over the defined ones.
    assert a["types"]["VC"]["mean"]["video_auc"] is None
    assert a["mean"]["video_auc"] == pytest.approx(0.7)
    means = [a["types"][k]["mean"]["frame_auc"] for k in ("CS", "GB", "VC")]
    assert a["mean"]["frame_auc"] == pytest.approx(np.mean(means))
    # GB level 1 (kernel 7) lies inside the training blur (3-7): flagged, still counted.
    assert result["types"]["GB"]["levels"]["1"]["seen_in_training"] is True
    assert result["types"]["GB"]["levels"]["5"]["seen_in_training"] is False
    json.dumps(result, allow_nan=False)

    js, md, png = robustness_report.write_outputs(tmp_path, result)
    assert json.loads(js.read_text())["datasets"]["A"]["mean"] == a["mean"]
    text = md.read_text()
    frame = text[text.index("### Frame AUC"):text.index("### Video AUC")]
    video = text[text.index("### Video AUC"):text.index("### Mean |Δ p(fake)|")]
    assert "0.7900" in frame and "0.7900" not in video  # frame and video never share a table
    assert "0.7000" in video and "0.7000" not in frame
    assert "| GB (Gaussian blur) | 0.9000 | 0.6900 * | 0.6500 |" in frame
    assert "before* the face crop" in text and "stored face crops" in text
    assert png.stat().st_size > 10_000


def test_chart_names_the_method_and_the_types_and_nothing_collides(cfg):
    cfg.robustness.types = ()  # all seven DeeperForensics types
    cfg.robustness.levels = ()
    clean, scores = fake_scores(cfg, datasets=("SynBlend",))
    result = robustness.summarise(cfg, clean, scores)
    assert result["regime"] == "effort" and result["train_families"] == ["SynBlend"]
    fig = robustness_report.figure(result, workdir="/runs/e1")
    assert fig.get_suptitle() == ("Robustness: Effort (K=1, d=1, no mask) (e1) — "
                                  "DeeperForensics-1.0 perturbations")
    # The key spells out every abbreviation and the parameter its levels step through.
    key = [t.get_text() for t in fig.legends[0].get_texts()]
    for k, t in pt.PROTOCOLS["deeperforensics"].items():
        assert f"{k}: {t.name}, {t.param_name} {t.label(1)} → {t.label(5)}" in key
    assert "clean (no perturbation)" in key
    # The clean AUC is in the panel titles, not on a label among the markers.
    frame, video = fig.axes
    assert frame.get_title() == "SynBlend (training family): frame AUC (clean 0.900)"
    assert video.get_title() == "SynBlend (training family): video AUC (clean 0.950)"
    assert not frame.texts and not video.texts
    assert not too_small(fig)
    # The suptitle, the panel titles and the key do not overlap one another or the panels.
    renderer = draw(fig)
    sup = fig._suptitle.get_window_extent(renderer)
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        title, panel = ax.title.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert not sup.overlaps(title) and not sup.overlaps(panel)
        assert not title.overlaps(panel) and not legend.overlaps(panel)
    # A robustness.json written before the method was recorded still draws, unnamed.
    old = {k: v for k, v in result.items() if k not in ("regime", "train_families")}
    assert robustness_report.figure(old).get_suptitle() == "DeeperForensics-1.0 perturbations"


def test_gend_identity_levels_are_left_out_of_the_means(cfg):
    cfg.robustness.protocol = "gend"
    cfg.robustness.types = ("GB", "JPEG")
    cfg.robustness.levels = (1, 2, 6)
    clean, scores = fake_scores(cfg)
    result = robustness.summarise(cfg, clean, scores)
    gb = result["datasets"]["A"]["types"]["GB"]
    assert result["types"]["GB"]["levels"]["1"]["identity"] is True
    assert gb["mean"]["frame_auc"] == pytest.approx((0.78 + 0.74) / 2)  # levels 2 and 6 only
    jpeg = result["types"]["JPEG"]["levels"]
    assert [jpeg[lv]["seen_in_training"] for lv in ("1", "2", "6")] == [True, True, False]


def test_perturbed_eval_batches_are_deterministic(cfg):
    p = pt.Perturbation("deeperforensics", "BW", 5, seed=0)

    def images(perturbation):
        loader = pipeline.make_eval_loader(cfg.data, "SynBlend", batch_size=4,
                                           reader_wrapper=pt.reader_wrapper(perturbation))
        return np.concatenate([b["image"] for b in loader])

    clean = np.concatenate([b["image"] for b in pipeline.make_eval_loader(
        cfg.data, "SynBlend", batch_size=4)])
    a, b = images(p), images(p)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, clean)
    assert not np.array_equal(a, images(pt.Perturbation("deeperforensics", "BW", 5, seed=1)))


@pytest.mark.slow  # a training run first (~20 s idle, compile-bound; ~1 min on a loaded machine)
def test_end_to_end_on_the_tiny_fixture(cfg, tmp_path):
    cfg.train.total_steps = 2
    cfg.train.eval_every = cfg.train.checkpoint_every = 2
    train.train(cfg, tmp_path)
    result = robustness.robustness(cfg, tmp_path)
    for name in ("robustness.json", "robustness.md", "robustness.png"):
        assert (tmp_path / name).is_file(), name
    stored = json.loads((tmp_path / "robustness.json").read_text())
    assert stored["datasets"].keys() == {"SynBlend", "SynUpsample"}
    assert stored["timing"]["evaluations"] == 2 * (1 + 6)
    for entry in stored["datasets"].values():
        assert entry["clean"]["num_frames"] > 0
        for key in ("CS", "GB", "VC"):
            for lv in ("1", "5"):
                level = entry["types"][key]["levels"][lv]
                assert set(level) == {"frame_auc", "video_auc", "mean_abs_prob_change",
                                      "alarm_tpr", "alarm_fpr"}
                assert 0 <= level["alarm_fpr"] <= 1 and 0 <= level["alarm_tpr"] <= 1
                assert level["mean_abs_prob_change"] > 0  # every perturbation reached the model
    # Scored with the run's temperature, flagged at its validation 5 %-FPR frame threshold.
    rule = json.loads((tmp_path / "decision.json").read_text())
    assert stored["calibration"]["temperature"] == rule["temperature"]
    assert stored["calibration"]["alarm_threshold"] == rule["thresholds"]["frame"]["fpr@0.05"]
    assert "### False alarms and detections at the validation fpr@0.05 threshold" in \
        (tmp_path / "robustness.md").read_text()
    assert result["datasets"]["SynBlend"]["mean"] == stored["datasets"]["SynBlend"]["mean"]

    # GenD's identity level (blur (0, 0)) reproduces the clean pass exactly.
    cfg.robustness.protocol = "gend"
    cfg.robustness.types = ("GB",)
    cfg.robustness.levels = (1, 6)
    cfg.robustness.datasets = ("SynUpsample",)
    gend = robustness.robustness(cfg, tmp_path)["datasets"]["SynUpsample"]
    assert gend["types"]["GB"]["levels"]["1"]["mean_abs_prob_change"] == 0.0
    assert gend["types"]["GB"]["levels"]["1"]["frame_auc"] == gend["clean"]["frame_auc"]
    assert gend["types"]["GB"]["levels"]["6"]["mean_abs_prob_change"] > 0
    # Another grid goes beside the first, which stays as it was (issue 20: a demo row's
    # robustness files, linked from the demo's report.md, were replaced by a later grid).
    assert json.loads((tmp_path / "robustness.json").read_text()) == stored
    assert json.loads((tmp_path / "robustness-2.json").read_text())["settings"]["protocol"] \
        == "gend"
    assert {p.name for p in tmp_path.glob("robustness-2.*")} == {
        "robustness-2.json", "robustness-2.md", "robustness-2.png"}
    assert robustness.load_if_current(cfg, tmp_path)[1] == "robustness-2"
