"""Masked optimizer and reference train step: state only for trainable leaves, masked-out layers
bit-identical after many steps, a new mask without recompiling, frozen leaves not
differentiated, torch-Adam equivalence, schedules and per-group settings."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fmsd_jax.method.decompose import ArtifactFactor, SemanticWeight, decompose, trainable_filter
from fmsd_jax.method.objective import make_loss_fn
from fmsd_jax.method.optimizer import (
    make_optimizer,
    make_schedule,
    optim_config,
    optimizer_state_bytes,
    set_layer_mask,
)
from fmsd_jax.method.step import make_train_step
from fmsd_jax.model.detector import Detector, HeadParam
from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig

CFG = ViTConfig(width=32, layers=3, heads=2, patch_size=8, mlp_dim=48, proj_dim=None, image_size=16)
BATCH = dict(
    image=np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32),
    label=np.array([0, 1, 1, 0]),
)


def setup(mask, opt=None, regime="fmsd", lambdas=(0.1, 0.1)):
    det = Detector(CLIPVisionTower(CFG, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    spec = decompose(det, num_subspaces=2, rank=2) if regime == "fmsd" else None
    graphdef, trainable, frozen = nnx.split(det, trainable_filter(regime), ...)
    tx = make_optimizer(
        {"lr": 1e-2, **(opt or {})},
        trainable_state=trainable,
        layer_mask=mask,
        spec=spec,
        total_steps=100,
    )
    opt_state = tx.init(trainable)
    loss_fn = make_loss_fn(None, lambda_orth=lambdas[0], lambda_spec=lambdas[1])
    return det, spec, graphdef, trainable, frozen, tx, opt_state, loss_fn


def attn_factors(state):
    a = state["backbone"]["transformer"]["blocks"]["attn"]
    return {(t, f): np.asarray(a[t][f][...]) for t in ("q", "k", "v", "out") for f in "usv"}


def test_masked_layers_bit_identical_and_mask_change_never_recompiles():
    mask = np.zeros((3, 4), bool)
    mask[0, 0] = mask[2, 3] = mask[1, 2] = True
    _, _, graphdef, trainable, frozen, tx, opt_state, loss_fn = setup(mask)
    step = make_train_step(graphdef, tx, loss_fn)
    before = attn_factors(trainable)
    head0 = np.asarray(trainable["head_kernel"][...])
    for _ in range(12):
        trainable, opt_state, aux = step(trainable, opt_state, frozen, BATCH)
    chex.assert_tree_all_finite(aux)
    after = attn_factors(trainable)
    for (t, f), x0 in before.items():
        j = ("q", "k", "v", "out").index(t)
        for layer in range(3):
            same = np.array_equal(after[(t, f)][layer], x0[layer])
            assert same == (not mask[layer, j]), (t, f, layer)
    assert not np.array_equal(np.asarray(trainable["head_kernel"][...]), head0)
    # a new mask is data: same compiled step
    n_compiled = step._cache_size()
    new_mask = np.zeros((3, 4), bool)
    new_mask[1, 1] = True
    opt_state = set_layer_mask(opt_state, new_mask)
    snap = attn_factors(trainable)
    trainable, opt_state, _ = step(trainable, opt_state, frozen, BATCH)
    assert step._cache_size() == n_compiled
    after = attn_factors(trainable)
    assert not np.array_equal(after[("k", "u")][1], snap[("k", "u")][1])
    assert np.array_equal(after[("q", "u")][0], snap[("q", "u")][0])


def test_optimizer_state_only_for_trainable_leaves():
    mask = np.ones((3, 4), bool)
    det, _, _, trainable, frozen, _, opt_state, _ = setup(mask)
    train_bytes = sum(x.nbytes for x in jax.tree.leaves(trainable))
    frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
    state_bytes = optimizer_state_bytes(opt_state)
    # Adam's two moments + the (L, targets) mask and a few step counters.
    assert 2 * train_bytes <= state_bytes <= 2 * train_bytes + 3 * 4 * 4 + 64
    assert frozen_bytes > 10 * train_bytes
    n_frozen_in_state = sum(
        isinstance(v, SemanticWeight)
        for v in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    )
    assert n_frozen_in_state == 0


def test_frozen_leaves_are_not_differentiated():
    """The step's gradient exists only for trainable leaves, and the frozen state is an
    undifferentiated input: its cotangent never appears in the compiled program's outputs."""
    _, _, graphdef, trainable, frozen, tx, opt_state, loss_fn = setup(np.ones((3, 4)))

    def loss_of(t):
        return loss_fn(nnx.merge(graphdef, t, frozen), BATCH)[0]

    grads = jax.jit(jax.grad(loss_of))(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    kinds = {type(v) for v in jax.tree.leaves(grads, is_leaf=lambda x: isinstance(x, nnx.Variable))}
    assert kinds == {ArtifactFactor, HeadParam}
    # In the jitted step no output has a frozen weight's shape other than the frozen inputs
    # themselves (they are not outputs at all): the program returns trainable/opt-state/aux.
    step = make_train_step(graphdef, tx, loss_fn)
    out_shapes = jax.eval_shape(step, trainable, opt_state, frozen, BATCH)
    frozen_shapes = {x.shape for x in jax.tree.leaves(frozen) if x.ndim == 3 and x.shape[-1] == 32}
    out_set = {x.shape for x in jax.tree.leaves(out_shapes)}
    assert not frozen_shapes & out_set


def test_matches_torch_adam_with_l2_weight_decay():
    """name='adam' is torch.optim.Adam(weight_decay=wd) as Effort configures it."""
    torch = pytest.importorskip("torch")  # the other optimizer tests run without it
    w0 = np.random.default_rng(2).normal(size=(5,)).astype(np.float32)
    grads = np.random.default_rng(3).normal(size=(6, 5)).astype(np.float32)
    state = nnx.State({"head": HeadParam(jnp.asarray(w0))})
    tx = make_optimizer(
        dict(lr=1e-2, weight_decay=5e-2),
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
    _, _, graphdef, trainable, frozen, tx, opt_state, loss_fn = setup(
        np.ones((3, 4)),
        opt=dict(lr=0.0, head_lr=1e-2, weight_decay=0.0, grad_clip=1.0, name="adamw"),
        lambdas=(0.0, 0.0),
    )
    before = attn_factors(trainable)
    step = make_train_step(graphdef, tx, loss_fn)
    head0 = np.asarray(trainable["head_bias"][...])
    trainable, opt_state, _ = step(trainable, opt_state, frozen, BATCH)
    for k, v in attn_factors(trainable).items():
        np.testing.assert_array_equal(v, before[k], err_msg=str(k))
    assert not np.array_equal(np.asarray(trainable["head_bias"][...]), head0)
    sched = make_schedule(1.0, schedule="cosine", warmup_steps=10, total_steps=110)
    np.testing.assert_allclose(
        [float(sched(i)) for i in (0, 5, 10, 60, 110)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6
    )
    const = make_schedule(2.0, schedule="constant", warmup_steps=4, total_steps=100)
    np.testing.assert_allclose([float(const(i)) for i in (0, 2, 4, 50)], [0, 1, 2, 2])
    with pytest.raises(ValueError, match="unknown optim field"):
        optim_config(dict(learning_rate=1.0))
    with pytest.raises(ValueError, match="layer mask shape"):
        setup(np.ones((2, 4)))


def test_full_and_linear_probe_regimes():
    for regime, check in (("full", lambda n: n > 10_000), ("linear_probe", lambda n: n == 66)):
        _, _, graphdef, trainable, frozen, tx, opt_state, loss_fn = setup(
            None, regime=regime, lambdas=(0.0, 0.0)
        )
        n = sum(x.size for x in jax.tree.leaves(trainable))
        assert check(n), (regime, n)
        step = make_train_step(graphdef, tx, loss_fn)
        trainable, opt_state, aux = step(trainable, opt_state, frozen, BATCH)
        chex.assert_tree_all_finite((trainable, aux))


def test_the_logged_learning_rates_are_the_schedules_the_optimizer_uses():
    from fmsd_jax.method.optimizer import learning_rates

    lrs = learning_rates({"lr": 1e-2, "head_lr": 1e-3, "schedule": "cosine", "warmup_steps": 4},
                         total_steps=20)
    assert float(lrs["lr"](0)) == 0.0 and float(lrs["head_lr"](0)) == 0.0  # linear warm-up
    np.testing.assert_allclose([float(lrs["lr"](2)), float(lrs["lr"](4))], [5e-3, 1e-2],
                               rtol=1e-6)
    np.testing.assert_allclose(float(lrs["head_lr"](4)), 1e-3, rtol=1e-6)
    assert float(lrs["lr"](20)) == 0.0  # cosine to zero at the last step
    same = learning_rates({"lr": 3e-4}, total_steps=10)  # head_lr None: the backbone's
    assert float(same["head_lr"](5)) == float(same["lr"](5)) == pytest.approx(3e-4)
