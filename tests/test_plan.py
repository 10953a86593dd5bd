"""Planning pod runs from a CPU: TPU compiles of the real steps, FLOP counting, collectives,
fp32 gradient reductions, and the tiny model trained at width (64 virtual devices).

The TPU compiles need libtpu (requirements-tpu.txt, installed by `.ci/run`); they compile the
tiny model for a v5e:2x2 slice (4 chips) in ~20 s.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compilation_cache_off, tiny_cfg, train_losses
from jax.sharding import PartitionSpec as P

from fmsd_jax import config_base, parallel
from fmsd_jax.method import decompose as decomp
from fmsd_jax.modes import plan
from fmsd_jax.run import rebuild, train_step
from fmsd_jax.tpu import hlo, topology

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _no_persistent_cache():
    """Programs compiled for a TPU topology (a compile-only client) are written to the
    persistent cache but cannot be read back (jax warns and compiles again), so the cache
    only costs time here and puts warnings on the plan CLI's stderr, which a test reads."""
    with compilation_cache_off():
        yield


needs_libtpu = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libtpu") is None,
    reason="libtpu not installed (pip install -r requirements-tpu.txt)")


@pytest.fixture(scope="module")
def tiny_plan():
    return plan.plan(tiny_cfg(**{"mesh.fsdp": 2}), "v5e:2x2", suggest=False)


@needs_libtpu
def test_plan_compiles_the_three_programs_for_a_tpu_slice(tiny_plan):
    p = tiny_plan
    assert (p["chips"], p["mesh"], p["slice"]) == (4, {"data": 2, "fsdp": 2}, "v5e-4")
    assert p["attention_impl"] == "xla"  # what None means on TPU, not the CPU host's einsum
    assert set(p["programs"]) == {"train_step", "mask_update", "eval_step"}
    for name, r in p["programs"].items():
        m = r["memory_bytes"]
        assert set(m) == {"arguments", "outputs", "temporaries", "generated_code", "donated"}
        assert m["arguments"] > 0 and m["generated_code"] > 0, name
        assert r["fits"] and m["arguments"] <= r["peak_bytes"] <= r["hbm_bytes"], name
        assert r["flops_per_chip"] > 0
    # The train step donates its state: the donated bytes are the trainable + optimizer state.
    assert p["programs"]["train_step"]["memory_bytes"]["donated"] > 0
    text = plan.format_plan(p)
    assert "train_step: per chip" in text and "not a measurement" in text


@needs_libtpu
def test_train_step_batch_is_split_over_the_data_axes_on_tpu():
    """The compiled TPU program takes the batch split over (data, fsdp) and replicated state."""
    cfg = plan.resolve_for_tpu(tiny_cfg(**{"mesh.fsdp": 2}))
    _, devices = topology.topology_devices("v5e:2x2")
    mesh = parallel.make_mesh(cfg.mesh, devices)
    run = rebuild.open_run(cfg, None, mesh, abstract=True)
    parts = train_step.assemble_step(cfg, run, steps=1)
    compiled = parts["step_fn"].lower(parts["state"], run.frozen, parts["sample"],
                                      parts["metric_sums"]).compile()
    batch_in = compiled.input_shardings[0][2]
    assert batch_in["image"].spec == P(("data", "fsdp"))
    assert batch_in["image"].shard_shape((8, 32, 32, 3)) == (2, 32, 32, 3)
    hlo = compiled.as_text()
    assert re.search(r"u8\[2,32,32,3\]", hlo), "the per-chip program should see 2 images"


@needs_libtpu
def test_gradient_and_metric_reductions_are_fp32_in_the_compiled_bf16_step(tiny_plan):
    """No collective of the bf16 train step (FMSD) reduces in bf16 (DESIGN.md §6, issue 13)."""
    coll = tiny_plan["programs"]["train_step"]["collectives"]
    assert coll["all-reduce"]["count"] >= 1
    for kind, rec in coll.items():
        if kind in ("all-reduce", "reduce-scatter"):
            assert rec["dtypes"] == ["f32"], (kind, rec)


LOCAL_BATCH = 5  # per chip: a size no weight of the tiny model has, so activations stand out


@pytest.fixture(scope="module")
def fsdp_plans():
    """The tiny bf16 model on v5e:2x2 as data 2 x fsdp 2 with its weight matrices split over
    fsdp, per regime. FSDP_MIN_SIZE 4096 splits the stacked kernels and the patch embedding but
    not the vectors, as the real threshold does at real sizes (the tiny ones are below it)."""
    plans = {}
    min_size, parallel.FSDP_MIN_SIZE = parallel.FSDP_MIN_SIZE, 4096
    try:
        for regime in ("fmsd", "full", "linear_probe"):
            cfg = tiny_cfg(**{"mesh.fsdp": 2, "method.regime": regime,
                              "train.batch_size": 4 * LOCAL_BATCH,
                              "eval.batch_size": 4 * LOCAL_BATCH})
            config_base.apply_regime(cfg)
            which = ("train_step", "mask_update") if regime == "fmsd" else ("train_step",)
            plans[regime] = plan.plan(cfg, "v5e:2x2", which=which, suggest=False)
    finally:
        parallel.FSDP_MIN_SIZE = min_size
    return plans


def _dims(shape: str) -> list[int]:
    return [int(d) for d in re.findall(r"\d+", shape.split("[", 1)[1])]


@needs_libtpu
@pytest.mark.parametrize("regime,program", [("fmsd", "train_step"), ("fmsd", "mask_update"),
                                            ("full", "train_step"),
                                            ("linear_probe", "train_step")])
def test_fsdp_gathers_weights_per_layer_and_keeps_activations_split(fsdp_plans, regime,
                                                                    program):
    """With fsdp > 1 the compiled step is FSDP: every layer's split weights are all-gathered
    where used (forward, and again in the backward where remat recomputes them), gradients
    of split weights come back as reduce-scatters, and no activation (whose leading dimension
    is the per-chip batch) is ever all-reduced: the fault DESIGN.md §6 found (an all-reduce of
    every layer's activations, weights split on the contracted axis) stays fixed."""
    coll = fsdp_plans[regime]["programs"][program]["collectives"]
    layers = 2
    backward = regime != "linear_probe"  # a linear probe never differentiates the backbone
    assert coll["all-gather"]["count"] >= layers * (2 if backward else 1), coll
    activation_dims = {LOCAL_BATCH, LOCAL_BATCH * 17}  # (5, 17, 64) or flattened (85, 64)
    for kind in ("all-reduce", "reduce-scatter", "all-to-all", "collective-permute"):
        for shape in coll.get(kind, {}).get("shapes", []):
            assert not activation_dims & set(_dims(shape)), (kind, shape)
    if regime == "full":  # split weights' gradients are summed into their split layout
        assert {"f32[64,64]", "f32[64,256]"} <= set(coll["reduce-scatter"]["shapes"]), coll
    # Gradient and metric reductions are float32 whatever the compute dtype (issue 13, 5a).
    for kind in ("all-reduce", "reduce-scatter"):
        if kind in coll:
            assert coll[kind]["dtypes"] == ["f32"], (kind, coll[kind])


def test_layer_gather_and_fp32_gradient_vjps_leave_cpu_programs_unchanged():
    """Without an fsdp mesh the per-layer gather is the identity, and under a float32 compute
    dtype the fp32-gradient VJPs are plain autodiff: single-device runs compile as before."""
    from jax.sharding import Mesh

    from fmsd_jax import parallel
    from fmsd_jax.model import layers

    x = jnp.ones((4, 4))
    assert parallel.gather_weights(x) is x
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), parallel.BATCH_AXES)
    assert parallel.on_mesh(parallel.fsdp_size, mesh)() == 1
    assert parallel.on_mesh(parallel.gather_weights, mesh)(x) is x
    text = str(jax.make_jaxpr(lambda x, w, b: layers.add_bias(layers.matmul(x, w, jnp.float32), b))(
        x, x, x[0]))
    assert "custom_vjp" not in text and "sharding_constraint" not in text
    text16 = str(jax.make_jaxpr(lambda x, w: layers.matmul(x, w, jnp.bfloat16))(x, x))
    assert "custom_vjp" in text16


def test_fp32_gradient_vjps_equal_autodiff():
    """The bf16 matmul and bias VJPs give autodiff's gradients (up to bf16 rounding of the
    inputs), with the weight and bias gradients in float32."""
    from fmsd_jax.model import layers

    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (3, 5, 16)).astype(jnp.bfloat16)
    w, b = jax.random.normal(k[1], (16, 8)), jax.random.normal(k[2], (8,))
    g = jax.random.normal(k[3], (3, 5, 8)).astype(jnp.bfloat16)

    def plain(x, w, b):
        return x @ w.astype(x.dtype) + b.astype(x.dtype)

    want = jax.vjp(plain, x.astype(jnp.float32), w, b)[1](g.astype(jnp.float32))
    got = jax.vjp(lambda x, w, b: layers.add_bias(layers.matmul(x, w, jnp.bfloat16), b),
                  x, w, b)[1](g)
    assert [a.dtype for a in got] == [jnp.bfloat16, jnp.float32, jnp.float32]
    for a, b_ in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), b_, rtol=2e-2, atol=5e-2)


def test_artifact_path_gradients_equal_autodiff():
    """The fp32-reducing custom VJP is the same gradient as plain autodiff (fp32 inputs)."""
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (3, 5, 16))
    u, s, v = (jax.random.normal(k[1], (16, 4)), jax.random.normal(k[2], (4,)),
               jax.random.normal(k[3], (8, 4)))
    g = jax.random.normal(k[4], (3, 5, 8))

    def plain(x, u, s, v):
        return ((x @ u) * s) @ v.T

    want = jax.vjp(plain, x, u, s, v)[1](g)
    got = jax.vjp(decomp.artifact_path, x, u, s, v)[1](g)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # bf16 activations: the factor gradients still come back in the factors' fp32
    got16 = jax.vjp(decomp.artifact_path, x.astype(jnp.bfloat16), u, s, v)[1](
        g.astype(jnp.bfloat16))
    assert [a.dtype for a in got16] == [jnp.bfloat16, jnp.float32, jnp.float32, jnp.float32]


def test_hlo_collectives_count_loop_bodies_by_trip_count():
    program = """
%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ag = bf16[8,16]{1,0} all-gather(bf16[2,16]{1,0} %w), dimensions={0}
  ROOT %t = (s32[], f32[4]) tuple(%i, %x)
}

%cond (p: (s32[], f32[4])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]) while(%init), condition=%cond, body=%body, TRIP
  %ar = f32[1024]{0} all-reduce(f32[1024]{0} %g), to_apply=%add
  ROOT %r = f32[4] get-tuple-element(%w), index=1
}
"""
    trip = 'backend_config={"known_trip_count":{"n":"24"}}'
    got = hlo.hlo_collectives(program.replace("TRIP", trip))
    assert got["all-gather"] == {"count": 24, "bytes": 24 * 8 * 16 * 2, "dtypes": ["bf16"],
                                 "shapes": ["bf16[8,16]"]}
    assert got["all-reduce"] == {"count": 1, "bytes": 4096, "dtypes": ["f32"],
                                 "shapes": ["f32[1024]"]}


@pytest.mark.slow
def test_counted_flops_match_an_unrolled_compile(monkeypatch):
    """XLA's cost analysis counts a scanned layer loop once; our jaxpr count does not.

    Checked against XLA on the same step with the layer scan unrolled (then XLA sees every
    layer): the counts agree to within the elementwise work we leave out (< 10 %)."""
    cfg = tiny_cfg(**{"model.dtype": "float32", "model.variant": "B/16",
                      "model.image_size": 64, "train.batch_size": 2})
    cfg.model.attention_impl = "einsum"
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])

    def compiled_flops(unroll: bool) -> tuple[float, float]:
        if unroll:
            scan = jax.lax.scan
            monkeypatch.setattr(jax.lax, "scan", lambda *a, **k: scan(*a, **k, unroll=True))
        run = rebuild.open_run(cfg, None, mesh, abstract=True)
        parts = train_step.assemble_step(cfg, run, steps=1)
        args = (parts["state"], run.frozen, parts["sample"], parts["metric_sums"])
        counted = hlo.jaxpr_flops(jax.make_jaxpr(parts["step_fn"])(*args))
        cost = parts["step_fn"].lower(*args).compile().cost_analysis()
        monkeypatch.undo()
        return counted, float(cost["flops"])

    counted, scanned = compiled_flops(unroll=False)
    counted_unrolled, unrolled = compiled_flops(unroll=True)
    assert counted == pytest.approx(counted_unrolled, rel=1e-9)
    assert scanned < 0.3 * unrolled  # 12 layers counted as one
    assert counted == pytest.approx(unrolled, rel=0.10)


def test_parse_topology_names():
    assert topology.parse_topology("v5e-256") == ("v5e", "v5e:16x16", 256)
    assert topology.parse_topology("v5litepod-8") == ("v5e", "v5e:2x4", 8)
    assert topology.parse_topology("v4-128") == ("v4", "v4:4x4x4", 64)
    assert topology.parse_topology("v5p-512") == ("v5p", "v5p:4x8x8", 256)
    assert topology.parse_topology("v5e:2x2") == ("v5e", "v5e:2x2", 4)
    assert topology.parse_topology("v5p-8") == ("v5p", "v5p:2x2x1", 4)  # not 1x2x2: libtpu refuses
    assert topology.parse_topology("v4-32") == ("v4", "v4:2x2x4", 16)
    assert topology.slice_name("v4", 64) == "v4-128"
    with pytest.raises(topology.PlanError, match="v5e-256"):
        topology.parse_topology("tpu8")
    with pytest.raises(topology.PlanError, match="power-of-two"):
        topology.parse_topology("v5e-12")


@needs_libtpu
@pytest.mark.parametrize("name", ["v5e-1", "v5e-4", "v5e-256", "v4-8", "v4-16", "v4-4096",
                                  "v5p-8", "v5p-8192"])
def test_cloud_tpu_slice_names_give_libtpu_topologies(name):
    """Every size Cloud TPU sells must reach libtpu in a shape it accepts (v5p-8 once did not)."""
    _, devices = topology.topology_devices(name)
    assert len(devices) == topology.parse_topology(name)[2]


def test_without_libtpu_the_planner_says_how_to_install_it(monkeypatch):
    real = topology.importlib.util.find_spec
    monkeypatch.setattr(topology.importlib.util, "find_spec",
                        lambda n, *a: None if n == "libtpu" else real(n, *a))
    with pytest.raises(topology.PlanError) as e:
        topology.topology_devices("v5e-8")
    assert str(e.value) == topology.INSTALL_HINT and "\n" not in str(e.value)
    assert "pip install -r requirements-tpu.txt" in str(e.value)


@pytest.mark.slow
@needs_libtpu
def test_cli_plan_writes_json_and_errors_in_one_line(tmp_path):
    base = [sys.executable, "-m", "fmsd_jax.main", "--config", "configs/clip_b16.py",
            f"--workdir={tmp_path}", "--mode=plan", "--config.model.variant=tiny",
            "--config.model.image_size=32", "--config.train.batch_size=8",
            "--config.eval.batch_size=8", "--config.method.mask.top_k=2"]
    proc = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: --mode plan needs --topology")
    proc = subprocess.run(base + ["--topology=v5e-4", "--config.mesh.fsdp=3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "config.mesh.fsdp=3 does not divide the 4" in proc.stderr.strip().splitlines()[-1]
    proc = subprocess.run(base + ["--topology=v5e-4"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not re.search("tpu", proc.stderr, re.I), proc.stderr  # libtpu loads, unheard
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["slice"] == "v5e-4" and saved["mesh"] == {"data": 4, "fsdp": 1}
    assert "train_step: per chip" in proc.stdout


WIDE_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", {n})
sys.path.insert(0, {tests!r})
from conftest import train_losses
print("LOSSES", json.dumps(train_losses({ckpt!r}, data={data}, fsdp={fsdp})))
"""


@pytest.mark.slow
def test_64_devices_data8_fsdp8_match_one_device(tiny_clip_checkpoint):
    """The tiny model trains 3 steps on 64 virtual CPU devices (data 8 x fsdp 8) with the
    losses of one device. Tolerance: fp32 sums over 64 shards instead of one reorder the
    additions (relative error ~ log2(64) * 2^-24 ≈ 4e-7 per reduction); after two Adam steps
    the losses differ by about that, so rtol 1e-5 is 20x the expected reordering error and
    still catches a real sharding bug (a wrong gather or a double-counted shard moves the loss
    by percents)."""
    script = WIDE_SCRIPT.format(n=64, tests=str(ROOT / "tests"), ckpt=str(tiny_clip_checkpoint),
                                data=8, fsdp=8)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wide = json.loads(proc.stdout.split("LOSSES", 1)[1])
    assert wide["mesh"] == {"data": 8, "fsdp": 8}
    assert wide["split_leaves"] >= 8  # the fsdp path acted: kernels really are split 8 ways
    one = train_losses(str(tiny_clip_checkpoint), data=1, fsdp=1)
    print("64 devices:", wide["losses"], "1 device:", one["losses"])
    np.testing.assert_allclose(wide["losses"], one["losses"], rtol=1e-5)
    assert len(set(np.round(one["losses"], 6))) == 3  # the loss moved: steps really updated
    assert math.isfinite(sum(one["losses"]))
