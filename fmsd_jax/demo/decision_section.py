"""The demo report's "From a score to a decision" section: per method, what the threshold a
user would set on the training family's validation split does on the held-out families,
whether the validation temperature made P(fake) more trustworthy there, and (FMSD) what each
artifact subspace responds to. Every number is read from the rows' own results.json and
decision.json; every sentence is computed from them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fmsd_jax import atomic
from fmsd_jax.evaluators import subspace_report
from fmsd_jax.evaluators.result_files import fmt, md_escape, nanmean, pct, to_float
from fmsd_jax.run import workdir_files

POINT = "fpr@0.05"  # the operating point the demo reports (issue 22: 5 % false alarms)


def _mean(values: Sequence[Any]) -> float:
    return nanmean([to_float(v) for v in values])[0]


def section(rows: Mapping[str, tuple[Path, Mapping[str, Mapping[str, Any]]]],
            train_families: Sequence[str], level: str = "frame") -> str:
    """`rows`: method name -> (its workdir, its results as read from results.json)."""
    held = [f for f in next(iter(rows.values()))[1] if f not in train_families]
    train = ", ".join(train_families)
    md = ["## From a score to a decision", "",
          f"A deployment sets its threshold where it has labels: the {POINT[4:]} false-alarm "
          f"({POINT}) threshold of each method is chosen on the validation split of {train} "
          f"({level} level, on the calibrated P(fake)) and then used unchanged on the held-out "
          "families. TPR: share of fakes caught; FPR: share of real frames flagged, against "
          f"the {float(POINT[4:]):.0%} budget set on validation; oracle: the TPR the same "
          "budget gives when chosen on that family itself (no deployment has it).", ""]
    header = ["method", "T"] + [f"{md_escape(f)} TPR / FPR (oracle TPR)" for f in held]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * len(held)]
    over: list[str] = []
    for name, (workdir, results) in rows.items():
        rule = atomic.read_json(Path(workdir) / workdir_files.DECISION_JSON)
        cells = [md_escape(name), f"{to_float(rule['temperature']):.3g}"]
        for f in held:
            p = (results[f].get("operating_points") or {}).get(level, {}).get(POINT)
            if not p:
                cells.append("n/a")
                continue
            cells.append(f"{pct(p['tpr'], 0)} / {pct(p['fpr'], 0)} ({pct(p['oracle_tpr'], 0)})")
            if to_float(p["fpr"]) > float(POINT[4:]):
                over.append(f"{name} on {f} ({pct(p['fpr'], 0)})")
        md.append("| " + " | ".join(cells) + " |")
    md += ["", ("Over the validation budget on a held-out family: " + ", ".join(over) + "."
                if over else "No method exceeded its validation false-alarm budget on a "
                             "held-out family."), ""]
    md += ["Calibration on the held-out families (mean over them; ECE: 15 equal-width bins of "
           "P(fake)), before and after each method's validation temperature:", "",
           "| method | ECE before | ECE after | Brier before | Brier after |",
           "|---|---:|---:|---:|---:|"]
    better = []
    for name, (_, results) in rows.items():
        cal = [results[f]["calibration"] for f in held if results[f].get("calibration")]
        b = _mean([c["before"]["ece"] for c in cal])
        a = _mean([c["after"]["ece"] for c in cal])
        md.append(f"| {md_escape(name)} | {fmt(b)} | {fmt(a)} | "
                  f"{fmt(_mean([c['before']['brier'] for c in cal]))} | "
                  f"{fmt(_mean([c['after']['brier'] for c in cal]))} |")
        if math.isfinite(a) and math.isfinite(b):
            better.append(a < b)
    md += ["", f"The validation temperature lowered the held-out ECE for {sum(better)} of "
               f"{len(better)} methods" + (": a temperature fitted on one forgery family does "
                                           "not transfer to all others." if not all(better)
                                           else "."), ""]
    return "\n".join(md)


def subspace_section(name: str, workdir: Path, results: Mapping[str, Mapping[str, Any]]) -> str:
    """`name`'s (FMSD's) subspace x family table from its results.json, with the computed
    reading and its chart, or '' when the row has no ablation."""
    table = {f: r["subspaces"] for f, r in results.items() if r.get("subspaces")}
    if not table:
        return ""
    md = subspace_report.subspace_markdown(table).replace(
        subspace_report.HEADING, f"{subspace_report.HEADING} ({md_escape(name)})", 1)
    chart = Path(workdir) / workdir_files.SUBSPACES_PNG
    if chart.is_file():
        rel = f"{Path(workdir).name}/{workdir_files.SUBSPACES_PNG}"
        md += f"\nChart: [{rel}]({rel})\n\n![subspaces]({rel})\n"
    return md
