"""The demo report's robustness section: each method's robustness.json under one
perturbation family, side by side."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_collections as mlc

from fmsd_jax import atomic
from fmsd_jax.evaluators import result_files
from fmsd_jax.evaluators.robustness_report import AUC_KEYS, LEVEL_NAME
from fmsd_jax.modes.robustness import load_if_current, robustness

log = logging.getLogger("fmsd_jax")


def demo_section(family: str, rows: Mapping[str, tuple[mlc.ConfigDict, Path]],
                 levels: Sequence[int] = ()) -> str:
    """The demo's robustness section: every row (name → (its config, its trained workdir))
    evaluated on one held-out `family` at `levels` (empty: all); per-type means and the overall
    mean, frame and video in separate tables. A row whose robustness[-N].json has the same
    settings is not rerun; the section names each row's files."""
    results: dict[str, dict] = {}
    files: list[str] = []
    seconds = 0.0
    for name, (cfg, workdir) in rows.items():
        cfg = copy.deepcopy(cfg)
        cfg.robustness.datasets = (family,)
        cfg.robustness.levels = tuple(levels)
        found = load_if_current(cfg, workdir)
        if found is None:
            log.info("=== robustness of %s on %s", name, family)
            seconds += robustness(cfg, workdir)["timing"]["seconds"]
            found = load_if_current(cfg, workdir)
        results[name], stem = found
        files.append(f"{result_files.md_escape(name)} `{Path(workdir).name}/{stem}.md`, "
                     f"`{Path(workdir).name}/{stem}.png`")
    first = next(iter(results.values()))
    types = list(first["types"])
    levels = first["settings"]["levels"]
    md = ["## Robustness to unseen perturbations", "",
          f"{first['title']}, levels {', '.join(map(str, levels))}, on the held-out family "
          f"**{family}**; each cell is a type's mean over those levels (per-level tables and "
          f"charts: {'; '.join(files)}). "
          + " ".join(f"{src}: {text}." for src, text in first["where_applied"].items()), ""]
    flagged = [f"{k} L{lv}" for k, t in first["types"].items()
               for lv, f in t["levels"].items() if f["seen_in_training"]]
    if flagged:
        md += [f"Inside the training augmentation's range ({first['augmentation']}), so not "
               f"unseen: {', '.join(flagged)}.", ""]
    for key in AUC_KEYS:
        header = ["method", "clean"] + types + ["mean"]
        md += [f"### {LEVEL_NAME[key]}", "", "| " + " | ".join(header) + " |",
               "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for name, res in results.items():
            e = res["datasets"][family]
            cells = [result_files.md_escape(name), result_files.fmt(e["clean"][key])]
            cells += [result_files.fmt(e["types"][t]["mean"][key]) for t in types]
            cells.append(result_files.fmt(e["mean"][key]))
            md.append("| " + " | ".join(cells) + " |")
        md.append("")
    evals = sum(r["timing"]["evaluations"] for r in results.values())
    md += [f"{evals} evaluations ({len(results)} rows); {seconds:.0f}s spent in this run "
           "(rows whose results were already there cost nothing).", ""]
    return "\n".join(md)


def append_to_report(path: str | Path, section: str) -> None:
    """Add a section at the end of an existing Markdown report, atomically."""
    path = Path(path)
    atomic.write_text(path, path.read_text(encoding="utf-8").rstrip("\n") + "\n\n"
                      + section)
