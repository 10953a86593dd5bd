"""fmsd_jax.evaluators.metrics against scikit-learn, DeepfakeBench's code path, and
hand-computed cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from fmsd_jax.evaluators.metrics import (
    METRIC_KEYS,
    MetricAccumulator,
    UndefinedMetricWarning,
    aggregate_by_video,
    compute_metrics,
    roc,
)

# ----------------------------------------------------------------------------------------
# An independent transcription of DeepfakeBench's training/metrics/utils.py::get_test_metrics
# (frame-level metrics + get_video_metrics), kept close to the original on purpose: videos are
# the parent folder of each frame path, probabilities and labels are summed in Python and
# divided by the frame count, and the video label is int() of the mean.


def dfb_get_test_metrics(y_pred, y_true, img_names):
    def get_video_metrics(image, pred, label):
        result_dict = {}
        new_label, new_pred = [], []
        for s, p, lab in zip(image, pred, label, strict=True):
            parts = s.split("\\") if "\\" in s else s.split("/")
            a = parts[-2]
            result_dict.setdefault(a, []).append((s, p, lab))
        for video in result_dict.values():
            pred_sum = label_sum = leng = 0
            for frame in video:
                pred_sum += float(frame[1])
                label_sum += int(frame[2])
                leng += 1
            new_pred.append(pred_sum / leng)
            new_label.append(int(label_sum / leng))
        fpr, tpr, _ = skm.roc_curve(new_label, new_pred)
        v_auc = skm.auc(fpr, tpr)
        fnr = 1 - tpr
        v_eer = fpr[np.nanargmin(np.absolute(fnr - fpr))]
        return v_auc, v_eer

    y_pred = np.asarray(y_pred, dtype=np.float64).squeeze()
    y_true = np.asarray(y_true).copy()
    y_true[y_true >= 1] = 1
    fpr, tpr, _ = skm.roc_curve(y_true, y_pred, pos_label=1)
    auc = skm.auc(fpr, tpr)
    fnr = 1 - tpr
    eer = fpr[np.nanargmin(np.absolute(fnr - fpr))]
    ap = skm.average_precision_score(y_true, y_pred)
    prediction_class = (y_pred > 0.5).astype(int)
    correct = (prediction_class == np.clip(y_true, a_min=0, a_max=1)).sum().item()
    acc = correct / len(prediction_class)
    v_auc, _ = get_video_metrics(img_names, y_pred, y_true)
    return {"acc": acc, "auc": auc, "eer": eer, "ap": ap, "video_auc": v_auc}


def _synthetic_set(rng, n_videos=60, frames=(1, 9), sep=1.0):
    """Videos with a per-video label and noisy per-frame scores, as DFB frame paths."""
    probs, labels, paths = [], [], []
    for v in range(n_videos):
        y = int(rng.integers(0, 2))
        n = int(rng.integers(*frames))
        logit = sep * (2 * y - 1) + rng.normal(0, 1.0) + rng.normal(0, 1.0, n)
        probs += list(1 / (1 + np.exp(-logit)))
        labels += [y] * n
        kind = "fake" if y else "real"
        paths += [f"CelebDFv2/{kind}/id{v:03d}/{i:03d}.png" for i in range(n)]
    return np.array(probs), np.array(labels), paths


def _parent(paths):
    return [p.split("/")[-2] for p in paths]


# ----------------------------------------------------------------------------------------
# hand-computed cases


def test_perfect_separation():
    m = compute_metrics([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], ["a", "b", "c", "d"])
    assert m["frame_auc"] == 1.0 and m["video_auc"] == 1.0
    assert m["eer"] == 0.0 and m["ap"] == 1.0 and m["acc"] == 1.0
    assert m["num_frames"] == 4 and m["num_videos"] == 4


def test_reversed_scores():
    m = compute_metrics([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1])
    assert m["frame_auc"] == 0.0 and m["acc"] == 0.0 and m["eer"] == 1.0
    # Fakes at ranks 3 and 4: precision 1/3 at recall .5, 2/4 at recall 1.
    assert m["ap"] == pytest.approx(0.5 * (1 / 3) + 0.5 * (2 / 4))


def test_known_eer_and_auc():
    # Two of ten reals score above the threshold band and two of ten fakes below it: at the
    # ROC vertex (fpr .2, tpr .8) fpr = fnr = 0.2. AUC: 8 fakes beat all 10 reals, 2 fakes
    # beat 8 reals -> 96/100. ACC at 0.5: 8 + 8 of 20.
    probs = [0.1] * 8 + [0.6] * 2 + [0.4] * 2 + [0.9] * 8
    labels = [0] * 10 + [1] * 10
    m = compute_metrics(probs, labels)
    assert m["eer"] == pytest.approx(0.2)
    assert m["frame_auc"] == pytest.approx(0.96)
    assert m["acc"] == pytest.approx(0.8)


def test_sklearn_doc_example():
    # The roc_curve docstring example: AUC 0.75; EER vertex fpr = fnr = 0.5.
    m = compute_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert m["frame_auc"] == pytest.approx(0.75)
    assert m["eer"] == pytest.approx(0.5)
    assert m["ap"] == pytest.approx(
        skm.average_precision_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    )


def test_ties():
    # Tied scores across classes are half-credited by the AUC.
    m = compute_metrics([0.3, 0.7, 0.7, 0.9], [0, 0, 1, 1])
    assert m["frame_auc"] == pytest.approx(0.875)
    # A constant predictor: AUC 0.5; DFB's EER picks the first vertex of the 2-point ROC,
    # which gives 0 (a known quirk of its formula that we reproduce, not fix).
    m = compute_metrics([0.5] * 6, [0, 1, 0, 1, 0, 1])
    assert m["frame_auc"] == pytest.approx(0.5)
    assert m["eer"] == 0.0
    # 0.5 is not > 0.5: every frame is called real, so ACC is the share of reals.
    assert m["acc"] == pytest.approx(0.5)


def test_acc_threshold_is_strict():
    # DFB: ``y_pred > 0.5``; a fake scored exactly 0.5 is a miss.
    m = compute_metrics([0.5, 0.51, 0.2, 0.1], [1, 1, 0, 0])
    assert m["acc"] == pytest.approx(0.75)


def test_labels_above_one_count_as_fake():
    a = compute_metrics([0.1, 0.6, 0.7, 0.9], [0, 2, 3, 1])
    b = compute_metrics([0.1, 0.6, 0.7, 0.9], [0, 1, 1, 1])
    assert a == b


def test_video_averaging_by_hand():
    # Frame level is imperfect (a fake frame at 0.3 below a real frame at 0.4), but each
    # video's mean separates: real videos 0.25 and 0.3, fake videos 0.55 and 0.85.
    probs = [0.1, 0.4, 0.3, 0.3, 0.3, 0.8, 0.9, 0.8]
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    vids = ["r1", "r1", "r2", "r2", "f1", "f1", "f2", "f2"]
    m = compute_metrics(probs, labels, vids)
    assert m["frame_auc"] < 1.0
    assert m["video_auc"] == 1.0
    assert m["num_videos"] == 4
    vp, vy, ids = aggregate_by_video(probs, labels, vids)
    assert ids == ["r1", "r2", "f1", "f2"]
    np.testing.assert_allclose(vp, [0.25, 0.3, 0.55, 0.85])
    np.testing.assert_array_equal(vy, [0, 0, 1, 1])


def test_video_ids_of_any_hashable_type():
    probs = np.array([0.1, 0.3, 0.8, 0.6, 0.7])
    labels = np.array([0, 0, 1, 1, 1])
    by_str = compute_metrics(probs, labels, ["a", "a", "b", "c", "c"])
    by_np = compute_metrics(probs, labels, np.array(["a", "a", "b", "c", "c"]))
    by_int = compute_metrics(probs, labels, np.array([0, 0, 1, 2, 2]))
    by_tuple = compute_metrics(probs, labels, [("d", 0), ("d", 0), ("d", 1), ("e", 0), ("e", 0)])
    assert by_str == by_np == by_int == by_tuple
    assert by_str["num_videos"] == 3


# ----------------------------------------------------------------------------------------
# against scikit-learn and DeepfakeBench


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    probs, labels, paths = _synthetic_set(rng)
    m = compute_metrics(probs, labels, _parent(paths))
    assert m["frame_auc"] == pytest.approx(skm.roc_auc_score(labels, probs), abs=1e-12)
    assert m["ap"] == pytest.approx(skm.average_precision_score(labels, probs), abs=1e-12)
    assert m["acc"] == pytest.approx(skm.accuracy_score(labels, probs > 0.5), abs=1e-12)
    # EER is the ROC vertex where fpr and fnr are closest; check against a brute force over
    # every threshold of the full (non-dropped) ROC that the two agree within a vertex gap.
    fpr, tpr, _ = skm.roc_curve(labels, probs, drop_intermediate=False)
    i = np.argmin(np.abs((1 - tpr) - fpr))
    assert abs(m["eer"] - fpr[i]) <= 1.0 / np.sum(labels == 0) + 1e-12
    assert m["num_frames"] == len(probs)


@pytest.mark.parametrize("seed", range(5))
def test_matches_deepfakebench_code_path(seed):
    rng = np.random.default_rng(100 + seed)
    probs, labels, paths = _synthetic_set(rng, sep=0.5 + seed * 0.3)
    ref = dfb_get_test_metrics(probs, labels, paths)
    m = compute_metrics(probs, labels, _parent(paths))
    assert m["frame_auc"] == ref["auc"]
    assert m["eer"] == ref["eer"]
    assert m["ap"] == ref["ap"]
    assert m["acc"] == ref["acc"]
    assert m["video_auc"] == pytest.approx(ref["video_auc"], abs=1e-12)


def test_mixed_label_video_floor_matches_deepfakebench():
    probs = np.array([0.2, 0.7, 0.9, 0.4, 0.6, 0.1, 0.8])
    labels = np.array([0, 1, 1, 0, 0, 0, 1])
    paths = [
        "d/v1/0.png",
        "d/v1/1.png",
        "d/v2/0.png",
        "d/v3/0.png",
        "d/v3/1.png",
        "d/v4/0",
        "d/v5/0",
    ]
    ref = dfb_get_test_metrics(probs, labels, paths)
    m = compute_metrics(probs, labels, _parent(paths), mixed_video_label="floor")
    assert m["video_auc"] == pytest.approx(ref["video_auc"])
    _, vy, _ = aggregate_by_video(probs, labels, _parent(paths), mixed_video_label="floor")
    assert vy[0] == 0  # v1 has one real and one fake frame: DFB calls it real


def test_mixed_label_video_is_an_error_by_default():
    with pytest.raises(ValueError, match=r"mix real and fake.*'v1'"):
        compute_metrics([0.2, 0.7, 0.9, 0.1], [0, 1, 1, 0], ["v1", "v1", "v2", "v3"])
    with pytest.raises(ValueError, match="mixed_video_label"):
        compute_metrics([0.2, 0.7], [0, 1], ["a", "b"], mixed_video_label="majority")


def test_roc_helper_matches_reported_auc():
    rng = np.random.default_rng(7)
    probs, labels, _ = _synthetic_set(rng)
    fpr, tpr, auc = roc(probs, labels)
    assert auc == compute_metrics(probs, labels)["frame_auc"]
    assert fpr[0] == 0 and tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)


# ----------------------------------------------------------------------------------------
# undefined and bad input


def test_single_class_gives_nan_with_warning():
    with pytest.warns(UndefinedMetricWarning, match="only label 1"):
        m = compute_metrics([0.7, 0.2, 0.9], [1, 1, 1], ["a", "b", "c"], name="DFDC-fakes")
    for k in ("frame_auc", "ap", "eer", "video_auc"):
        assert math.isnan(m[k]), k
    assert m["acc"] == pytest.approx(2 / 3)
    with pytest.warns(UndefinedMetricWarning):
        _, _, auc = roc([0.1, 0.2], [0, 0])
    assert math.isnan(auc)


def test_no_warning_when_both_classes_present():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics([0.1, 0.9, 0.3], [0, 1, 0], ["a", "b", "a"])
    assert m["video_auc"] == 1.0


def test_without_video_ids():
    m = compute_metrics([0.1, 0.9], [0, 1])
    assert math.isnan(m["video_auc"]) and m["num_videos"] == 0
    assert set(METRIC_KEYS) <= set(m)


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        ([0.1, float("nan")], [0, 1], "non-finite"),
        ([-2.0, 3.0], [0, 1], "logits"),
        ([[0.9, 0.1], [0.2, 0.8]], [0, 1], r"probs\[:, 1\]"),
        ([0.1, 0.9], [0, 1, 1], "shape"),
        ([0.1, 0.9], [0, -1], ">= 0"),
        ([0.1, 0.9], [0, 0.5], "integers"),
    ],
)
def test_bad_input_is_named(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(probs, labels)


def test_video_ids_length_checked():
    with pytest.raises(ValueError, match="one id per frame"):
        compute_metrics([0.1, 0.9], [0, 1], ["a"])


# ----------------------------------------------------------------------------------------
# accumulator


def test_accumulator_equals_one_shot_with_padding():
    rng = np.random.default_rng(3)
    probs, labels, paths = _synthetic_set(rng, n_videos=80)
    vids = np.array(_parent(paths))
    acc = MetricAccumulator(name="CDF-v2")
    batch = 16
    for start in range(0, len(probs), batch):
        p, y, v = (
            probs[start : start + batch],
            labels[start : start + batch],
            vids[start : start + batch],
        )
        n = len(p)
        # Pad the last batch as a sharded eval loop does, with garbage that must not count.
        pad = batch - n
        p = np.concatenate([p, np.full(pad, np.nan)])[:, None]  # (B, 1), as a head emits
        y = np.concatenate([y, np.full(pad, 1)])
        v = np.concatenate([v, np.array(["PAD"] * pad)])
        valid = np.arange(batch) < n
        acc.add(p.astype(np.float32), y, v, valid)
    assert len(acc) == len(probs)
    one_shot = compute_metrics(probs.astype(np.float32), labels, vids)
    assert acc.result() == one_shot
    p_all, y_all = acc.arrays()
    v_all = acc.video_ids()
    np.testing.assert_array_equal(y_all, labels)
    assert list(v_all) == list(vids)


def test_accumulator_without_video_ids_and_reset():
    acc = MetricAccumulator()
    acc.add([0.1, 0.8], [0, 1])
    acc.add([0.3, 0.9, 0.0], [0, 1, 1], valid_mask=[True, True, False])
    m = acc.result()
    assert m["frame_auc"] == 1.0 and m["num_frames"] == 4 and math.isnan(m["video_auc"])
    with pytest.raises(ValueError, match="every batch or for none"):
        acc.add([0.5], [1], ["v"])
    assert acc.video_ids() is None
    acc.reset()
    assert len(acc) == 0
    acc.add([0.2, 0.7], [0, 1], ["a", "b"])
    assert acc.result()["num_videos"] == 2


def test_accumulator_checks_shapes():
    acc = MetricAccumulator()
    with pytest.raises(ValueError, match="valid_mask"):
        acc.add([0.1, 0.2], [0, 1], valid_mask=[True])
    with pytest.raises(ValueError, match="labels"):
        acc.add([0.1, 0.2], [0])
    with pytest.raises(ValueError, match="logits"):
        acc.add([0.1, 4.0], [0, 1], valid_mask=[True, True])


def test_empty_accumulator_warns_not_crashes():
    with pytest.warns(UndefinedMetricWarning, match="no samples"):
        m = MetricAccumulator().result()
    assert m["num_frames"] == 0 and math.isnan(m["frame_auc"])
