"""What a compiled program costs: FLOPs from its jaxpr, collectives and their bytes from
its optimized HLO (loop trip counts included), per-device memory, largest arguments."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

import jax
import numpy as np

from fmsd_jax.tpu.topology import Chip, GiB

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


# ---------------------------------------------------------------------------------------------
# What a compiled program costs


def jaxpr_flops(jaxpr: Any) -> float:
    """Matmul FLOPs of a (closed) jaxpr, scans counted `length` times (XLA counts them once).

    dot_general: 2 · |output| · |contracted dims|. Elementwise work is left out (a few % of a
    ViT step; the unrolled-compile check in tests/test_plan.py bounds it).
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
            continue
        mult = eqn.params.get("length", 1) if name == "scan" else 1
        subs = []
        for v in eqn.params.values():
            for item in (v if isinstance(v, tuple | list) else (v,)):
                if hasattr(item, "eqns") or hasattr(getattr(item, "jaxpr", None), "eqns"):
                    subs.append(item)
        if name == "cond":  # one branch runs
            total += max((jaxpr_flops(s) for s in subs), default=0.0)
        else:
            total += mult * sum(jaxpr_flops(s) for s in subs)
    return total


def _shape_bytes(text: str) -> int:
    """Bytes of every `dtype[dims]` in an HLO result type, e.g. '(f32[8,4], bf16[2])'."""
    size = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
            "f64": 8, "s64": 8, "u64": 8, "s16": 2, "u16": 2}
    total = 0
    for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
        if dt in size:
            total += size[dt] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _trip_count(condition: list[str] | None) -> int:
    """Iterations of a scan's while loop from its condition `i < N` (i counts from 0), for
    HLO that does not state `known_trip_count` (the TPU compiler's output); 1 if unknown."""
    text = "\n".join(condition or [])
    bound = re.findall(r"=\s*s32\[\]\S*\s+constant\((\d+)\)", text)
    if "direction=LT" in text and len(bound) == 1:
        return int(bound[0])
    return 1


_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")


def hlo_collectives(hlo: str) -> dict[str, dict[str, Any]]:
    """Collectives of a compiled HLO module, per step: {kind: {count, bytes, dtypes, shapes}}.

    An op inside a while loop (the scanned layers) runs trip-count times and is counted so.
    `bytes` is the size of each op's result buffer on one chip, summed over executions
    (all-gather: the gathered weight; reduce-scatter: the scattered slice); `shapes` the
    distinct result types (what was moved: a weight, a gradient, an activation). XLA's TPU
    backend writes a reduce-scatter as an all-reduce inside an `all-reduce-scatter` fusion
    that keeps one slice: counted as a reduce-scatter, with the bytes of the tensor reduced.
    It also splits one collective into a chain of ops that overlap with compute (the same
    `chain_id`, each printed with the full result): a chain is counted once."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is not None:
            comps[current].append(line)
    callers: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, lines in comps.items():
        for line in lines:
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            cond = re.search(r"\bcondition=%?([\w.\-]+)", line)
            for key, callee in re.findall(r"\b(body|condition|calls|branch_computations|"
                                          r"true_computation|false_computation)=\{?%?([\w.\-]+)",
                                          line):
                n = 1
                if key == "body":
                    n = int(trip.group(1)) if trip else _trip_count(comps.get(cond.group(1)
                                                                              if cond else ""))
                callers[callee].append((name, n))
    memo: dict[str, int] = {}

    def mult(name: str, depth: int = 0) -> int:
        if name == entry or depth > 50:
            return 1
        if name not in memo:
            memo[name] = sum(n * mult(c, depth + 1) for c, n in callers.get(name, []))
        return memo[name]

    out: dict[str, dict[str, Any]] = {}
    chains: set[tuple[str, str]] = set()
    for name, lines in comps.items():
        m_comp = mult(name)
        if not m_comp:
            continue
        for line in lines:
            mi = _INSTR.match(line)
            if not mi:
                continue
            result, op = mi.group(1), mi.group(2)
            kind = op.removesuffix("-start")
            if kind not in COLLECTIVES or op.endswith("-done"):
                continue
            if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"
            chain = re.search(r'chain_id="(\d+)"', line)
            if chain:
                if (kind, chain.group(1)) in chains:
                    continue
                chains.add((kind, chain.group(1)))
            if op.endswith("-start") and result.startswith("("):  # (operand, result) pair
                result = result[1:].split("]", 1)[-1] if kind != "all-reduce" else result
            rec = out.setdefault(kind, {"count": 0, "bytes": 0, "dtypes": set(),
                                        "shapes": set()})
            rec["count"] += m_comp
            rec["bytes"] += m_comp * _shape_bytes(result)
            rec["dtypes"].update(re.findall(r"\b([a-z]+\d*)\[", result))
            rec["shapes"].update(re.findall(r"\b[a-z]+\d*\[[\d,]*\]", result))
    for rec in out.values():
        rec["dtypes"] = sorted(rec["dtypes"])
        rec["shapes"] = sorted(rec["shapes"])
    return out


def _shard_bytes(x: Any) -> int:
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    return math.prod(shape) * np.dtype(x.dtype).itemsize


def largest_arguments(tree: Any, n: int = 3) -> list[tuple[str, int]]:
    """The n largest per-chip argument shards, by path (what dominates the arguments)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sized = [(jax.tree_util.keystr(p), _shard_bytes(x)) for p, x in flat if hasattr(x, "dtype")]
    return sorted(sized, key=lambda t: -t[1])[:n]


def program_report(jitted: Any, args: tuple, *, chip: Chip, batch_shards: int) -> dict:
    """Compile `jitted` for `args` (sharded ShapeDtypeStructs) and describe the program."""
    lowered = jitted.lower(*args)
    flops = jaxpr_flops(jax.make_jaxpr(jitted)(*args)) / batch_shards
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # XLA's TPU compiler refuses a program whose buffers exceed HBM; it names the total.
        need = re.search(r"required for [\w ]+\(([\d.]+)G\) exceeds available HBM "
                         r"\(([\d.]+)G\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or need is None:
            raise
        return dict(memory_bytes=None, peak_bytes=int(float(need.group(1)) * GiB),
                    hbm_bytes=int(float(need.group(2)) * GiB), fits=False,
                    flops_per_chip=flops,
                    estimated_seconds=flops / (chip.bf16_tflops * 1e12),
                    xla_cost_flops_scan_once=float("nan"), collectives={},
                    largest_arguments=largest_arguments(args),
                    compile_error=str(e).splitlines()[0][:300])
    mem = compiled.memory_analysis()
    fields = dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                  temporaries=mem.temp_size_in_bytes,
                  generated_code=mem.generated_code_size_in_bytes,
                  donated=mem.alias_size_in_bytes)
    peak = (fields["arguments"] + fields["outputs"] + fields["temporaries"]
            + fields["generated_code"] - fields["donated"])
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return dict(
        memory_bytes=fields, peak_bytes=peak, hbm_bytes=int(chip.hbm_gib * GiB),
        fits=peak <= chip.hbm_gib * GiB,
        flops_per_chip=flops,
        estimated_seconds=flops / (chip.bf16_tflops * 1e12),
        xla_cost_flops_scan_once=float(cost.get("flops", float("nan"))),
        collectives=hlo_collectives(compiled.as_text()),
        largest_arguments=largest_arguments(args),
    )
