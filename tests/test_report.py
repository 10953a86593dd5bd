"""Report files: numbers survive the JSON and Markdown round trips, charts are real PNGs,
and the demo verdict is computed from the numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import draw, overlapping_tick_labels, too_small

from fmsd_jax import errors
from fmsd_jax.demo.report import DemoRow, compare_to_baselines, demo_table, write_demo_report
from fmsd_jax.evaluators import plots, result_files
from fmsd_jax.evaluators.metrics import compute_metrics, roc
from fmsd_jax.evaluators.plots import (
    adaptation_figure,
    layer_scores_figure,
    plot_layer_scores,
    plot_roc,
    roc_figure,
)
from fmsd_jax.evaluators.result_files import (
    held_out_mean,
    read_results,
    results_table,
    write_results,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _parse_md_table(text: str) -> tuple[list[str], list[list[str]]]:
    """First Markdown table in ``text`` as (header, rows of cells)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    assert set("".join(split[1])) <= set("-: "), "second line must be the alignment row"
    return split[0], split[2:]


def _num(cell: str) -> float:
    return math.nan if cell.startswith("n/a") else float(cell.rstrip("†"))


def _assert_png(path: Path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"
    # IHDR: width and height are big-endian uint32 at bytes 16..24.
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert w > 200 and h > 200


@pytest.fixture
def results():
    rng = np.random.default_rng(0)
    out = {}
    for k, name in enumerate(["CDF-v1", "CDF-v2", "DFDC"]):
        y = np.repeat(rng.integers(0, 2, 40), 4)
        p = np.clip(0.5 + (y - 0.5) * (0.2 + 0.1 * k) + rng.normal(0, 0.2, y.size), 0, 1)
        out[name] = compute_metrics(p, y, np.arange(y.size) // 4)
    return out


def test_results_json_round_trip(tmp_path, results):
    json_path, md_path = write_results(tmp_path, results)
    assert json_path == tmp_path / "results.json" and md_path == tmp_path / "results.md"
    raw = json.loads(json_path.read_text())
    assert list(raw) == list(results)
    for d, m in results.items():
        for k in ("frame_auc", "video_auc", "acc", "ap", "eer"):
            assert isinstance(raw[d][k], float)
            assert raw[d][k] == m[k]  # exact: JSON keeps float64 repr
        assert raw[d]["num_frames"] == m["num_frames"] == 160
        assert raw[d]["num_videos"] == 40
    assert read_results(tmp_path) == results


def test_results_markdown_parses_back(tmp_path, results):
    _, md_path = write_results(tmp_path, results)
    header, rows = _parse_md_table(md_path.read_text())
    assert header[:3] == ["dataset", "frames", "videos"]
    # Every metric column says its level, and no column holds both levels.
    for col in header[3:]:
        assert ("(frame)" in col) != ("(video)" in col), col
    col = {h: i for i, h in enumerate(header)}
    by_name = {r[0]: r for r in rows}
    for d, m in results.items():
        r = by_name[d]
        assert _num(r[col["AUC (frame)"]]) == pytest.approx(m["frame_auc"], abs=5e-5)
        assert _num(r[col["AUC (video)"]]) == pytest.approx(m["video_auc"], abs=5e-5)
        assert _num(r[col["AP (frame)"]]) == pytest.approx(m["ap"], abs=5e-5)
        assert _num(r[col["ACC@0.5 (frame)"]]) == pytest.approx(m["acc"], abs=5e-5)
        assert _num(r[col["EER (frame)"]]) == pytest.approx(m["eer"], abs=5e-5)
        assert int(r[col["frames"]]) == 160
    avg = by_name["**all-sets mean** (3 test sets)"]  # no training family given
    expect = np.mean([m["video_auc"] for m in results.values()])
    assert _num(avg[col["AUC (video)"]]) == pytest.approx(expect, abs=5e-5)


def test_nan_is_null_and_na_and_average_is_marked(tmp_path, results):
    results = dict(results)
    results["fakes-only"] = {**results["DFDC"], "frame_auc": math.nan, "video_auc": float("nan")}
    write_results(tmp_path, results)
    raw = json.loads((tmp_path / "results.json").read_text())
    assert raw["fakes-only"]["frame_auc"] is None
    assert math.isnan(read_results(tmp_path)["fakes-only"]["video_auc"])
    text = (tmp_path / "results.md").read_text()
    header, rows = _parse_md_table(text)
    by_name = {r[0]: r for r in rows}
    assert by_name["fakes-only"][header.index("AUC (frame)")] == "n/a"
    avg = by_name["**all-sets mean** (4 test sets)"][header.index("AUC (frame)")]
    assert avg.endswith("†")
    defined = [m["frame_auc"] for d, m in results.items() if d != "fakes-only"]
    assert _num(avg) == pytest.approx(np.mean(defined), abs=5e-5)
    assert "† averaged over the datasets where the metric is defined" in text


def test_rewrite_replaces_and_missing_key_is_named(tmp_path, results):
    write_results(tmp_path, results)
    write_results(tmp_path, {"CDF-v2": results["CDF-v2"]})
    assert list(read_results(tmp_path)) == ["CDF-v2"]
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match=r"'DFD'.*\['video_auc'\]"):
        write_results(tmp_path, {"DFD": {"frame_auc": 0.9, "acc": 1, "ap": 1, "eer": 0}})
    with pytest.raises(FileNotFoundError, match="--mode evaluate"):
        read_results(tmp_path / "nowhere")


def test_single_dataset_table_has_no_average(results):
    _, rows = _parse_md_table(results_table({"DFDC": results["DFDC"]}))
    assert [r[0] for r in rows] == ["DFDC"]
    _, rows = _parse_md_table(results_table({"DFDC": results["DFDC"]}, train_families=["FF"]))
    assert [r[0] for r in rows] == ["DFDC"]


def test_results_md_marks_the_training_family_and_gives_the_held_out_mean(tmp_path, results):
    _, md = write_results(tmp_path, results, train_families=["CDF-v1"])
    text = md.read_text()
    header, rows = _parse_md_table(text)
    by_name = {r[0]: r for r in rows}
    assert list(by_name) == ["CDF-v1 (training family)", "CDF-v2", "DFDC",
                             "**held-out mean** (2 test sets)",
                             "all-sets mean (3 test sets, training family included)"]
    for i, (key, _) in enumerate(result_files._RESULT_COLUMNS):
        held = _num(by_name["**held-out mean** (2 test sets)"][3 + i])
        every = _num(by_name["all-sets mean (3 test sets, training family included)"][3 + i])
        assert held == pytest.approx(np.mean([results[d][key] for d in ("CDF-v2", "DFDC")]),
                                     abs=5e-5)
        assert every == pytest.approx(np.mean([m[key] for m in results.values()]), abs=5e-5)
    assert "Held-out mean: over the test sets not in the training families (CDF-v1): " \
           "CDF-v2, DFDC." in text
    # results.json keeps its schema: dataset -> numbers, nothing about the roles.
    assert read_results(tmp_path) == results

    # Every test set a training family: no held-out row, and the table says why.
    _, rows = _parse_md_table(text := results_table(results, train_families=list(results)))
    assert [r[0] for r in rows][-1] == "all-sets mean (3 test sets, all training families)"
    assert not any("held-out" in r[0] for r in rows)
    assert "No held-out test set: every test set is a training family" in text
    # No training family among the test sets: the held-out mean is over all of them.
    _, rows = _parse_md_table(results_table(results, train_families=["FF++"]))
    assert [r[0] for r in rows][-1] == "**held-out mean** (all 3 test sets)"


def test_held_out_mean_is_the_demo_reports_and_results_mds(results):
    train = ["CDF-v1"]
    assert held_out_mean(results, "frame_auc", train) == (
        pytest.approx(np.mean([results[d]["frame_auc"] for d in ("CDF-v2", "DFDC")])), 2, 2)
    # A family missing or undefined is left out of the mean and counted as missing.
    partial = {**results, "DFDC": {**results["DFDC"], "video_auc": math.nan}}
    mean, n, of = held_out_mean(partial, "video_auc", train, families=[*results, "DFD"])
    assert (mean, n, of) == (pytest.approx(results["CDF-v2"]["video_auc"]), 1, 3)
    # The demo table's held-out cells and results.md's held-out row are the same numbers.
    header, rows = _parse_md_table(demo_table([DemoRow("FMSD", results, "cmd")],
                                              train_families=train))
    demo = dict(zip(header, rows[0], strict=True))
    _, md_rows = _parse_md_table(results_table(results, train_families=train))
    md = {r[0]: r for r in md_rows}["**held-out mean** (2 test sets)"]
    assert demo["held-out mean · frame AUC"] == md[3]
    assert demo["held-out mean · video AUC"] == md[7]


def test_plot_roc_png(tmp_path):
    rng = np.random.default_rng(1)
    curves = {}
    for name in ["CDF-v2", "DFDC"]:
        y = rng.integers(0, 2, 300)
        p = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.25, 300), 0, 1)
        curves[name] = roc(p, y)
    curves["empty"] = (np.zeros(0), np.zeros(0), math.nan)  # a single-class set
    out = plot_roc(curves, tmp_path / "sub" / "roc.png")
    _assert_png(out)
    with pytest.raises(ValueError, match="at least one"):
        plot_roc({}, tmp_path / "x.png")
    # With video-level curves: two panels under a title that names the method.
    fig = roc_figure(curves, title="ROC: FMSD", video_curves={"DFDC": curves["DFDC"]})
    assert [ax.get_title() for ax in fig.axes] == ["frame level", "video level"]
    assert fig.get_suptitle() == "ROC: FMSD"
    assert len(fig.axes[1].get_lines()) == 2  # chance + DFDC
    _assert_png(plot_roc(curves, tmp_path / "v.png", title="ROC: FMSD",
                         video_curves={"DFDC": curves["DFDC"]}))


def test_roc_legend_marks_the_training_family():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 200)
    curve = roc(np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.25, 200), 0, 1), y)
    fig = roc_figure({"SynBlend": curve, "SynUpsample": curve}, title="ROC: FMSD (w1)",
                     video_curves={"SynBlend": curve, "SynUpsample": curve},
                     train_families=["SynBlend"])
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels[1].startswith("SynBlend (training family): AUC ")
        assert labels[2].startswith("SynUpsample: AUC ")
    assert not too_small(fig)


def test_run_title_names_the_method_and_the_run():
    assert result_files.run_title("fmsd", "/runs/w1") == "FMSD (w1)"
    assert result_files.run_title("effort", "runs/demo/effort") == "Effort (K=1, d=1, no mask)"
    assert result_files.run_title("linear_probe") == "Linear probe"


def _layer_scores(rng, n_layers=12, n_targets=4):
    bias = rng.lognormal(0, 1.5, (n_layers, n_targets))
    variance = rng.lognormal(1, 1, (n_layers, n_targets))
    score = bias / variance
    mask = score >= np.sort(score.ravel())[-6]
    return {"score": score, "bias": bias, "variance": variance}, mask


def test_plot_layer_scores_png(tmp_path):
    rng = np.random.default_rng(2)
    scores, mask = _layer_scores(rng)
    out = plot_layer_scores(scores, ["q", "k", "v", "out"], mask, tmp_path / "layers.png")
    _assert_png(out, min_bytes=20_000)
    # Score only, non-positive scores (linear colour scale), custom layer names, ViT-L size.
    big, big_mask = _layer_scores(rng, n_layers=24, n_targets=6)
    big["score"] = big["score"] - 1.0
    del big["bias"]
    out = plot_layer_scores(
        big,
        ["q", "k", "v", "out", "fc1", "fc2"],
        big_mask,
        tmp_path / "layers_l14.png",
        layer_names=[f"block {i}" for i in range(24)],
    )
    _assert_png(out)


def test_plot_layer_scores_accepts_the_mask_record(tmp_path):
    # layer_mask.json holds the whole record: extra keys: extra keys, a GSNR score.
    rng = np.random.default_rng(5)
    scores, mask = _layer_scores(rng)
    record = {
        **scores,
        "score": rng.lognormal(0, 1, mask.shape),  # per-element GSNR: not bias / variance
        "mask": mask.astype(np.float32),
        "targets": ["q", "k", "v", "out"],
        "num_batches": 8,
        "score_kind": "gsnr",
    }
    _assert_png(plot_layer_scores(record, record["targets"], mask, tmp_path / "g.png"))


TARGETS_MLP = ["q", "k", "v", "out", "fc1", "fc2"]


def _spanning(rng, shape, lo, hi):
    """Values in [lo, hi], log-uniform, with both ends reached."""
    v = lo * (hi / lo) ** rng.random(shape)
    v.flat[0], v.flat[-1] = lo, hi
    return v


@pytest.mark.parametrize(
    ("n_layers", "targets", "variance_range", "bias_range"),
    [
        (12, TARGETS_MLP[:4], (2.5e-3, 5e-2), (2e-4, 3e-3)),  # B/16: 48 candidates
        (12, TARGETS_MLP, (1e-3, 1.0), (1e-6, 1e-1)),  # B/16 with fc1/fc2
        (24, TARGETS_MLP[:4], (1.5e-3, 1.5e-2), (1.1e-4, 4e-4)),  # L/14: 96
        (24, TARGETS_MLP, (2.1e-3, 2.6e-3), (1e-8, 1e2)),  # L/14 with fc1/fc2; a sliver, 10 dec
    ],
)
def test_layer_scores_chart_is_readable_at_saved_size(n_layers, targets, variance_range,
                                                      bias_range):
    """In the first and third cases' variance ranges matplotlib's own minor labels (3×10⁻³,
    4×10⁻³) ran into each other and every cell number was 6 pt; the last case has no
    1-2-3-5-7 tick inside its x range and ten decades on y."""
    rng = np.random.default_rng(n_layers + len(targets))
    shape = (n_layers, len(targets))
    var, bias = _spanning(rng, shape, *variance_range), _spanning(rng, shape, *bias_range)
    score = bias / var
    mask = score >= np.sort(score.ravel())[-8]
    stab = {"seeds": [0, 1], "scores": [score, score * rng.lognormal(0, 0.3, shape)],
            "mean_spearman": 0.9, "min_spearman": 0.9, "mean_overlap": 0.8}
    record = {"score": score, "bias": bias, "variance": var, "score_kind": "bias_variance",
              "stability": stab, "head": {"kind": "warmed", "warmup_steps": 50}}
    fig = layer_scores_figure(record, targets, mask,
                              title="Forgery-aware layer scores: FMSD (w1)")
    assert not overlapping_tick_labels(fig)
    assert not too_small(fig)
    assert fig.get_suptitle().startswith("Forgery-aware layer scores: FMSD (w1); head warmed")
    # Every cell number fits inside its cell.
    heat = fig.axes[0]
    renderer = draw(fig)
    box = heat.get_window_extent(renderer)
    cell_w, cell_h = box.width / len(targets), box.height / n_layers
    assert len(heat.texts) == score.size
    for t in heat.texts:
        ext = t.get_window_extent(renderer)
        assert ext.width < cell_w and ext.height < cell_h, t.get_text()


def test_log_ticks_are_spaced_for_any_range():
    """At least two labels, and with three or more no two closer than 0.14 decades (the
    finest tier's 5 -> 7), whatever the range."""
    for lo in np.geomspace(1e-9, 1e3, 37):
        for decades in (0.02, 0.1, 0.3, 0.5, 0.8, 1.0, 1.4, 2.0, 3.0, 5.0, 9.0, 20.0):
            ticks = plots._log_tick_values(lo, lo * 10**decades)
            assert len(ticks) >= 2, (lo, decades)
            assert all(lo * (1 - 1e-9) <= t <= lo * 10**decades * (1 + 1e-9) for t in ticks)
            if len(ticks) >= 3 and decades >= 0.3:
                assert np.min(np.diff(np.log10(ticks))) > 0.14, (lo, decades, ticks)
            assert len(ticks) <= 12, (lo, decades, ticks)
    assert plots._sci(2e-3) == "$2\\times10^{-3}$" and plots._sci(1e-4) == "$10^{-4}$"


def _diag(before, after):
    return {"regime": "fmsd", "contribution": None, "contribution_note": "not measured",
            "weight_change": {"targets": ["q", "k"], "relative": [[0.0, 1e-4], [2e-4, 0.0]],
                              "mask": [[False, True], [True, False]], "note": ""},
            "spectra": [{"layer": 0, "target": "k", "relative_change": 1e-4,
                         "before": before, "after": after}]}


def test_adaptation_chart_shows_the_pretrained_spectrum_where_it_coincides():
    before = list(np.geomspace(5.0, 0.05, 64))
    fig = adaptation_figure(_diag(before, before), title="Backbone adaptation: FMSD (w1)")
    spectrum = fig.axes[2]  # heatmap, its colorbar, then the spectra
    trained, pretrained = spectrum.get_lines()[:2]
    np.testing.assert_array_equal(trained.get_ydata(), pretrained.get_ydata())
    # The pretrained spectrum is drawn over the trained one, as markers the line cannot hide.
    assert pretrained.get_zorder() > trained.get_zorder()
    assert pretrained.get_marker() == "o" and pretrained.get_markerfacecolor() == "none"
    marked = pretrained.get_markevery()
    assert marked[0] == 0 and marked[-1] == 63 and len(marked) >= 20
    assert "they coincide at this scale" in spectrum.get_title()
    assert fig.get_suptitle().startswith("Backbone adaptation: FMSD (w1) — not measured")
    assert not too_small(fig)
    # Where the trained spectrum leaves the pretrained one, the pretrained values are marked.
    after = list(before[:-8]) + [v * 1.5 for v in before[-8:]]
    fig = adaptation_figure(_diag(before, after))
    pretrained = fig.axes[2].get_lines()[1]
    assert set(range(56, 64)) <= set(pretrained.get_markevery())
    assert "they differ: largest |σ − σ₀| / σ₀ = 5.0e-01" in fig.axes[2].get_title()
    assert fig.get_suptitle().startswith("Backbone adaptation: FMSD — ")


def test_plot_layer_scores_checks_shapes(tmp_path):
    scores, mask = _layer_scores(np.random.default_rng(3))
    with pytest.raises(ValueError, match="target_names"):
        plot_layer_scores(scores, ["q", "k"], mask, tmp_path / "a.png")
    with pytest.raises(ValueError, match="mask shape"):
        plot_layer_scores(scores, ["q", "k", "v", "out"], mask[:3], tmp_path / "a.png")
    with pytest.raises(ValueError, match="variance"):
        bad = {**scores, "variance": scores["variance"][:, :2]}
        plot_layer_scores(bad, ["q", "k", "v", "out"], mask, tmp_path / "a.png")


# ----------------------------------------------------------------------------------------
# demo report

FAMILIES = ["blend", "swap", "reenact", "noise"]


def _row(method, frame, video, note=""):
    """frame/video: AUC per family in FAMILIES order."""
    return DemoRow(
        method=method,
        results={
            f: {"frame_auc": a, "video_auc": b}
            for f, a, b in zip(FAMILIES, frame, video, strict=True)
        },
        command=(
            f"python -m fmsd_jax.main --config configs/demo.py:{method.lower()} "
            f"--workdir runs/demo/{method}"
        ),
        note=note,
    )


@pytest.fixture
def demo_rows():
    return [
        _row("FMSD", [0.99, 0.90, 0.85, 0.80], [1.00, 0.93, 0.88, 0.82], note="0.2M trainable"),
        _row("Effort", [0.99, 0.85, 0.80, 0.78], [1.00, 0.88, 0.83, 0.80]),  # FMSD better
        _row("LinearProbe", [0.95, 0.95, 0.90, 0.85], [0.96, 0.97, 0.92, 0.88]),  # FMSD worse
        _row("FullFT", [1.00, 0.93, 0.82, 0.75], [1.00, 0.91, 0.90, 0.81]),  # mixed
        _row("Near", [0.99, 0.901, 0.851, 0.799], [1.00, 0.93, 0.88, 0.82]),  # tie
    ]


def test_verdicts_are_computed(demo_rows):
    v = {x.baseline: x for x in compare_to_baselines(demo_rows, train_families=["blend"])}
    assert v["Effort"].families == ("swap", "reenact", "noise")
    assert v["Effort"].beats and v["Effort"].frame_wins == 3
    assert v["Effort"].ours_frame == pytest.approx(np.mean([0.90, 0.85, 0.80]))
    assert not v["LinearProbe"].beats and v["LinearProbe"].frame == -1
    assert v["LinearProbe"].video == -1
    # Mean frame AUC: 0.85 vs 0.8333 (+); video: 0.8767 vs 0.8733 (within 0.005: tie).
    assert not v["FullFT"].beats and v["FullFT"].frame == 1 and v["FullFT"].video == 0
    assert not v["Near"].beats and v["Near"].frame == 0 and v["Near"].video == 0
    # The training family never enters the comparison: making FMSD perfect there changes nothing.
    rows = [demo_rows[0]] + demo_rows[1:]
    rows[0] = _row("FMSD", [1.0, 0.90, 0.85, 0.80], [1.0, 0.93, 0.88, 0.82])
    assert compare_to_baselines(rows, train_families=["blend"])[0] == v["Effort"]
    with pytest.raises(ValueError, match="no row for our method"):
        compare_to_baselines(demo_rows[1:], train_families=["blend"])
    with pytest.raises(ValueError, match="no held-out family"):
        compare_to_baselines(demo_rows, train_families=FAMILIES)


def test_demo_report(tmp_path, demo_rows):
    charts = tmp_path / "charts"
    charts.mkdir()
    layer_png, roc_png = charts / "layer_scores.png", charts / "roc_fmsd.png"
    layer_png.write_bytes(PNG_MAGIC)
    roc_png.write_bytes(PNG_MAGIC)
    out = write_demo_report(
        tmp_path / "report.md",
        [r.__dict__ for r in demo_rows[:4]] + [demo_rows[4]],  # dicts are accepted too
        train_families=["blend"],
        layer_chart=layer_png,
        roc_charts={"FMSD": roc_png},
    )
    text = out.read_text()

    header, rows = _parse_md_table(text)
    assert header[0] == "method"
    assert header[1:3] == ["blend (train) · frame AUC", "blend (train) · video AUC"]
    assert "swap · frame AUC" in header and "swap · video AUC" in header
    assert header[-3:] == ["held-out mean · frame AUC", "held-out mean · video AUC",
                           "backbone contribution · val frame AUC [95 %]"]
    col = {h: i for i, h in enumerate(header)}
    table = {r[0]: r for r in rows}
    assert list(table) == ["FMSD", "Effort", "LinearProbe", "FullFT", "Near"]
    for row in demo_rows:
        for f in FAMILIES:
            tag = " (train)" if f == "blend" else ""
            assert (
                _num(table[row.method][col[f"{f}{tag} · frame AUC"]]) == row.results[f]["frame_auc"]
            )
            assert (
                _num(table[row.method][col[f"{f}{tag} · video AUC"]]) == row.results[f]["video_auc"]
            )
    assert _num(table["Effort"][col["held-out mean · video AUC"]]) == pytest.approx(
        np.mean([0.88, 0.83, 0.80]), abs=5e-5
    )

    assert "FMSD beats 1 of 4 baselines" in text
    assert "**FMSD beats Effort**" in text
    assert "**FMSD does not beat LinearProbe; LinearProbe is better**" in text
    assert "**FMSD does not clearly beat FullFT** (mixed)" in text
    assert "**FMSD does not beat Near** (tie)" in text
    # Links are relative to the report, so the workdir can move.
    assert "](charts/layer_scores.png)" in text and "](charts/roc_fmsd.png)" in text
    assert str(tmp_path) not in text
    for row in demo_rows:
        assert f"```bash\n{row.command}\n```" in text
    assert "0.2M trainable" in text


def test_demo_report_when_ours_loses_everywhere(tmp_path):
    rows = [
        _row("FMSD", [0.99, 0.60, 0.60, 0.60], [0.99, 0.60, 0.60, 0.60]),
        _row("Effort", [0.99, 0.70, 0.70, 0.70], [0.99, 0.70, 0.70, 0.70]),
    ]
    text = write_demo_report(tmp_path / "r.md", rows, train_families=["blend"]).read_text()
    assert "FMSD beats 0 of 1 baselines" in text
    assert "**FMSD does not beat Effort; Effort is better**" in text
    assert "beats Effort**" not in text


def test_demo_table_missing_family_is_na():
    rows = [
        _row("FMSD", [0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6]),
        DemoRow("Partial", {"blend": {"frame_auc": 0.9, "video_auc": 0.9}}, "cmd"),
    ]
    header, body = _parse_md_table(demo_table(rows, train_families=["blend"]))
    partial = dict(zip(header, body[1], strict=True))
    assert partial["swap · frame AUC"] == "n/a"
    assert partial["held-out mean · frame AUC"] == "n/a"
    with pytest.raises(ValueError, match="duplicate"):
        demo_table(rows + rows[:1], train_families=["blend"])


def test_layering_no_model_code_no_pyplot_no_jax():
    # Reports are regenerated from a workdir on any machine: importing them must not pull in
    # the model stack, JAX, or pyplot (which would pick a GUI backend in a user's session).
    # Asserted as absence, so a new leaf helper (stdlib only) does not break it.
    code = ("import json, sys, fmsd_jax.evaluators.result_files, fmsd_jax.evaluators.metrics, "
            "fmsd_jax.evaluators.plots; "
            "print(json.dumps(list(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    # the probe worked
    assert "fmsd_jax.evaluators.result_files" in loaded and "matplotlib.figure" in loaded
    heavy = [m for m in loaded if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "orbax")
             or m == "matplotlib.pyplot"
             or m.startswith(("fmsd_jax.model", "fmsd_jax.method", "fmsd_jax.data"))
             or m in ("fmsd_jax.modes.train", "fmsd_jax.run.rebuild", "fmsd_jax.modes.evaluate",
                      "fmsd_jax.parallel", "fmsd_jax.run.checkpoints")]
    assert heavy == [], heavy


def test_a_report_pointing_at_a_file_protects_it(tmp_path):
    row = tmp_path / "fmsd"
    row.mkdir()
    for name in ("roc.png", "results.json", "results.md", "roc.png.bak"):
        (row / name).write_text("x")
    (tmp_path / "report.md").write_text("ROC: [fmsd/roc.png](fmsd/roc.png); numbers "
                                        "`fmsd/results.json`\n")
    (row / "results.md").write_text("Chart: roc.png\n")
    assert result_files.reports_pointing_at(row / "roc.png") == [row / "results.md",
                                                                 tmp_path / "report.md"]
    assert result_files.reports_pointing_at(row / "roc.png", own=[row / "results.md"]) == [
        tmp_path / "report.md"]
    (tmp_path / "old.md").write_text("see fmsd/roc.png.bak and xfmsd/results.md\n")
    # a name inside another is not a reference to it
    assert result_files.reports_pointing_at(row / "results.md") == []
    with pytest.raises(errors.AlreadyExists, match=r"report.md points at .*fmsd/results.json; "
                       r"--mode evaluate would replace it.*--overwrite"):
        result_files.refuse_replacing_reported([row / "results.json", row / "results.md"],
                                               own=[row / "results.md"], what="--mode evaluate",
                                               allow="--overwrite")
    (tmp_path / "report.md").unlink()
    result_files.refuse_replacing_reported([row / "results.json", row / "roc.png"],
                                           own=[row / "results.md"], what="--mode evaluate",
                                           allow="--overwrite")  # nothing else points at them
