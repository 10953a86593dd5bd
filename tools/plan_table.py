"""The README's pod-planning table: compile the train step for TPU slices from this machine.

  python tools/plan_table.py --out runs/plan_table.json                 # the full grid
  python tools/plan_table.py --variants B/16 --slices v5e-8 --fsdp 1 2 --out t.json

For every (variant, slice, mesh) it compiles the FMSD train step (bf16, the run's shardings)
at the DeepfakeBench global batch (32; or the smallest multiple of the chip count) and full
fine-tuning at the same batch (the memory the decomposition saves per chip), then finds the
largest per-chip batch that fits: two compiles give XLA's per-chip memory as a line in the
batch, the line gives a candidate, and one more compile checks it (stepping down until one
fits). Prints a Markdown table and writes every number to --out as JSON. Times are roofline
estimates (counted FLOPs at the chip's peak bf16 rate), never measurements. Needs libtpu
(pip install -r requirements-tpu.txt). Compile time grows with model and slice: B/16 on 8
chips takes ~1 min on a 2-core machine, L/14 and H/14 on 256 chips several minutes each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmsd_jax import config_base, plan  # noqa: E402

GiB = 2**30


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


def compile_row(variant, regime, slice_, batch, fsdp) -> dict:
    t0 = time.perf_counter()
    p = plan.plan(config(variant, regime, batch, fsdp), slice_, which=("train_step",),
                  suggest=False)
    r = p["programs"]["train_step"]
    coll = sum(v["bytes"] for v in r["collectives"].values())
    return dict(variant=variant, regime=regime, slice=p["slice"], chips=p["chips"],
                mesh=f"{p['mesh']['data']}x{p['mesh']['fsdp']}", global_batch=batch,
                peak_gib=r["peak_bytes"] / GiB, fits=r["fits"], hbm_gib=p["chip"]["hbm_gib"],
                tflop_per_chip=r["flops_per_chip"] / 1e12,
                est_ms=r["estimated_seconds"] * 1e3, collective_mib=coll / 2**20,
                collectives=r["collectives"], compile_s=time.perf_counter() - t0)


def largest_batch(variant, slice_, fsdp, chips, hbm_gib, lo: dict) -> tuple[int, dict]:
    """Largest per-chip batch that fits: a line through two compiles, checked by a third."""
    b1 = lo["global_batch"] // chips
    b2 = b1 * 4
    hi = compile_row(variant, "fmsd", slice_, b2 * chips, fsdp)
    slope = (hi["peak_gib"] - lo["peak_gib"]) / (b2 - b1)
    guess = max(1, int((hbm_gib - lo["peak_gib"]) / slope + b1)) if slope > 0 else b2
    while guess >= 1:
        row = compile_row(variant, "fmsd", slice_, guess * chips, fsdp)
        if row["fits"]:
            return guess, row
        guess = int(guess * 0.9)
    return 0, hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["B/16", "L/14", "H/14"])
    ap.add_argument("--slices", nargs="+", default=["v5e-8", "v5e-256", "v4-128", "v5p-512"])
    ap.add_argument("--fsdp", type=int, nargs="+", default=[1, 4],
                    help="fsdp sizes of the rows (1: data only)")
    ap.add_argument("--batch", type=int, default=32, help="DeepfakeBench's global batch")
    ap.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch search")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-batch-only", action="store_true",
                    help="only add the largest batch to the rows already in --out")
    args = ap.parse_args()
    if args.max_batch_only:
        rows = json.loads(args.out.read_text())
        for row in rows:
            fsdp = int(row["mesh"].split("x")[1])
            if "max_per_chip_batch" in row or fsdp not in args.fsdp:
                continue
            row["max_per_chip_batch"], row["max_row"] = largest_batch(
                row["variant"], row["slice"], fsdp, row["chips"], row["hbm_gib"], row)
            args.out.write_text(json.dumps(rows, indent=1, default=str))
        print(table(rows))
        return
    rows = []
    for variant in args.variants:
        for slice_ in args.slices:
            _, devices = plan.topology_devices(slice_)
            chips = len(devices)
            batch = max(args.batch, chips) // chips * chips
            for fsdp in sorted({min(f, chips) for f in args.fsdp}):
                row = compile_row(variant, "fmsd", slice_, batch, fsdp)
                full = compile_row(variant, "full", slice_, batch, fsdp)
                row["full_peak_gib"] = full["peak_gib"]
                row["full_collective_mib"] = full["collective_mib"]
                if not args.no_max_batch:
                    row["max_per_chip_batch"], row["max_row"] = largest_batch(
                        variant, slice_, fsdp, chips, row["hbm_gib"], row)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items()
                                  if k not in ("collectives", "max_row")}, default=str),
                      flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(rows, indent=1, default=str))
    print(table(rows))


def table(rows: list[dict]) -> str:
    head = ("| model | slice | mesh data×fsdp | batch (global) | FMSD GiB/chip | full FT "
            "GiB/chip | saved | TFLOP/chip/step | est. ms/step | collectives MiB/step "
            "(FMSD / full) | largest FMSD batch/chip |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['slice']} | {r['mesh']} | {r['global_batch']} | "
            f"{r['peak_gib']:.2f} | {r['full_peak_gib']:.2f} | "
            f"{r['full_peak_gib'] - r['peak_gib']:.2f} | {r['tflop_per_chip']:.3f} | "
            f"{r['est_ms']:.1f} | {r['collective_mib']:.1f} / {r['full_collective_mib']:.1f} | "
            f"{r.get('max_per_chip_batch', '—')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
