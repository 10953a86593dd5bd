"""The artifact-subspace ablation as people read it: a K × test-set table for results.md with
a one-sentence reading computed from the numbers, and a chart. No jax here (the records come
from evaluators/subspaces.py), so a report can be rendered from results.json alone.

The reading answers the method's claim, that the K subspaces capture different artifacts:
do different forgery families lean on different subspaces? Each subspace's *separation* on a
set is Δ on fakes − Δ on reals (how much its training widens the fake-logit gap between the
two); its standard error comes from the per-frame spread of Δ in each class (treating the
fake and real means as independent). When the subspace that separates most differs between
two sets, the difference of differences sep[a, X] − sep[b, X] − (sep[a, Y] − sep[b, Y]) is
compared with its standard error (the subspaces' errors combined as if independent, an
approximation: they are measured on the same frames); above two standard errors the sets
lean on different subspaces, below it the difference is within noise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fmsd_jax.evaluators.plots import SMALL_FONT, save_figure
from fmsd_jax.evaluators.result_files import fmt, md_escape

HEADING = "## What each artifact subspace responds to"
Z_SPECIALISED = 2.0  # standard errors a difference of differences must exceed


def _measured(table: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {name: rec for name, rec in table.items() if "skipped" not in rec}


def separation(rec: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(K,) Δ fake − Δ real of each subspace on one set and its (K,) standard error."""
    sep, se = [], []
    for s in rec["subspaces"]:
        sep.append(_num(s["delta_fake"]) - _num(s["delta_real"]))
        var = 0.0
        for key, n in (("delta_fake_sd", rec["num_fake"]), ("delta_real_sd", rec["num_real"])):
            sd = _num(s[key])
            var += sd * sd / n if n > 1 else math.nan
        se.append(math.sqrt(var) if math.isfinite(var) else math.nan)
    return np.asarray(sep, float), np.asarray(se, float)


def _num(value: float | None) -> float:
    """A record's number as a float; NaN for None (results.json stores NaN as null)."""
    return math.nan if value is None else float(value)


def reading(table: Mapping[str, Mapping[str, Any]]) -> str:
    """One sentence: do the subspaces respond differently to different families?"""
    measured = {n: r for n, r in _measured(table).items()
                if np.all(np.isfinite(separation(r)[0]))}
    if not measured:
        return "No test set holds both real and fake frames, so no subspace could be compared."
    seps = {n: separation(r) for n, r in measured.items()}
    leader = {n: int(np.argmax(s)) for n, (s, _) in seps.items()}
    if len(measured) == 1:
        (name, (sep, _)), = seps.items()
        k = leader[name]
        return (f"With one test set, whether the subspaces specialise by forgery family cannot "
                f"be told; on {name} subspace {k} separates fakes from reals most "
                f"(Δ fake − Δ real {sep[k]:+.3f}).")
    if len(set(leader.values())) == 1:
        k = next(iter(leader.values()))
        values = ", ".join(f"{n} {seps[n][0][k]:+.3f}" for n in measured)
        return (f"Subspace {k} separates fakes from reals most on every test set ({values}): "
                "no sign that the subspaces specialise by forgery family.")
    best = None
    for x, y in combinations(measured, 2):
        a, b = leader[x], leader[y]
        if a == b:
            continue
        (sx, ex), (sy, ey) = seps[x], seps[y]
        diff = (sx[a] - sx[b]) - (sy[a] - sy[b])
        se = math.sqrt(ex[a] ** 2 + ex[b] ** 2 + ey[a] ** 2 + ey[b] ** 2)
        z = diff / se if se > 0 else math.inf
        if best is None or z > best[0]:
            best = (z, x, y, a, b)
    z, x, y, a, b = best
    lead = f"subspace {a} separates most on {x}, subspace {b} on {y}"
    if z > Z_SPECIALISED:
        return (f"The subspaces respond differently to different forgery families: {lead}, "
                f"a difference of {z:.1f} standard errors.")
    shown_z = "an unbounded number of" if math.isinf(z) else f"{z:.1f}"
    return (f"The leading subspace differs between families ({lead}), but by {shown_z} "
            f"standard errors, within noise: no evidence that the subspaces specialise.")


def subspace_markdown(table: Mapping[str, Mapping[str, Any]]) -> str:
    """The results.md section: K rows × one column per test set, then the reading."""
    if not table:
        return ""
    measured = _measured(table)
    if not measured:
        reason = next(iter(table.values()))["skipped"]
        return f"{HEADING}\n\nNot measured: {reason}.\n"
    names = list(measured)
    k_total = max(int(r["num_subspaces"]) for r in measured.values())
    split = next(iter(measured.values()))["split"]
    lines = [
        HEADING, "",
        f"Each subspace's training undone in turn (its U_k, s_k, V_k back to the pretrained "
        f"singular triplets in every adapted layer; the head stays trained), on the {split} "
        f"split. Cell: mean change of the fake logit (l1 − l0) on fake frames / on real frames "
        f"(trained minus undone: positive pushes towards 'fake') · frame AUC with only that "
        f"subspace trained.", "",
        "| | " + " | ".join(md_escape(n) for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for k in range(k_total):
        cells = []
        for n in names:
            subs = measured[n]["subspaces"]
            if k >= len(subs):
                cells.append("n/a")
                continue
            s = subs[k]
            cells.append(f"{_signed(s['delta_fake'])} / {_signed(s['delta_real'])} · "
                         f"{fmt(s['only_frame_auc'], 3)}")
        lines.append(f"| subspace {k} | " + " | ".join(cells) + " |")
    for label, key in (("all trained (AUC)", "trained_frame_auc"),
                       ("none trained (AUC)", "none_trained_frame_auc")):
        lines.append(f"| {label} | " + " | ".join(fmt(measured[n][key], 3) for n in names)
                     + " |")
    counts = ", ".join(f"{n}: {measured[n]['num_fake']} fake / {measured[n]['num_real']} real"
                       for n in names)
    skipped = [n for n in table if n not in measured]
    lines += ["", f"Frames: {counts}."]
    if skipped:
        lines.append(f"Not measured on {', '.join(skipped)}: {table[skipped[0]]['skipped']}.")
    lines += ["", reading(table), ""]
    return "\n".join(lines)


def _signed(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.3f}"


def _column(subs: list[Mapping[str, Any] | None], key: str) -> np.ndarray:
    return np.asarray([s[key] if s and s[key] is not None else np.nan for s in subs], float)


def subspace_figure(table: Mapping[str, Mapping[str, Any]]) -> Figure:
    """The figure `plot_subspaces` saves."""
    measured = _measured(table)
    if not measured:
        raise ValueError("plot_subspaces needs at least one measured test set")
    names = list(measured)
    k_total = max(int(r["num_subspaces"]) for r in measured.values())
    x = np.arange(len(names))
    width = 0.8 / k_total
    fig = Figure(figsize=(max(6.0, 1.6 * len(names) * 2 + 2), 4.2), layout="constrained")
    ax_d, ax_a = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for k in range(k_total):
        off = x - 0.4 + width * (k + 0.5)
        subs = [measured[n]["subspaces"][k] if k < len(measured[n]["subspaces"]) else None
                for n in names]
        fake, real, sd, only = (_column(subs, key) for key in
                                ("delta_fake", "delta_real", "delta_fake_sd", "only_frame_auc"))
        se_f = sd / np.sqrt([max(measured[n]["num_fake"], 1) for n in names])
        ax_d.bar(off, fake, width * 0.9, color=f"C{k}", label=f"subspace {k}", yerr=se_f,
                 error_kw={"linewidth": 0.8})
        ax_d.scatter(off, real, marker="_", s=120, color="black", zorder=3,
                     label="on real frames" if k == 0 else None)
        ax_a.bar(off, only, width * 0.9, color=f"C{k}",
                 label=f"only subspace {k}")
    for i, n in enumerate(names):
        for key, style, label in (("trained_frame_auc", "-", "all trained"),
                                  ("none_trained_frame_auc", ":", "none trained")):
            ax_a.hlines(_num(measured[n][key]), i - 0.45, i + 0.45, colors="black",
                        linestyles=style, label=label if i == 0 else None)
    ax_d.axhline(0.0, color="0.5", linewidth=0.8)
    ax_d.set_title("Δ fake logit when the subspace is undone\n(bars: fake frames ± s.e.; "
                   "dash: real frames)", fontsize=10)
    ax_d.set_ylabel("trained − undone (logit)")
    ax_a.set_title("frame AUC with only one subspace trained", fontsize=10)
    ax_a.set_ylabel("frame AUC")
    aucs = [v for r in measured.values() for v in
            [r["trained_frame_auc"], r["none_trained_frame_auc"],
             *(s["only_frame_auc"] for s in r["subspaces"])] if v is not None and math.isfinite(v)]
    lo = min(aucs) if aucs else 0.5
    ax_a.set_ylim(max(0.0, min(0.5, lo) - 0.05), 1.0)
    for ax in (ax_d, ax_a):
        ax.set_xticks(x, names, fontsize=SMALL_FONT + 1)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=SMALL_FONT, loc="best")
    return fig


def plot_subspaces(table: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Two panels per test set: each subspace's Δ fake logit (fakes, reals) and its only-k
    AUC beside the all-trained and none-trained AUCs; written atomically (plots.save_figure)."""
    return save_figure(subspace_figure(table), path)
