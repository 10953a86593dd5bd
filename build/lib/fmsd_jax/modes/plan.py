"""Plan a TPU run from a CPU: compile the real steps for a slice, before paying for it.

`--mode plan --topology v5e-256` builds the run abstractly (`rebuild.open_run(abstract=True)`:
geometry from the variant, no weights, no data, no device transfer), puts it on a mesh of the
topology's devices (XLA compiles for a TPU slice without the hardware once `libtpu` is
installed) and AOT-compiles the three programs a run executes, built by the functions the run
uses: the train step (`train_step.assemble_step`), the mask estimator's update
(`masking.jit_moment_update`) and the evaluation step (`scoring.make_predict_fn`). For each it
reports per-chip memory (XLA's buffer assignment), whether that fits the chip's HBM, FLOPs per
step per chip (counted from the program's jaxpr, because XLA's cost analysis counts a scanned
layer loop once), a roofline time estimate and the collectives of the compiled program.

Nothing here is a measurement of speed: times are estimates from FLOPs and peak rates.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from fmsd_jax import atomic, parallel
from fmsd_jax.errors import BadInput
from fmsd_jax.evaluators import scoring
from fmsd_jax.method import masking
from fmsd_jax.run import factory, layer_selection, rebuild, train_step, workdir_files
from fmsd_jax.tpu.hlo import program_report
from fmsd_jax.tpu.topology import CHIPS, GiB, PlanError, slice_name, topology_devices

log = logging.getLogger("fmsd_jax")


# ---------------------------------------------------------------------------------------------
# The three programs of a run


def _programs(cfg: mlc.ConfigDict, mesh: Any, which: tuple[str, ...]) -> dict[str, tuple]:
    """{name: (jitted, abstract args, batch shards)} built by the run's own functions."""
    out = {}
    run = rebuild.open_run(cfg, None, mesh, abstract=True)
    n = math.prod(mesh.shape[a] for a in parallel.BATCH_AXES)
    if "train_step" in which:
        parts = train_step.assemble_step(cfg, run, steps=1)
        out["train_step"] = (parts["step_fn"], (parts["state"], run.frozen, parts["sample"],
                                                parts["metric_sums"]), n)
    if "eval_step" in which:
        images = train_step.batch_spec(cfg, cfg.eval.batch_size, mesh, labels=False)["image"]
        temperature = jax.ShapeDtypeStruct((), np.float32)
        out["eval_step"] = (scoring.make_predict_fn(run.graphdef, mesh),
                            (run.trainable, run.frozen, images, temperature), n)
    mask_used = cfg.method.regime == "fmsd" and cfg.method.mask.enabled
    if "mask_update" in which and mask_used:
        dense, _ = factory.abstract_detector(cfg, decomposed=False)
        graphdef, cand, rest = masking.candidate_split(dense, tuple(cfg.method.targets))
        placement = layer_selection.estimator_placement(mesh, cand, rest)
        place = lambda t, sh: jax.tree.map(  # noqa: E731
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), t, sh)
        acc = jax.eval_shape(masking.init_moments, cand)
        acc = place(acc, masking.moment_shardings(mesh, placement))
        batch = train_step.batch_spec(cfg, cfg.train.batch_size, mesh)
        step = masking.jit_moment_update(graphdef, layer_selection.estimator_loss_fn(), mesh,
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
        mesh = parallel.make_mesh(cfg.mesh, devices)
        parallel.check_batch_fits(mesh, cfg.train.batch_size)
        parallel.check_batch_fits(mesh, cfg.eval.batch_size, "config.eval.batch_size")
    except BadInput as e:
        raise PlanError(str(e)) from e
    chip = CHIPS[gen]
    result = dict(
        topology=topology, slice=slice_name(gen, len(devices)), chips=len(devices),
        hosts=parallel.num_processes(mesh), chip=dataclasses.asdict(chip) | {"generation": gen},
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

    atomic.write_json(workdir / workdir_files.PLAN_JSON, result)
    print(f"wrote {workdir / 'plan.json'}")
    return result
