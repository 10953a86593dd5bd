"""The demo's report.md: the methods side by side on the held-out families, the verdict
against the baselines, the sweep table and what each row's backbone contributed."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections as mlc
import numpy as np

from fmsd_jax import atomic
from fmsd_jax.demo import SWEEP_DIR, SWEEP_JSON, decision_section
from fmsd_jax.demo.rows import CONFIG_FILE, ROW_NAMES, contribution, row_command
from fmsd_jax.evaluators.result_files import fmt, held_out_mean, md_escape, to_float
from fmsd_jax.run import workdir_files

# --------------------------------------------------------------------------------------
# demo report


@dataclass(frozen=True)
class DemoRow:
    """One trained method: its per-family metrics and the command that produced them."""

    method: str
    results: Mapping[str, Mapping[str, Any]]
    command: str
    note: str = ""
    # Validation frame AUC of the trained detector minus that of the pretrained backbone with
    # the trained head (None: not measured, e.g. the linear probe, whose backbone is frozen).
    contribution: float | None = None
    contribution_ci: tuple[float, float] | None = None  # its 95 % interval, when measured
    contribution_videos: int | None = None  # validation videos it was measured on


def _videos(rows: Sequence[DemoRow]) -> str:
    n = {r.contribution_videos for r in rows if r.contribution_videos}
    return f", {n.pop()} videos" if len(n) == 1 else ""


@dataclass(frozen=True)
class Verdict:
    """How our method compares with one baseline on the held-out families."""

    baseline: str
    families: tuple[str, ...]
    ours_frame: float
    base_frame: float
    ours_video: float
    base_video: float
    frame_wins: int
    frame_losses: int
    video_wins: int
    video_losses: int
    n_frame: int
    n_video: int
    tie_tol: float

    @staticmethod
    def _cmp(ours: float, base: float, tol: float) -> int:
        if not (math.isfinite(ours) and math.isfinite(base)):
            return 0
        d = ours - base
        return 1 if d > tol else (-1 if d < -tol else 0)

    @property
    def frame(self) -> int:
        """+1 better, -1 worse, 0 tie/undefined on mean held-out frame AUC."""
        return self._cmp(self.ours_frame, self.base_frame, self.tie_tol)

    @property
    def video(self) -> int:
        return self._cmp(self.ours_video, self.base_video, self.tie_tol)

    @property
    def beats(self) -> bool:
        """Better on mean held-out AUC at both levels (a level that is undefined is skipped)."""
        levels = [
            c
            for c, o, b in (
                (self.frame, self.ours_frame, self.base_frame),
                (self.video, self.ours_video, self.base_video),
            )
            if math.isfinite(o) and math.isfinite(b)
        ]
        return bool(levels) and all(c > 0 for c in levels)


def _rows(rows: Sequence[DemoRow | Mapping[str, Any]]) -> list[DemoRow]:
    out = []
    for r in rows:
        out.append(r if isinstance(r, DemoRow) else DemoRow(**dict(r)))
    names = [r.method for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate method names in demo rows: {names}")
    return out


def _families(rows: Sequence[DemoRow], train_families: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        for f in r.results:
            if f not in seen:
                seen.append(f)
    return [f for f in seen if f in train_families] + [f for f in seen if f not in train_families]


def _metric(row: DemoRow, family: str, key: str) -> float:
    m = row.results.get(family)
    return to_float(m.get(key)) if m is not None else math.nan


def compare_to_baselines(
    rows: Sequence[DemoRow | Mapping[str, Any]],
    *,
    ours: str = "FMSD",
    train_families: Sequence[str],
    tie_tol: float = 0.005,
) -> list[Verdict]:
    """Compare ``ours`` with every other row on the families it was not trained on.

    Means are over the held-out families where both methods have a value, so a family one
    method was not evaluated on cannot tilt the comparison. Differences within ``tie_tol``
    (AUC) count as ties: a single-seed demo cannot resolve them.
    """
    all_rows = _rows(rows)
    by_name = {r.method: r for r in all_rows}
    if ours not in by_name:
        raise ValueError(f"no row for our method {ours!r}; rows: {list(by_name)}")
    me = by_name[ours]
    held = [f for f in _families(all_rows, train_families) if f not in train_families]
    if not held:
        raise ValueError(
            f"no held-out family: every evaluated family is a training family {train_families}"
        )
    verdicts = []
    for base in all_rows:
        if base.method == ours:
            continue
        per_level: dict[str, tuple[float, float, int, int, int]] = {}
        for key in ("frame_auc", "video_auc"):
            pairs = [(_metric(me, f, key), _metric(base, f, key)) for f in held]
            pairs = [(o, b) for o, b in pairs if math.isfinite(o) and math.isfinite(b)]
            wins = sum(o - b > tie_tol for o, b in pairs)
            losses = sum(b - o > tie_tol for o, b in pairs)
            o_mean = float(np.mean([o for o, _ in pairs])) if pairs else math.nan
            b_mean = float(np.mean([b for _, b in pairs])) if pairs else math.nan
            per_level[key] = (o_mean, b_mean, wins, losses, len(pairs))
        fo, fb, fw, fl, fn = per_level["frame_auc"]
        vo, vb, vw, vl, vn = per_level["video_auc"]
        verdicts.append(
            Verdict(base.method, tuple(held), fo, fb, vo, vb, fw, fl, vw, vl, fn, vn, tie_tol)
        )
    return verdicts


def _verdict_sentence(v: Verdict, ours: str) -> str:
    def level(name: str, o: float, b: float, wins: int, losses: int, n: int, c: int) -> str:
        if n == 0:
            return f"{name} AUC: not available"
        word = {1: "higher", -1: "lower", 0: f"tied within ±{v.tie_tol:g}"}[c]
        return (
            f"{name} AUC {fmt(o, 3)} vs {fmt(b, 3)} ({o - b:+.3f}, {word}; better on "
            f"{wins}, worse on {losses} of {n} families)"
        )

    detail = "; ".join(
        [
            level("frame", v.ours_frame, v.base_frame, v.frame_wins, v.frame_losses, v.n_frame,
                  v.frame),
            level("video", v.ours_video, v.base_video, v.video_wins, v.video_losses, v.n_video,
                  v.video),
        ]
    )  # fmt: skip
    if v.beats:
        head = f"**{ours} beats {v.baseline}** on the held-out families"
    elif v.frame < 0 and v.video <= 0 or v.video < 0 and v.frame <= 0:
        head = (
            f"**{ours} does not beat {v.baseline}; {v.baseline} is better** "
            "on the held-out families"
        )
    elif v.frame > 0 or v.video > 0:
        head = f"**{ours} does not clearly beat {v.baseline}** (mixed) on the held-out families"
    else:
        head = f"**{ours} does not beat {v.baseline}** (tie) on the held-out families"
    return f"{head}: {detail}."


def demo_table(
    rows: Sequence[DemoRow | Mapping[str, Any]], *, train_families: Sequence[str]
) -> str:
    """Method × test-family Markdown table, frame AUC and video AUC as separate sub-columns."""
    all_rows = _rows(rows)
    fams = _families(all_rows, train_families)
    header = ["method"]
    for f in fams:
        tag = " (train)" if f in train_families else ""
        header += [f"{md_escape(f)}{tag} · frame AUC", f"{md_escape(f)}{tag} · video AUC"]
    header += ["held-out mean · frame AUC", "held-out mean · video AUC",
               "backbone contribution · val frame AUC [95 %]"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for r in all_rows:
        cells = [md_escape(r.method)]
        for f in fams:
            cells += [fmt(_metric(r, f, "frame_auc")), fmt(_metric(r, f, "video_auc"))]
        for key in ("frame_auc", "video_auc"):
            mean, n, of = held_out_mean(r.results, key, train_families, fams)
            cells.append(fmt(mean) + ("" if n == of else "†") if n else "n/a")
        c, ci = r.contribution, r.contribution_ci
        cells.append("n/a" if c is None or not math.isfinite(c) else f"{c:+.4f}" + (
            f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def below_chance_sentences(
    rows: Sequence[DemoRow | Mapping[str, Any]], *, train_families: Sequence[str]
) -> list[str]:
    """One sentence per held-out family on which some method's frame AUC is below 0.5: what
    that means, for which methods it holds, and whether the video level agrees."""
    all_rows = _rows(rows)
    out = []
    for fam in _families(all_rows, train_families):
        if fam in train_families:
            continue
        frame = {r.method: _metric(r, fam, "frame_auc") for r in all_rows}
        video = {r.method: _metric(r, fam, "video_auc") for r in all_rows}
        below = [m for m, v in frame.items() if math.isfinite(v) and v < 0.5]
        if not below:
            continue
        finite = [v for v in frame.values() if math.isfinite(v)]
        lo, hi = min(finite), max(finite)
        who = (
            f"every method ({len(below)} of {len(all_rows)})"
            if len(below) == len(all_rows)
            else f"{len(below)} of {len(all_rows)} methods ({', '.join(below)}; not "
            + ", ".join(m for m in frame if m not in below)
            + ")"
        )
        v_below = [m for m in below if math.isfinite(video[m]) and video[m] < 0.5]
        v_text = (
            "the video level agrees for all of them"
            if len(v_below) == len(below)
            else f"at video level {len(v_below)} of them stay below 0.5"
        )
        out.append(
            f"**{md_escape(fam)} is below chance for {who}**: frame AUC "
            f"{fmt(lo, 3)}–{fmt(hi, 3)}; {v_text}. An AUC under 0.5 means the ranking is "
            f"inverted: the detector gives {fam}'s fakes a *lower* fake score than its real "
            f"frames, so what it learned to call fake on {', '.join(train_families)} points the "
            f"other way on this artifact (a flipped score would reach {fmt(1 - hi, 3)}–"
            f"{fmt(1 - lo, 3)}, but nothing in training can choose that sign)."
        )
    return out


def sweep_table(
    points: Sequence[Mapping[str, Any]], chosen: Mapping[str, float], *, metric: str = "frame_auc"
) -> str:
    """The learning-rate sweep as Markdown: one row per method, one column per backbone lr,
    each cell the best validation ``metric`` (and the step it was reached at), the chosen lr
    marked. Only validation numbers exist here: the sweep never evaluates a test set."""
    lrs = sorted({float(p["lr"]) for p in points})
    methods = list(dict.fromkeys(str(p["method"]) for p in points))
    by = {(str(p["method"]), float(p["lr"])): p for p in points}
    header = ["method", "head lr"] + [f"lr {lr:g}" for lr in lrs] + ["chosen lr"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for m in methods:
        head = next(float(p["head_lr"]) for p in points if p["method"] == m)
        cells = [md_escape(m), f"{head:g}"]
        for lr in lrs:
            p = by.get((m, lr))
            if p is None:
                cells.append("")
                continue
            best = p["best"]
            text = f"{fmt(to_float(best.get(metric)))} @{best.get('step')}"
            if p.get("contribution") is not None:
                text += f" (Δ {float(p['contribution']):+.3f})"
            cells.append(f"**{text}**" if chosen.get(m) == lr else text)
        cells.append(f"{chosen[m]:g}" if m in chosen else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return (
        "\n".join(lines)
        + f"\n\nCells: best validation {metric} of the run @ the step it was reached at "
        "(the checkpoint that run would keep) and, where measured, (Δ the backbone's "
        "contribution: validation frame AUC minus that of the pretrained backbone with the "
        "same head); bold: the chosen lr.\n"
    )


def _contribution_note(r: DemoRow, tol: float) -> str:
    """Words for one row's backbone contribution: noise is its 95 % interval containing 0
    when one was measured, else |contribution| <= tol."""
    c, ci = float(r.contribution), r.contribution_ci
    span = f"95 % interval [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else f"tolerance ±{tol:g}"
    within = ci[0] <= 0.0 <= ci[1] if ci else abs(c) <= tol
    if within and abs(c) <= tol:
        return (
            f"- **{md_escape(r.method)}: the backbone did not adapt; the head did the work** "
            f"(contribution {c:+.4f}, {span}, contains 0)."
        )
    if within:  # a large estimate on too few validation videos to tell it from zero
        return (
            f"- {md_escape(r.method)}: contribution {c:+.4f}, but its {span} contains 0: the "
            "validation split is too small to tell it from zero."
        )
    sign = "adds" if c > 0 else "loses"
    return (
        f"- {md_escape(r.method)}: the adapted backbone {sign} {abs(c):.4f} validation frame "
        f"AUC against the pretrained one with the same head ({span})."
    )


def write_demo_report(
    path: str | os.PathLike[str],
    rows: Sequence[DemoRow | Mapping[str, Any]],
    *,
    train_families: Sequence[str],
    ours: str = "FMSD",
    layer_chart: str | os.PathLike[str] | None = None,
    roc_charts: Mapping[str, str | os.PathLike[str]] | None = None,
    title: str = "FMSD demo: cross-forgery generalisation",
    intro: Sequence[str] = (),
    tie_tol: float = 0.005,
    contribution_tol: float = 0.01,
    sections: Sequence[str] = (),
) -> Path:
    """Write the demo's ``report.md`` and return its path.

    The verdict against each baseline is computed from ``rows`` (``compare_to_baselines``),
    never written by hand, so a run where FMSD loses says so; so are the backbone-contribution
    notes (``contribution_tol``: the half-width called "no adaptation") and the sentence on
    each held-out family some method scores below chance on. ``sections`` are extra Markdown
    blocks placed before the reproduce commands. Chart paths are linked relative to the report
    so the workdir can be moved or published as is.
    """
    out = Path(path)
    all_rows = _rows(rows)
    verdicts = compare_to_baselines(
        all_rows, ours=ours, train_families=train_families, tie_tol=tie_tol
    )
    held = verdicts[0].families if verdicts else ()
    contribution_notes = [
        _contribution_note(r, contribution_tol)
        for r in all_rows
        if r.contribution is not None and math.isfinite(r.contribution)
    ]

    def link(p: str | os.PathLike[str]) -> str:
        return Path(os.path.relpath(Path(p).resolve(), out.parent.resolve())).as_posix()

    md = [f"# {title}", ""]
    md += [*intro, ""] if intro else []
    md += [
        f"Trained on: {', '.join(train_families)}. "
        f"Held out (not seen in training): {', '.join(held) or 'none'}.",
        "",
        "## Results",
        "",
        "AUC per test family. Frame AUC ranks single frames; video AUC ranks videos by their mean "
        "frame probability (DeepfakeBench's definitions). The two are separate columns and are "
        "not comparable with each other.",
        "",
        demo_table(all_rows, train_families=train_families),
    ]
    if any("†" in line for line in md[-1].splitlines()[2:]):
        md += ["† mean over the held-out families where the metric is defined.", ""]
    md += [
        "Backbone contribution: validation frame AUC (the validation split of "
        f"{', '.join(train_families)}, the checkpoint-selection split{_videos(all_rows)}) of "
        "the trained detector minus that of the *pretrained* backbone carrying the same "
        "trained head; the interval is a paired bootstrap over validation videos. Near zero, "
        "the head did the work and the "
        "method's adaptation did not act; n/a where the backbone is frozen or it was not "
        "measured.",
        "",
    ]
    md += [*contribution_notes, ""] if contribution_notes else []
    chance = below_chance_sentences(all_rows, train_families=train_families)
    md += [*(f"- {c}" for c in chance), ""] if chance else []
    md += ["## Does FMSD beat the baselines?", ""]
    if verdicts:
        n_beaten = sum(v.beats for v in verdicts)
        md.append(
            f"{ours} beats {n_beaten} of {len(verdicts)} baselines on the held-out families "
            f"(higher mean AUC at both frame and video level by more than {tie_tol:g})."
        )
        md.append("")
        md += [f"- {_verdict_sentence(v, ours)}" for v in verdicts]
    else:
        md.append("No baseline rows were given.")
    md.append("")
    if layer_chart is not None or roc_charts:
        md += ["## Charts", ""]
        if layer_chart is not None:
            md += [
                f"Layer scores used by {ours}'s forgery-aware masking (selected layers boxed): "
                f"[{link(layer_chart)}]({link(layer_chart)})",
                "",
                f"![layer scores]({link(layer_chart)})",
                "",
            ]
        for name, p in (roc_charts or {}).items():
            md += [
                f"ROC curves, {md_escape(name)}: [{link(p)}]({link(p)})",
                "",
                f"![ROC {name}]({link(p)})",
                "",
            ]
    for section in sections:
        md += [section, ""]
    md += ["## Reproduce", "", "Each row comes from one command:", ""]
    for r in all_rows:
        label = f"**{r.method}**" + (f" — {r.note}" if r.note else "")
        md += [label, "", "```bash", r.command, "```", ""]
    atomic.write_text(out, "\n".join(md))
    return out


def backend_name() -> str:
    import jax

    return f"{jax.default_backend()} ({jax.device_count()} device(s))"


def _fmt_load(load: Mapping[str, Any]) -> str:
    s, e = load["start"], load["end"]
    return (f"1-min load average {s[0]:.1f} at start and {e[0]:.1f} at the end on "
            f"{load['cpus']} CPUs")


def write_report(cfg: mlc.ConfigDict, workdir: Path, results: Mapping[str, dict],
                 backbone: Mapping[str, Any], timing_record: Mapping[str, Any]) -> Path:
    """WORKDIR/report.md through `write_demo_report`, with how the numbers were made."""
    methods = list(cfg.demo.methods)
    rows = [DemoRow(method=ROW_NAMES[m], results=results[m],
                    command=row_command(cfg, m, workdir / m), note=_row_note(cfg, m),
                    **contribution(workdir / m))
            for m in methods]
    p = backbone.get("params", {})
    hist = backbone.get("history") or [{}]
    knn = backbone.get("knn_identity_accuracy") or {}
    timing = timing_record["timing"]
    reused = set(timing_record.get("skipped", ()))  # their seconds are a skip, not the work
    intro = [
        "Everything here was produced offline on this machine by "
        f"`python -m fmsd_jax.main --config {CONFIG_FILE}"
        f"{':' + cfg.demo.variant if cfg.demo.variant else ''} --workdir {workdir}`.",
        "",
        f"**Data.** The synthetic cross-forgery benchmark (size `{cfg.demo.data_size}`, seed "
        f"{cfg.demo.data_seed}, {cfg.data.image_size} px): real 'videos' are slow pans over "
        "photographs bundled with scikit-image and matplotlib; each dataset's fakes carry one "
        "artifact family (SynBlend: blended face-swap-like patch, SynUpsample: "
        "down/up-sampled region, SynAutoencode: autoencoder-reconstructed region, SynSplice: "
        "region from another photo). Train, validation and test use disjoint photographs.",
        "",
        f"**Backbone.** A CLIP-shaped ViT (width {p.get('width')}, {p.get('layers')} layers, "
        f"{p.get('heads')} heads, patch {p.get('patch_size')}, quick_gelu) pretrained by "
        f"SimCLR for {p.get('steps')} steps on crops of the {backbone.get('num_train_photos')} "
        "real *training* photographs only (no fake frame, no validation or test photo), saved "
        "as a Hugging Face CLIP `model.safetensors` and loaded by every row through "
        "`load_clip_vision`, as real CLIP weights are. NT-Xent loss "
        f"{hist[0].get('loss', float('nan')):.3f} → {hist[-1].get('loss', float('nan')):.3f}; "
        "1-NN accuracy of telling which unseen (validation) photograph an augmented crop comes "
        f"from: {knn.get('init', float('nan')):.3f} at initialisation → "
        f"{knn.get('pretrained', float('nan')):.3f} pretrained (chance "
        f"{backbone.get('knn_chance') or float('nan'):.3f}).",
        "",
        "**Protocol.** Every row trains on SynBlend only, with the same data, steps "
        f"({cfg.train.total_steps} at batch {cfg.train.batch_size}), augmentation and seed; "
        "the checkpoint is chosen by frame AUC on SynBlend's *validation* split. "
        f"Hyper-parameters (listed under Reproduce) are those of `{CONFIG_FILE}`, whose "
        "docstring records how they were chosen: the backbone learning rates by one "
        "sweep scored on SynBlend's validation split only (see *Learning rates* below), "
        "never by a held-out score; nothing was tuned on SynUpsample, SynAutoencode or "
        "SynSplice. One seed: differences of a few hundredths are within run-to-run noise "
        f"on a test set this small ({_test_size(results)}).",
        "",
        "**Sources.** Each row's numbers are its own results file: "
        + ", ".join(f"{ROW_NAMES[m]} `{m}/{workdir_files.RESULTS_JSON}`" for m in methods)
        + " (a later `--mode evaluate` of a row refuses to replace them under this report).",
        "",
        "**Time.** " + ", ".join(f"{k} reused (done by an earlier run)" if k in reused
                                 else f"{k} {v:.0f}s" for k, v in timing.items())
        + f" ({_fmt_load(timing_record['load'])}; the machine may have been shared; "
        "demo_timing.json also holds each stage's CPU seconds and load average).",
    ]
    layer_chart = workdir / "fmsd" / workdir_files.LAYER_SCORES_PNG
    roc = {ROW_NAMES[m]: workdir / m / workdir_files.ROC_PNG for m in methods
           if (workdir / m / workdir_files.ROC_PNG).exists()}
    return write_demo_report(
        workdir / "report.md", rows, train_families=list(cfg.data.train_dataset),
        ours=ROW_NAMES["fmsd"], layer_chart=layer_chart if layer_chart.exists() else None,
        roc_charts=roc, intro=intro, sections=[
            _lr_section(cfg, workdir),
            decision_section.section({ROW_NAMES[m]: (workdir / m, results[m]) for m in methods},
                                     list(cfg.data.train_dataset))])


def _test_size(results: Mapping[str, dict]) -> str:
    """'16 videos (128 frames) per family', from the results themselves."""
    sizes = {(int(r.get("num_videos") or 0), int(r.get("num_frames") or 0))
             for res in results.values() for r in res.values()}
    if len(sizes) != 1:
        return "test sets of " + ", ".join(f"{v} videos ({f} frames)" for v, f in sorted(sizes))
    (v, f), = sizes
    return f"{v} videos ({f} frames) per family"


def _lr_section(cfg: mlc.ConfigDict, workdir: Path) -> str:
    """The learning rates every row used, and where they came from (the sweep's table when
    WORKDIR/sweep/sweep.json exists, else the config's docstring)."""
    lines = ["## Learning rates", "",
             "| method | backbone lr | head lr |", "|---|---:|---:|"]
    for m in cfg.demo.methods:
        o = cfg.demo.optim[m]
        lr = "— (frozen)" if m == "linear_probe" else f"{o.lr:g}"
        lines.append(f"| {ROW_NAMES[m]} | {lr} | {o.head_lr:g} |")
    lines.append("")
    sweep = workdir / SWEEP_DIR / SWEEP_JSON
    how = (f"Chosen by `{CONFIG_FILE}:sweep`: for every method that trains a backbone, the same "
           f"grid of backbone lrs ({', '.join(f'{x:g}' for x in cfg.demo.sweep.lrs)}) at one "
           "head lr, each run scored by its best frame AUC on SynBlend's *validation* split; no "
           "test set is evaluated during the sweep.")
    if sweep.is_file():
        rec = json.loads(sweep.read_text())
        lines += [how + " This workdir's sweep:", "",
                  sweep_table(rec["points"], rec["chosen"], metric=rec["metric"])]
        mismatch = [m for m, lr in rec["chosen"].items()
                    if m in cfg.demo.optim and not math.isclose(cfg.demo.optim[m].lr, lr)]
        if mismatch:
            lines.append(f"Note: this sweep chose other rates than the rows used for "
                         f"{', '.join(ROW_NAMES[m] for m in mismatch)}; the rows use "
                         f"`{CONFIG_FILE}`'s values.")
    else:
        lines.append(how + f" The table and its command are in `{CONFIG_FILE}`'s docstring.")
    return "\n".join(lines)


def _row_note(cfg: mlc.ConfigDict, method: str) -> str:
    o = cfg.demo.optim[method]
    m = cfg.method
    what = {
        "fmsd": f"K={m.num_subspaces} artifact subspaces of rank {m.rank} on the top "
                f"{m.mask.top_k} layers by forgery-aware masking, λ_orth={m.lambda_orth}, "
                f"λ_spec={m.lambda_spec}",
        "effort": "K=1, d=1 on every q/k/v/out projection, no mask, CE only",
        "full": "every backbone parameter trains",
        "linear_probe": "frozen backbone, only the head trains",
    }[method]
    return f"{what}; lr {o.lr:g}, head lr {o.head_lr:g}"
