"""Masked optimizer on the production train step (`train_step.make_train_step`, one-device mesh):
state only for trainable leaves, masked-out layers bit-identical after many steps, a new mask
without recompiling, frozen leaves not differentiated, torch-Adam equivalence, schedules and
per-group settings, and the settings read from config_base's one default table."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import counting_compiles, objective_settings, optim_settings, production_step
from flax import nnx

from fmsd_jax import config_base
from fmsd_jax.method.decompose import decompose
from fmsd_jax.method.objective import ObjectiveConfig
from fmsd_jax.method.optimizer import (
    OptimConfig,
    learning_rates,
    make_optimizer,
    make_schedule,
    optimizer_state_bytes,
)
from fmsd_jax.model.detector import Detector, HeadParam
from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig
from fmsd_jax.run import factory

CFG = ViTConfig(width=32, layers=3, heads=2, patch_size=8, mlp_dim=48, proj_dim=None, image_size=16)
BATCH = dict(
    image=np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32),
    label=np.array([0, 1, 1, 0], np.int32),
)


def setup(mask, opt=None, regime="fmsd", lambdas=(0.1, 0.1), dtype="float32"):
    """The production step on a fresh 3-layer detector, lr 1e-2 for both groups unless `opt`
    says otherwise, and the batch on its mesh."""
    cfg = dataclasses.replace(CFG, dtype=dtype)
    det = Detector(CLIPVisionTower(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    spec = decompose(det, num_subspaces=2, rank=2) if regime == "fmsd" else None
    step = production_step(det, regime=regime, spec=spec, batch=BATCH, mask=mask,
                           optim={"lr": 1e-2, "head_lr": 1e-2, **(opt or {})},
                           lambda_orth=lambdas[0], lambda_spec=lambdas[1], total_steps=100)
    return det, step, step.device_batch(BATCH)


def attn_factors(state):
    a = state["backbone"]["transformer"]["blocks"]["attn"]
    return {(t, f): np.asarray(a[t][f][...]) for t in ("q", "k", "v", "out") for f in "usv"}


def all_finite(metrics: dict[str, float]) -> bool:
    return bool(metrics) and all(np.isfinite(v) for v in metrics.values())


def test_masked_layers_bit_identical_and_mask_change_never_recompiles():
    mask = np.zeros((3, 4), bool)
    mask[0, 0] = mask[2, 3] = mask[1, 2] = True
    _, step, batch = setup(mask)
    compiles: list[int] = []
    run = counting_compiles(step, compiles)
    before = attn_factors(step.trainable)
    head0 = np.asarray(step.trainable["head_kernel"][...])
    for _ in range(12):
        run(batch)
    assert all_finite(step.mean_metrics())
    assert compiles[0] >= 1 and compiles[1:] == [0] * 11, compiles  # compiled once
    after = attn_factors(step.trainable)
    for (t, f), x0 in before.items():
        j = ("q", "k", "v", "out").index(t)
        for layer in range(3):
            same = np.array_equal(after[(t, f)][layer], x0[layer])
            assert same == (not mask[layer, j]), (t, f, layer)
    assert not np.array_equal(np.asarray(step.trainable["head_kernel"][...]), head0)
    # A new mask is data of the same compiled program: no compile, and it takes effect.
    new_mask = np.zeros((3, 4), bool)
    new_mask[1, 1] = True
    step.set_layer_mask(new_mask)
    snap = attn_factors(step.trainable)
    run(batch)
    assert compiles[-1] == 0, compiles
    after = attn_factors(step.trainable)
    assert not np.array_equal(after[("k", "u")][1], snap[("k", "u")][1])
    assert np.array_equal(after[("q", "u")][0], snap[("q", "u")][0])
    assert np.array_equal(after[("out", "u")][2], snap[("out", "u")][2])  # selected before


def test_optimizer_state_only_for_trainable_leaves():
    """Adam's two moments for the trainable leaves, the (L, targets) mask and step counters,
    nothing for the frozen weights."""
    _, step, _ = setup(np.ones((3, 4), bool))
    train_bytes = sum(x.nbytes for x in jax.tree.leaves(step.trainable))
    frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(step.run.frozen))
    state_bytes = optimizer_state_bytes(step.opt_state)
    assert frozen_bytes > 10 * train_bytes  # so a state for frozen leaves breaks the bound
    assert 2 * train_bytes <= state_bytes <= 2 * train_bytes + 3 * 4 * 4 + 64


def _dots_shaped_like(jaxpr, shapes: set[tuple[int, ...]]) -> int:
    """dot_general / conv outputs of the (closed) jaxpr, nested ones included, whose shape is
    one of `shapes`: a weight gradient has its weight's shape."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            n += tuple(eqn.outvars[0].aval.shape) in shapes
        for v in eqn.params.values():
            for item in v if isinstance(v, tuple | list) else (v,):
                if hasattr(item, "eqns") or hasattr(getattr(item, "jaxpr", None), "eqns"):
                    n += _dots_shaped_like(item, shapes)
    return n


def _shapes(tree) -> set[tuple[int, ...]]:
    """Every leaf's shape and, for a stacked (per-layer) leaf, one layer's shape."""
    return {s for x in jax.tree.leaves(tree) for s in (tuple(x.shape), tuple(x.shape[1:]))
            if len(s) >= 2}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_frozen_leaves_are_not_differentiated(dtype):
    """No matmul of the production step's program has the shape of a frozen weight (W_s, the
    MLP kernels; shapes a trainable leaf shares left out), i.e. no frozen weight's gradient is
    formed; the same count on full fine-tuning, where those weights train, is not zero.
    bfloat16 runs the custom VJPs whose symbolic zeros skip a frozen kernel's gradient
    (model/vit.py); float32 is plain autodiff."""
    counts, shapes = {}, None
    for regime in ("fmsd", "full"):
        _, step, batch = setup(np.ones((3, 4)) if regime == "fmsd" else None, regime=regime,
                               lambdas=(0.0, 0.0), dtype=dtype)
        if shapes is None:
            shapes = _shapes(step.run.frozen) - _shapes(step.trainable)
            assert {(32, 32), (32, 48), (48, 32)} <= shapes  # per-layer W_s and MLP kernels
        jaxpr = jax.make_jaxpr(step.jitted)(step.state, step.run.frozen, batch,
                                            step.metric_sums)
        counts[regime] = _dots_shaped_like(jaxpr, shapes)
    assert counts["fmsd"] == 0, counts
    assert counts["full"] >= 6, counts  # q, k, v, out, fc1, fc2 of the layer scan


def test_matches_torch_adam_with_l2_weight_decay():
    """name='adam' is torch.optim.Adam(weight_decay=wd) as Effort configures it."""
    torch = pytest.importorskip("torch")  # the other optimizer tests run without it
    w0 = np.random.default_rng(2).normal(size=(5,)).astype(np.float32)
    grads = np.random.default_rng(3).normal(size=(6, 5)).astype(np.float32)
    state = nnx.State({"head": HeadParam(jnp.asarray(w0))})
    tx = make_optimizer(
        optim_settings(lr=1e-2, head_lr=1e-2, weight_decay=5e-2, head_weight_decay=5e-2),
        trainable_state=state,
        layer_mask=None,
        spec=None,
        total_steps=6,
    )
    opt_state = tx.init(state)
    tp = torch.tensor(w0, requires_grad=True)
    topt = torch.optim.Adam([tp], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=5e-2)
    for g in grads:
        gs = nnx.State({"head": HeadParam(jnp.asarray(g))})
        upd, opt_state = tx.update(gs, opt_state, state)
        state = optax.apply_updates(state, upd)
        tp.grad = torch.tensor(g)
        topt.step()
    np.testing.assert_allclose(
        np.asarray(state["head"][...]), tp.detach().numpy(), rtol=1e-5, atol=1e-6
    )


def test_groups_schedule_and_clipping():
    # body lr 0: only the head moves
    _, step, batch = setup(
        np.ones((3, 4)),
        opt=dict(lr=0.0, head_lr=1e-2, weight_decay=0.0, head_weight_decay=0.0, grad_clip=1.0,
                 name="adamw"),
        lambdas=(0.0, 0.0),
    )
    before = attn_factors(step.trainable)
    head0 = np.asarray(step.trainable["head_bias"][...])
    step(batch)
    for k, v in attn_factors(step.trainable).items():
        np.testing.assert_array_equal(v, before[k], err_msg=str(k))
    assert not np.array_equal(np.asarray(step.trainable["head_bias"][...]), head0)
    sched = make_schedule(1.0, schedule="cosine", warmup_steps=10, total_steps=110)
    np.testing.assert_allclose(
        [float(sched(i)) for i in (0, 5, 10, 60, 110)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6
    )
    const = make_schedule(2.0, schedule="constant", warmup_steps=4, total_steps=100)
    np.testing.assert_allclose([float(const(i)) for i in (0, 2, 4, 50)], [0, 1, 2, 2])
    with pytest.raises(ValueError, match="layer mask shape"):
        setup(np.ones((2, 4)))


def test_grad_clip_scales_the_gradient_adam_sees_and_0_disables_it():
    """grad_clip c rescales a gradient of global norm above c to norm c before Adam; 0 (the
    config default) clips nothing. Adam's first moment after one step is (1 - b1)·g of the
    gradient it was given, so it shows that gradient's norm."""
    state = nnx.State({"head": HeadParam(jnp.asarray([3.0, 4.0]))})
    grads = nnx.State({"head": HeadParam(jnp.asarray([3.0, 4.0]))})  # global norm 5
    for clip, want in ((1.0, 1.0), (0.0, 5.0), (10.0, 5.0)):
        opt = optim_settings(grad_clip=clip, weight_decay=0.0, head_weight_decay=0.0)
        tx = make_optimizer(opt, trainable_state=state, layer_mask=None, spec=None,
                            total_steps=1)
        opt_state = tx.update(grads, tx.init(state), state)[1]
        adam = [s for s in jax.tree.leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
        norm = float(optax.tree.norm([s.mu for s in adam])) / (1 - opt.b1)
        np.testing.assert_allclose(norm, want, rtol=1e-6, err_msg=f"grad_clip={clip}")


def test_full_and_linear_probe_regimes():
    for regime, check in (("full", lambda n: n > 10_000), ("linear_probe", lambda n: n == 66)):
        _, step, batch = setup(None, regime=regime, lambdas=(0.0, 0.0))
        n = sum(x.size for x in jax.tree.leaves(step.trainable))
        assert check(n), (regime, n)
        before = jax.tree.map(np.asarray, step.trainable)
        step(batch)
        assert all_finite(step.mean_metrics())
        moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before,
                             step.trainable)
        assert all(jax.tree.leaves(moved)), regime  # every trainable leaf took a step


def test_the_logged_learning_rates_are_the_schedules_the_optimizer_uses():
    lrs = learning_rates(optim_settings(lr=1e-2, head_lr=1e-3, schedule="cosine",
                                        warmup_steps=4), total_steps=20)
    assert float(lrs["lr"](0)) == 0.0 and float(lrs["head_lr"](0)) == 0.0  # linear warm-up
    np.testing.assert_allclose([float(lrs["lr"](2)), float(lrs["lr"](4))], [5e-3, 1e-2],
                               rtol=1e-6)
    np.testing.assert_allclose(float(lrs["head_lr"](4)), 1e-3, rtol=1e-6)
    assert float(lrs["lr"](20)) == 0.0  # cosine to zero at the last step


def test_the_method_layer_has_no_defaults_and_reads_config_base():
    """config_base.py is the one default table: the method layer's settings classes declare no
    default of their own, and a run's settings are config_base's fields, every one of them."""
    for cls in (OptimConfig, ObjectiveConfig):
        with_default = [f.name for f in dataclasses.fields(cls)
                        if f.default is not dataclasses.MISSING
                        or f.default_factory is not dataclasses.MISSING]
        assert with_default == [], (cls.__name__, with_default)
    base = config_base.base_config()
    assert dataclasses.asdict(factory.optim_section(base)) == base.optim.to_dict()
    objective = dataclasses.asdict(factory.objective_section(base))
    assert objective == {k: base.method[k] for k in objective}
    assert set(objective) == {"lambda_orth", "lambda_spec", "spectral_form"}
    # The defaults a test gets are those too (the review found head_lr, grad_clip and
    # spectral_form disagreeing between two tables).
    assert optim_settings() == factory.optim_section(base)
    assert objective_settings() == factory.objective_section(base)
    with pytest.raises(ValueError, match=r"unknown optim field\(s\) \['learning_rate'\]"):
        bad = base.optim.to_dict() | {"learning_rate": 1.0}
        from ml_collections import ConfigDict

        factory.optim_section(ConfigDict({"optim": bad}))
    with pytest.raises(ValueError, match=r"config.method lacks \['spectral_form'\]"):
        from ml_collections import ConfigDict

        factory.objective_section(ConfigDict({"method": {"lambda_orth": 0.0,
                                                         "lambda_spec": 0.0}}))
    with pytest.raises(ValueError, match="optim.schedule='linear'"):
        optim_settings(schedule="linear")
