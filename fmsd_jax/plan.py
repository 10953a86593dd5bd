"""Plan a TPU run from a CPU: compile the real steps for a slice, before paying for it.

`--mode plan --topology v5e-256` builds the run abstractly (`build.prepare(abstract=True)`:
geometry from the variant, no weights, no data, no device transfer), puts it on a mesh of the
topology's devices (XLA compiles for a TPU slice without the hardware once `libtpu` is
installed) and AOT-compiles the three programs a run executes, built by the functions the run
uses: the train step (`train.assemble_step`), the mask estimator's update
(`masking.jit_moment_update`) and the evaluation step (`evaluate.make_predict_fn`). For each it
reports per-chip memory (XLA's buffer assignment), whether that fits the chip's HBM, FLOPs per
step per chip (counted from the program's jaxpr, because XLA's cost analysis counts a scanned
layer loop once), a roofline time estimate and the collectives of the compiled program.

Nothing here is a measurement of speed: times are estimates from FLOPs and peak rates.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from fmsd_jax import (
    assemble,
    atomic,
    build,
    evaluate,
    layer_mask,
    platforms,
    sharding,
    train,
)
from fmsd_jax.errors import BadInput
from fmsd_jax.method import masking

log = logging.getLogger("fmsd_jax")

INSTALL_HINT = ("libtpu is not installed; compiling for TPU from this machine needs it: "
                "pip install -r requirements-tpu.txt")
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_gib: float  # HBM per chip
    bf16_tflops: float  # peak dense bf16 per chip
    cores_in_name: int  # accelerator-type suffix counts TensorCores (2/chip) or chips (1)
    torus_dims: int  # the slice's interconnect: a 2-D (v5e/v6e) or 3-D (v4/v5p) torus

    @property
    def megacore(self) -> bool:
        """Two TensorCores run as one device, as on a real v4/v5p slice."""
        return self.cores_in_name == 2


# Per-chip figures from Google's TPU system-architecture pages (cloud.google.com/tpu/docs/v4,
# /v5e, /v5p, /v6e, read 2026-12): HBM capacity and peak bf16 FLOP/s.
CHIPS: dict[str, Chip] = {
    "v4": Chip(32, 275, 2, 3),
    "v5e": Chip(16, 197, 1, 2),
    "v5p": Chip(95, 459, 2, 3),
    "v6e": Chip(32, 918, 1, 2),
}
_ALIASES = {"v5litepod": "v5e", "v6": "v6e"}

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


class PlanError(BadInput):
    """A user-facing problem with the plan's arguments (one line, exit status 2)."""


# ---------------------------------------------------------------------------------------------
# Topologies


def _grid(chips: int, dims: int) -> str:
    """The slice shape Cloud TPU uses for `chips` chips: 2-D (v5e/v6e) or 3-D (v4/v5p)."""
    if dims == 2:
        side = 2 ** (int(math.log2(chips)) // 2)
        return f"{side}x{chips // side}"
    shape = [1, 1, 1]
    i = 0
    while math.prod(shape) < chips:
        shape[i % 3] *= 2
        i += 1
    shape = sorted(shape, key=lambda d: (d == 1, d))  # Cloud TPU writes v4-8 as 2x2x1
    return "x".join(map(str, shape))


def parse_topology(name: str) -> tuple[str, str, int]:
    """(generation, libtpu topology name, chips) for 'v5e-256', 'v4-128' or 'v5e:16x16'."""
    m = re.fullmatch(r"(v\d+[a-z]*)[-:](.+)", name.strip())
    if not m:
        raise PlanError(f"--topology={name!r} is not a TPU slice; use e.g. v5e-256, v4-128, "
                        "v5p-512 or a topology name such as v5e:16x16")
    gen, rest = _ALIASES.get(m.group(1), m.group(1)), m.group(2)
    if gen not in CHIPS:
        raise PlanError(f"--topology={name!r}: unknown TPU generation {gen!r}; known: "
                        f"{sorted(CHIPS)}")
    if "x" in rest:
        dims = [int(x) for x in rest.split("x")]
        return gen, f"{gen}:{rest}", math.prod(dims)
    if not rest.isdigit() or int(rest) % CHIPS[gen].cores_in_name:
        raise PlanError(f"--topology={name!r}: the size must be a whole number of chips")
    chips = int(rest) // CHIPS[gen].cores_in_name
    if chips & (chips - 1):
        raise PlanError(f"--topology={name!r}: slices have a power-of-two chip count")
    return gen, f"{gen}:{_grid(chips, CHIPS[gen].torus_dims)}", chips


def slice_name(gen: str, chips: int) -> str:
    """The accelerator type Cloud TPU sells for `chips` chips (v5e-256, v4-128, v5p-512)."""
    return f"{gen}-{chips * CHIPS[gen].cores_in_name}"


def topology_devices(name: str) -> tuple[str, list[Any]]:
    """(generation, the slice's devices) from libtpu's topology description; no TPU needed."""
    gen, topo, chips = parse_topology(name)
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError(INSTALL_HINT)
    from jax.experimental import topologies

    # Compile-only: no chip is opened, so several planners (or tests) may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not platforms.tpu_chips():
        # libtpu, loaded as a compiler, still asks which TPU host it is on and prints a warning
        # (and with no worker list an error trace) when there is none. The answers describe
        # the attached host only: with and without TPU_ACCELERATOR_TYPE the slice's devices
        # (v5e-1/4/256, v4-8/16, v5p-8/512) and compiled programs (a sharded step on v5e-256,
        # v4-16, v5p-8) were identical, libtpu 0.0.42.1.
        # On a TPU VM they would contradict the real host, so there libtpu finds its own.
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    kw: dict[str, Any] = {"chip_config_name": "megacore"} if CHIPS[gen].megacore else {}
    if CHIPS[gen].torus_dims == 2 and chips < 4:  # v5litepod-1: one chip, below a 2x2 host
        kw["chips_per_host_bounds"] = (*map(int, topo.split(":")[1].split("x")), 1)
    try:
        desc = topologies.get_topology_desc(topology_name=topo, platform="tpu", **kw)
    except Exception as e:  # libtpu's own message names what it did not accept
        raise PlanError(f"--topology={name!r} ({topo}): libtpu refused it: {e}") from e
    devices = list(desc.devices)
    if len(devices) != chips:
        raise PlanError(f"--topology={name!r}: libtpu gave {len(devices)} devices for {topo}, "
                        f"expected {chips}")
    return gen, devices


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


# ---------------------------------------------------------------------------------------------
# The three programs of a run


def _programs(cfg: mlc.ConfigDict, mesh: Any, which: tuple[str, ...]) -> dict[str, tuple]:
    """{name: (jitted, abstract args, batch shards)} built by the run's own functions."""
    out = {}
    run = build.prepare(cfg, None, mesh, abstract=True)
    n = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    if "train_step" in which:
        parts = train.assemble_step(cfg, run, steps=1)
        out["train_step"] = (parts["step_fn"], (parts["state"], run.frozen, parts["sample"],
                                                parts["metric_sums"]), n)
    if "eval_step" in which:
        images = train.batch_spec(cfg, cfg.eval.batch_size, mesh, labels=False)["image"]
        out["eval_step"] = (evaluate.make_predict_fn(run.graphdef, mesh),
                            (run.trainable, run.frozen, images), n)
    mask_used = cfg.method.regime == "fmsd" and cfg.method.mask.enabled
    if "mask_update" in which and mask_used:
        dense, _ = assemble.abstract_detector(cfg, decomposed=False)
        graphdef, cand, rest = masking.candidate_split(dense, tuple(cfg.method.targets))
        placement = layer_mask.estimator_placement(mesh, cand, rest)
        place = lambda t, sh: jax.tree.map(  # noqa: E731
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), t, sh)
        acc = jax.eval_shape(masking.init_moments, cand)
        acc = place(acc, masking.moment_shardings(mesh, placement))
        batch = train.batch_spec(cfg, cfg.train.batch_size, mesh)
        step = masking.jit_moment_update(graphdef, layer_mask.estimator_loss_fn(), mesh,
                                         placement)
        out["mask_update"] = (step, (acc, place(cand, placement[0]), place(rest, placement[1]),
                                     batch), n)
    return out


PROGRAMS = ("train_step", "mask_update", "eval_step")


def resolve_for_tpu(cfg: mlc.ConfigDict) -> mlc.ConfigDict:
    """The config as a TPU process would resolve it. attention_impl=None means 'let
    jax.nn.dot_product_attention choose', which is 'xla' on TPU; on this CPU host it would
    resolve to 'einsum' (vit.resolve_attention_impl), a program the TPU run never executes."""
    cfg = mlc.ConfigDict(cfg.to_dict())
    if cfg.model.attention_impl is None:
        cfg.model.attention_impl = "xla"
    return cfg


def plan(cfg: mlc.ConfigDict, topology: str, *, which: tuple[str, ...] = PROGRAMS,
         suggest: bool = True) -> dict:
    """Compile a run's programs for a TPU slice; see the module docstring."""
    gen, devices = topology_devices(topology)
    cfg = resolve_for_tpu(cfg)
    try:
        mesh = sharding.make_mesh(cfg.mesh, devices)
        sharding.check_batch_fits(mesh, cfg.train.batch_size)
        sharding.check_batch_fits(mesh, cfg.eval.batch_size, "config.eval.batch_size")
    except BadInput as e:
        raise PlanError(str(e)) from e
    chip = CHIPS[gen]
    result = dict(
        topology=topology, slice=slice_name(gen, len(devices)), chips=len(devices),
        hosts=sharding.num_processes(mesh), chip=dataclasses.asdict(chip) | {"generation": gen},
        mesh=dict(mesh.shape), variant=cfg.model.variant, regime=cfg.method.regime,
        dtype=cfg.model.dtype, attention_impl=cfg.model.attention_impl,
        global_batch=cfg.train.batch_size, eval_batch=cfg.eval.batch_size,
        per_chip_batch=cfg.train.batch_size // len(devices), programs={})
    for name, (jitted, args, shards) in _programs(cfg, mesh, which).items():
        log.info("compiling %s for %s, mesh %s ...", name, topology, dict(mesh.shape))
        result["programs"][name] = program_report(jitted, args, chip=chip, batch_shards=shards)
    train_rep = result["programs"].get("train_step")
    if suggest and train_rep is not None and not train_rep["fits"]:
        result["suggestion"] = _suggest_mesh(cfg, topology, devices, train_rep)
    return result


def _suggest_mesh(cfg: mlc.ConfigDict, topology: str, devices: list, rep: dict) -> str:
    """Which mesh would fit: compile the train step with fsdp doubled until it fits."""
    fsdp = int(cfg.mesh.fsdp)
    mem = rep["memory_bytes"]
    big = rep["largest_arguments"][0]
    parts = [(f"temporaries (activations) {mem['temporaries'] / GiB:.1f} GiB, arguments "
              f"{mem['arguments'] / GiB:.1f} GiB" if mem else
              f"{rep['peak_bytes'] / GiB:.1f} GiB needed") +
             f" (largest argument: {big[0]} {big[1] / GiB:.2f} GiB per chip)"]
    while fsdp * 2 <= min(16, len(devices)):
        fsdp *= 2
        trial = mlc.ConfigDict(cfg.to_dict())
        trial.mesh.fsdp, trial.mesh.data = fsdp, -1
        out = plan(trial, topology, which=("train_step",), suggest=False)
        peak = out["programs"]["train_step"]["peak_bytes"]
        if out["programs"]["train_step"]["fits"]:
            return "; ".join(parts + [f"mesh data={len(devices) // fsdp} x fsdp={fsdp} fits "
                                      f"({peak / GiB:.1f} GiB per chip)"])
        parts.append(f"fsdp={fsdp}: {peak / GiB:.1f} GiB, still too large")
    return "; ".join(parts + ["no fsdp <= 16 fits: lower config.train.batch_size"])


# ---------------------------------------------------------------------------------------------
# Output


def _human(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(p: dict) -> str:
    lines = [f"{p['variant']} {p['regime']} {p['dtype']} on {p['slice']} ({p['topology']}: "
             f"{p['chips']} chips, {p['hosts']} hosts), mesh {p['mesh']}, global batch "
             f"{p['global_batch']} ({p['per_chip_batch']}/chip), eval batch {p['eval_batch']}"]
    hbm = p["chip"]["hbm_gib"]
    for name, r in p["programs"].items():
        m = r["memory_bytes"]
        if m is None:
            lines.append(f"  {name}: DOES NOT FIT: XLA needs {_human(r['peak_bytes'])} per chip "
                         f"of {_human(r['hbm_bytes'])} usable HBM ({r['compile_error']})")
            continue
        lines.append(
            f"  {name}: per chip {_human(r['peak_bytes'])} of {hbm:g} GiB HBM -> "
            f"{'fits' if r['fits'] else 'DOES NOT FIT'} (arguments {_human(m['arguments'])}, "
            f"outputs {_human(m['outputs'])}, temporaries {_human(m['temporaries'])}, code "
            f"{_human(m['generated_code'])}, donated -{_human(m['donated'])})")
        lines.append(
            f"    {r['flops_per_chip'] / 1e12:.3f} TFLOP/chip/step (counted; XLA's cost "
            f"analysis says {r['xla_cost_flops_scan_once'] / 1e12:.3f}, scanned layers once); "
            f"estimate {r['estimated_seconds'] * 1e3:.1f} ms at 100% of "
            f"{p['chip']['bf16_tflops']:g} TFLOP/s peak (an estimate, not a measurement)")
        coll = ", ".join(f"{k} x{v['count']} {_human(v['bytes'])} {'/'.join(v['dtypes'])}"
                         for k, v in sorted(r["collectives"].items())) or "none"
        lines.append(f"    collectives per step: {coll}")
    if "suggestion" in p:
        lines.append(f"  does not fit: {p['suggestion']}")
    return "\n".join(lines)


def run_plan(cfg: mlc.ConfigDict, workdir: str | Path, topology: str | None) -> dict:
    """`--mode plan`: print the plan and write WORKDIR/plan.json."""
    if not topology:
        raise PlanError("--mode plan needs --topology, e.g. --topology=v5e-256 (or v4-128, "
                        "v5p-512, v5e:16x16)")
    result = plan(cfg, topology)
    print(format_plan(result))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    atomic.write_json(workdir / "plan.json", result)
    print(f"wrote {workdir / 'plan.json'}")
    return result
