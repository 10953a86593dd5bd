"""The README's pod-planning table: compile the train step for TPU slices from this machine.

  python tools/plan_table.py --out runs/plan_table.json                 # the full grid
  python tools/plan_table.py --variants B/16 --slices v5e-8 --fsdp 1 4 --out t.json

For every (variant, slice, mesh) it compiles the FMSD train step (bf16, the run's shardings)
at the DeepfakeBench global batch (32; or the smallest multiple of the chip count) and full
fine-tuning at the same batch (the memory the decomposition saves per chip). Then, unless
--no-max-batch, the largest per-chip batch that fits, for FMSD and for full fine-tuning (what
the saved memory buys): per-chip memory is a line in the per-chip batch (activations grow with
it, weights do not), so one more compile of the first row of each variant and regime at 8x its
per-chip batch gives the slope, every row of that variant reuses it (the activation bytes per
image do not depend on the slice or the mesh), and one compile checks the batch the line
predicts (stepping down 10 % at a time until one fits).

Every compile's numbers go to --out (JSON, rewritten atomically after each compile), and a
rerun with the same --out reuses them: an interrupted grid resumes where it stopped. All
batch-32 rows come first, then the largest batches. Prints a Markdown table. Times are
roofline estimates (counted FLOPs at the chip's peak bf16 rate), never measurements. Needs
libtpu (pip install -r requirements-tpu.txt). The whole grid is 144 compiles, 124 minutes
of compile time on our 2-core machine (2 s to 3.5 min each); separate processes on disjoint
--variants, each with its own --out, run side by side (merge the JSONs' "compiles").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmsd_jax import config_base  # noqa: E402
from fmsd_jax.modes import plan  # noqa: E402
from fmsd_jax.tpu import topology  # noqa: E402

GiB = 2**30
SLOPE_FACTOR = 8  # the slope compile runs at this multiple of the row's per-chip batch


def config(variant: str, regime: str, batch: int, fsdp: int):
    c = config_base.base_config()
    c.model.variant = variant
    c.model.dtype = "bfloat16"
    c.method.regime = regime
    config_base.apply_regime(c)
    c.method.mask.top_k = 1
    c.train.batch_size = batch
    c.eval.batch_size = batch
    c.mesh.fsdp = fsdp
    c.mesh.data = -1
    return c


class NotCompiled(Exception):
    """--cached-only: this compile is not in --out yet."""


class Results:
    """Compiles already done, by (variant, regime, slice, global batch, fsdp), kept in a JSON
    file that is rewritten after every compile (so a rerun resumes)."""

    def __init__(self, path: Path, cached_only: bool = False):
        self.path = path
        self.cached_only = cached_only
        self.rows: dict[str, dict] = {}
        if path.exists():
            self.rows = json.loads(path.read_text())["compiles"]

    def compile(self, variant: str, regime: str, slice_: str, batch: int, fsdp: int) -> dict:
        key = f"{variant}|{regime}|{slice_}|{batch}|{fsdp}"
        if key not in self.rows and self.cached_only:
            raise NotCompiled(key)
        if key not in self.rows:
            t0 = time.perf_counter()
            p = plan.plan(config(variant, regime, batch, fsdp), slice_, which=("train_step",),
                          suggest=False)
            r = p["programs"]["train_step"]
            self.rows[key] = dict(
                variant=variant, regime=regime, slice=p["slice"], chips=p["chips"],
                mesh=f"{p['mesh']['data']}x{p['mesh']['fsdp']}", global_batch=batch,
                per_chip_batch=batch // p["chips"], peak_gib=r["peak_bytes"] / GiB,
                fits=r["fits"], hbm_gib=p["chip"]["hbm_gib"],
                tflop_per_chip=r["flops_per_chip"] / 1e12, est_ms=r["estimated_seconds"] * 1e3,
                collective_mib=sum(v["bytes"] for v in r["collectives"].values()) / 2**20,
                collectives=r["collectives"], compile_s=round(time.perf_counter() - t0, 1))
            self.save()
            print(json.dumps({k: v for k, v in self.rows[key].items() if k != "collectives"},
                             default=str), flush=True)
        return self.rows[key]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"compiles": self.rows}, indent=1, default=str))
        os.replace(tmp, self.path)


def fsdp_of(row: dict) -> int:
    """The fsdp size of a compile, from its mesh 'DATAxFSDP'."""
    return int(row["mesh"].split("x")[1])


def largest_batch(res: Results, row: dict, slope_row: dict, regime: str) -> tuple[int, dict]:
    """Largest per-chip batch of `regime` that fits: the line through `slope_row` and its 8x
    compile, moved to `row`'s intercept, predicts it; one compile checks (10 % lower until it
    fits). Both rows are `regime`'s compiles at the grid's batch."""
    b0 = slope_row["per_chip_batch"]
    hi = res.compile(row["variant"], regime, slope_row["slice"],
                     b0 * SLOPE_FACTOR * slope_row["chips"], fsdp_of(slope_row))
    slope = (hi["peak_gib"] - slope_row["peak_gib"]) / (b0 * (SLOPE_FACTOR - 1))
    b1, fsdp = row["per_chip_batch"], fsdp_of(row)
    guess = max(1, int((row["hbm_gib"] - row["peak_gib"]) / slope + b1))
    while guess >= 1:
        checked = res.compile(row["variant"], regime, row["slice"], guess * row["chips"], fsdp)
        if checked["fits"]:
            return guess, checked
        guess = int(guess * 0.9)
    return 0, checked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["B/16", "L/14", "H/14"])
    ap.add_argument("--slices", nargs="+", default=["v5e-8", "v5e-256", "v4-128", "v5p-512"])
    ap.add_argument("--fsdp", type=int, nargs="+", default=[1, 4],
                    help="fsdp sizes of the rows (1: data only)")
    ap.add_argument("--batch", type=int, default=32, help="DeepfakeBench's global batch")
    ap.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch search")
    ap.add_argument("--no-full", action="store_true", help="skip the full fine-tuning compiles")
    ap.add_argument("--max-batch-fsdp", type=int, nargs="+",
                    help="search the largest batch only for rows with these fsdp sizes")
    ap.add_argument("--cached-only", action="store_true",
                    help="compile nothing: print the table of what --out holds, and what not")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    res = Results(args.out, cached_only=args.cached_only)
    chips = {s: topology.parse_topology(s)[2] for s in args.slices}
    cells = [(v, s, f) for v in args.variants for s in args.slices
             for f in sorted({min(f, chips[s]) for f in args.fsdp})]
    rows, missing = [], []
    for v, s, f in cells:
        batch = max(args.batch, chips[s]) // chips[s] * chips[s]
        try:
            row = dict(res.compile(v, "fmsd", s, batch, f))
            if not args.no_full:
                row["full"] = res.compile(v, "full", s, batch, f)
        except NotCompiled:
            missing.append(f"{v} on {s}, data x fsdp {chips[s] // f}x{f}, batch {batch}")
            continue
        rows.append(row)
    if not args.no_max_batch:
        first: dict[tuple[str, str], dict] = {}
        regimes = ("fmsd",) if args.no_full else ("fmsd", "full")
        for row in rows:
            if args.max_batch_fsdp and fsdp_of(row) not in args.max_batch_fsdp:
                continue
            for regime in regimes:
                grid_row = row if regime == "fmsd" else row["full"]
                slope_row = first.setdefault((row["variant"], regime), grid_row)
                try:
                    n, best = largest_batch(res, grid_row, slope_row, regime)
                except NotCompiled:
                    missing.append(f"largest {regime} batch of {row['variant']} on "
                                   f"{row['slice']}, data x fsdp {row['mesh']}")
                    continue
                row[f"{regime}_max"] = (n, best["peak_gib"], best["est_ms"])
    print(table(rows))
    if missing:
        print("not compiled yet:\n  " + "\n  ".join(missing))


def table(rows: list[dict]) -> str:
    head = ("| model | slice | mesh data×fsdp | batch (global) | FMSD GiB/chip | full FT "
            "GiB/chip | saved | TFLOP/chip/step | est. ms/step | collectives MiB/step "
            "(FMSD / full) | largest batch/chip, FMSD (GiB, est. ms) | largest batch/chip, "
            "full FT (GiB, est. ms) |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        full = r.get("full")
        fulls = "—" if full is None else f"{full['peak_gib']:.2f}" + ("" if full["fits"] else " ✗")
        saved = "—" if full is None else f"{full['peak_gib'] - r['peak_gib']:.2f}"
        fcoll = "—" if full is None else f"{full['collective_mib']:.1f}"
        best = {regime: "—" if f"{regime}_max" not in r else
                "{} ({:.1f}, {:.0f})".format(*r[f"{regime}_max"]) for regime in ("fmsd", "full")}
        lines.append(
            f"| {r['variant']} | {r['slice']} | {r['mesh'].replace('x', '×')} | "
            f"{r['global_batch']} | {r['peak_gib']:.2f}{'' if r['fits'] else ' ✗'} | {fulls} | "
            f"{saved} | {r['tflop_per_chip']:.3f} | {r['est_ms']:.1f} | "
            f"{r['collective_mib']:.1f} / {fcoll} | {best['fmsd']} | {best['full']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
