"""From a score to a decision: temperature scaling, ECE/Brier/NLL, operating points chosen on
validation, video aggregation, and decision.json (issue 22, parts 1-3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from fmsd_jax.errors import BadInput
from fmsd_jax.evaluators import calibration, decision, metrics
from fmsd_jax.evaluators import operating_points as ops


def _scores(n=400, seed=0, ties=True):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    if ties:  # DeepfakeBench's float32 softmax saturates: ties do happen
        p = np.round(p, 2)
    return p, y


def _brute_rates(p, y):
    """(threshold, tpr, fpr) for every candidate threshold, by counting."""
    out = []
    for t in np.r_[np.unique(p), ops.NOTHING_FLAGGED]:
        fake = p >= t
        out.append((t, fake[y == 1].mean(), fake[y == 0].mean()))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_are_the_best_roc_vertex_within_each_budget(seed):
    p, y = _scores(seed=seed)
    chosen = ops.choose_thresholds(p, y)
    rates = _brute_rates(p, y)
    for a in ops.FPR_TARGETS:
        t = chosen[f"fpr@{a:g}"]
        best_tpr = max(tpr for _, tpr, fpr in rates if fpr <= a)
        got = ops.rates_at(p, y, t)
        assert got["fpr"] <= a and got["tpr"] == best_tpr
        # and the lowest such threshold, i.e. what scikit-learn's roc_curve lists at that vertex
        assert t == min(th for th, tpr, fpr in rates if fpr <= a and tpr == best_tpr)
    # the EER threshold is the vertex DeepfakeBench reads its EER at (|FNR - FPR| minimal)
    fpr, tpr, thr = skm.roc_curve(y, p, drop_intermediate=False)
    i = np.nanargmin(np.abs(1 - tpr - fpr))
    assert chosen["eer"] == thr[i]
    r = ops.rates_at(p, y, chosen["eer"])
    assert (r["tpr"], r["fpr"]) == (tpr[i], fpr[i])


def test_measured_rates_equal_scikit_learns_confusion_matrix_and_the_oracle_brute_force():
    pv, yv = _scores(seed=3)
    pt, yt = _scores(seed=4)
    pt = np.clip(pt + 0.08, 0, 1)  # a shifted target domain: more false alarms
    got = ops.measure(pt, yt, ops.choose_thresholds(pv, yv))
    rates = _brute_rates(pt, yt)
    for name, m in got.items():
        tn, fp, fn, tp = skm.confusion_matrix(yt, pt >= m["threshold"]).ravel()
        assert m["tpr"] == tp / (tp + fn) and m["fpr"] == fp / (fp + tn)
        if name.startswith("fpr@"):
            a = float(name[4:])
            assert m["oracle_tpr"] == max(tpr for _, tpr, fpr in rates if fpr <= a)
            assert m["oracle_fpr"] <= a
            assert m["tpr_gap"] == m["oracle_tpr"] - m["tpr"]
    # the shift shows: the 1 % threshold chosen on validation exceeds 1 % false alarms here
    assert got["fpr@0.01"]["fpr"] > 0.01


def test_a_single_class_set_has_no_operating_points_and_nan_oracle():
    assert ops.choose_thresholds([0.1, 0.9], [1, 1]) is None
    assert all(math.isnan(v["tpr"]) for v in ops.oracle([0.2, 0.3], [0, 0]).values())


def test_ece_brier_and_nll_by_their_definitions():
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.5, 0.55])
    y = np.array([0, 1, 1, 1, 0, 1])
    # bins of width 1/15: {0.05, 0.05} -> bin 0, {0.5} -> bin 7, {0.55} -> bin 8, {0.95} -> 14
    want = (2 / 6 * abs(0.05 - 0.5) + 1 / 6 * abs(0.5 - 0) + 1 / 6 * abs(0.55 - 1)
            + 2 / 6 * abs(0.95 - 1))
    assert calibration.ece(p, y) == pytest.approx(want, abs=1e-12)
    assert calibration.brier(p, y) == pytest.approx(skm.brier_score_loss(y, p), abs=1e-12)
    assert calibration.nll(p, y) == pytest.approx(skm.log_loss(y, p), abs=1e-12)
    r = calibration.reliability(p, y)
    assert r["count"][0] == 2 and r["count"][14] == 2 and sum(r["count"]) == 6
    assert r["mean_prob"][3] is None  # an empty bin is not a number
    assert calibration.ece([1.0, 0.0], [1, 0]) == 0.0  # p = 1 falls in the last bin


def test_temperature_recovers_a_known_overconfidence_and_lowers_ece():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2.0, 20000)
    y = rng.random(z.size) < calibration.probs_at(z, 1.0)  # labels calibrated for z
    t, why = calibration.fit_temperature(2.5 * z, y)  # a model 2.5x too confident
    assert why is None and t == pytest.approx(2.5, rel=0.05)
    before = calibration.ece(calibration.probs_at(2.5 * z, 1.0), y)
    after = calibration.ece(calibration.probs_at(2.5 * z, t), y)
    assert after < 0.5 * before and after < 0.02


def test_a_one_class_validation_split_cannot_calibrate_and_says_so():
    t, why = calibration.fit_temperature([1.0, 2.0, -1.0], [1, 1, 1])
    assert t == 1.0 and "only fake frames" in why
    rule = decision.fit(np.array([1.0, 2.0, -1.0]), np.array([1, 1, 1]),
                        np.array(["a", "a", "b"], dtype=object))
    assert rule.temperature == 1.0 and rule.thresholds == {}
    assert "only fake frames" in rule.note
    with pytest.raises(BadInput, match="has no operating points"):
        rule.threshold("eer")
    assert rule.threshold("0.5") == 0.5  # a number needs no validation


def test_video_aggregations_by_hand():
    p = np.array([0.9, 0.1, 0.2, 0.3, 0.99, 0.6, 0.7])
    y = np.array([1, 1, 0, 0, 0, 1, 1])
    v = np.array(["a", "a", "b", "b", "b", "c", "c"], dtype=object)
    logit = lambda q: math.log(q / (1 - q))  # noqa: E731
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = {
        "mean": [0.5, (0.2 + 0.3 + 0.99) / 3, 0.65],
        "mean_logit": [sig((logit(0.9) + logit(0.1)) / 2),
                       sig((logit(0.2) + logit(0.3) + logit(0.99)) / 3),
                       sig((logit(0.6) + logit(0.7)) / 2)],
        "max": [0.9, 0.99, 0.7],
        "topk": [0.5, (0.99 + 0.3) / 2, 0.65],  # topk=2
    }
    for how, w in want.items():
        vp, vy, ids = metrics.aggregate_by_video(p, y, v, how=how, topk=2)
        np.testing.assert_allclose(vp, w, atol=1e-12, err_msg=how)
        assert ids == ["a", "b", "c"] and vy.tolist() == [1, 0, 1]
    aucs = metrics.video_auc_by_aggregation(p, y, v, topk=2)
    assert list(aucs) == ["mean", "mean_logit", "max", "top2"]
    assert aucs["max"] == skm.roc_auc_score([1, 0, 1], want["max"])
    with pytest.raises(ValueError, match="video aggregation must be one of"):
        metrics.aggregate_by_video(p, y, v, how="median")


def test_decision_round_trips_and_names_what_it_lacks(tmp_path):
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 60)
    z = rng.normal(3.0 * (2 * y - 1), 2.0)
    vids = np.asarray([f"v{i // 3}" for i in range(y.size)], dtype=object)
    rule = decision.fit(z, y, vids, aggregation="max", topk=3,
                        fitted_on={"datasets": ["X"], "split": "val"})
    assert set(rule.thresholds) == {"frame", "video"}
    assert set(rule.thresholds["video"]) == set(ops.NAMES) and rule.aggregation == "max"
    # the video thresholds are chosen on the max-aggregated calibrated probabilities
    vp, vy, _ = metrics.aggregate_by_video(calibration.probs_at(z, rule.temperature), y, vids,
                                           how="max")
    assert rule.thresholds["video"] == ops.choose_thresholds(vp, vy)
    decision.save(tmp_path, rule)
    assert decision.load_decision(tmp_path) == rule
    assert rule.threshold("fpr@0.05", "frame") == rule.thresholds["frame"]["fpr@0.05"]
    with pytest.raises(BadInput, match=r"fpr@0\.01, fpr@0\.05 or a threshold"):
        decision.parse_operating_point("fpr@0.02")
    with pytest.raises(BadInput, match=r"must lie in \[0, 1\]"):
        decision.parse_operating_point("1.5")
    missing = decision.load_decision(tmp_path / "nowhere")
    assert missing.temperature == 1.0 and "does not exist" in missing.note
    with pytest.raises(BadInput, match="not in this run's decision.json"):
        missing.threshold("eer", "video")


def test_temperature_one_gives_the_uncalibrated_softmax_bit_for_bit(tiny_clip_checkpoint,
                                                                     tiny_benchmark):
    """The predict function at T = 1 is exactly jax.nn.softmax(logits)[:, 1], the probability
    every earlier version printed; at T = 2 it is softmax(logits / 2), same program."""
    import jax
    from conftest import counting_compiles, make_cfg
    from flax import nnx

    from fmsd_jax import parallel
    from fmsd_jax.evaluators import scoring
    from fmsd_jax.run import factory

    cfg = make_cfg(tiny_clip_checkpoint, tiny_benchmark)
    model = factory.build_detector(cfg)
    graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    mesh = parallel.make_mesh(cfg.mesh)
    predict = scoring.make_predict_fn(graphdef, mesh)

    def before(trainable, frozen, images):  # make_predict_fn before temperatures, verbatim
        model = nnx.merge(graphdef, trainable, frozen)
        return jax.nn.softmax(model(images).astype(np.float32), axis=-1)[:, 1]

    old = np.asarray(jax.jit(parallel.on_mesh(before, mesh),
                             out_shardings=parallel.batch_sharding(mesh))(
        trainable, frozen, images))
    logits = np.asarray(nnx.merge(graphdef, trainable, frozen)(images), np.float32)
    out = predict(trainable, frozen, images, scoring.temperature_arg(1.0))
    np.testing.assert_array_equal(np.asarray(out["prob"]), old)
    np.testing.assert_allclose(np.asarray(out["logit"]), logits[:, 1] - logits[:, 0], atol=1e-6)
    calls: list[int] = []
    hot = counting_compiles(predict, calls)(trainable, frozen, images,
                                            scoring.temperature_arg(2.0))
    assert calls == [0]  # the temperature is an argument, not a constant
    np.testing.assert_allclose(np.asarray(hot["prob"]),
                               calibration.probs_at(logits[:, 1] - logits[:, 0], 2.0), atol=1e-6)
