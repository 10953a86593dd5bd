"""Training-step time and peak memory: FMSD factorised vs Effort's rebuilt weight vs full
fine-tuning, plus the layer-mask estimator and the semantic-part storage choice.

    python bench/decomposed_step.py                       # ViT-B/16, 224 px, batch 8
    python bench/decomposed_step.py --variant tiny --image-size 32 --iters 3   # smoke

Rows (same ViT, same batch, random weights — timing does not depend on their values):
  forward        inference of the detector (reference for the ratios)
  (a) fmsd       decomposed q/k/v/out, factorised forward, CE only, all layers unmasked
  (a+) fmsd+reg  (a) with L_orth and L_spec (λ = 0.1 each): the regulariser cost
  (b) rebuild    Effort's design: W = W_s + U diag(s) Vᵀ rebuilt every step
  (c) full       full fine-tuning of the dense model (every nnx.Param)
  (d) mask est.  one layer-mask estimator step (dense W gradient + Welford moments)
  (e) sem. fact. (a) with the semantic part stored factored (U_r s_r, V_rᵀ): why it is dense

Rows (a)–(e) run the production train step (run/train_step.py, through
bench/_common.ProductionStep: explicit shardings, donated state, the optimizer and objective
from config_base's defaults); the forward and the estimator rows jit their own function.

Time: median and min–max of --iters steps after --warmup (each step fed its own donated
output). Memory: XLA's compiled memory analysis (arguments + outputs + temporaries − aliased),
on every backend; on GPU/TPU also the device's peak_bytes_in_use after the row (monotone over
the run, so it reads as "at most").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench._common import ProductionStep, device_peak, random_batch, xla_memory  # noqa: E402
from fmsd_jax.method.decompose import (  # noqa: E402
    DecomposedDense,
    SemanticWeight,
    decompose,
    decomposed_layers,
)
from fmsd_jax.method.masking import candidate_split, init_moments, make_moment_update  # noqa: E402
from fmsd_jax.method.objective import CROSS_ENTROPY, make_loss_fn  # noqa: E402
from fmsd_jax.model.detector import Detector  # noqa: E402
from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig  # noqa: E402


class FactoredSemanticDense(DecomposedDense):
    """Bench-only: the semantic part as two rank-r factors instead of one dense matrix."""

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        x = x.astype(dt)
        y = (x @ self.sem_a[...].astype(dt)) @ self.sem_b[...].astype(dt)
        z = (x @ self.u[...].astype(dt)) * self.s[...].astype(dt)
        y = y + z @ self.v[...].astype(dt).T
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        return y


def factor_semantic(det: Detector, targets: tuple[str, ...]) -> None:
    for t, layer in decomposed_layers(det, targets).items():
        w_s = layer.semantic[...]
        u, s, vh = jnp.linalg.svd(w_s, full_matrices=False)
        r = min(w_s.shape[-2:]) - layer.s.shape[-1]
        ref = {k: getattr(layer, k)[...] for k in ("u0", "s0", "v0", "energy0")}
        new = FactoredSemanticDense(
            w_s,
            layer.u[...],
            layer.s[...],
            layer.v[...],
            layer.bias[...] if layer.bias is not None else None,
            num_subspaces=layer.num_subspaces,
            dtype=layer.dtype,
            reference=ref,
            semantic_basis={},
        )
        new.semantic = SemanticWeight(jnp.zeros(w_s.shape[:1] + (1, 1), jnp.float32))
        new.sem_a = SemanticWeight(u[..., :r] * s[..., None, :r])
        new.sem_b = SemanticWeight(vh[..., :r, :])
        parent = (
            det.backbone.transformer.blocks.attn
            if t in ("q", "k", "v", "out")
            else det.backbone.transformer.blocks.mlp
        )
        setattr(parent, t, new)


def time_loop(
    fn: Callable, args: tuple, carry: Callable[[Any, tuple], tuple], *, warmup: int, iters: int
) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    jitted = jax.jit(fn, donate_argnums=getattr(fn, "donate", ()))
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(warmup + iters):
        t = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        args = carry(out, args)
    return compile_s, times, compiled


def build(args: argparse.Namespace, *, decomposed: bool, mode: str = "factorised"):
    cfg = ViTConfig.from_variant(args.variant, image_size=args.image_size, dtype=args.dtype)
    det = Detector(CLIPVisionTower(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    spec = None
    if decomposed:
        spec = decompose(
            det, targets=args.targets, num_subspaces=args.num_subspaces, rank=args.rank, mode=mode
        )
    return cfg, det, spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="B/16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--num-subspaces", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--targets", default="q,k,v,out")
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--rows",
        default="forward,a,a+,b,c,d,e",
        help="comma-separated subset of forward,a,a+,b,c,d,e",
    )
    args = p.parse_args()
    args.targets = tuple(args.targets.split(","))
    rows = args.rows.split(",")

    host_batch = random_batch(args.batch, args.image_size)
    batch = jax.tree.map(jnp.asarray, host_batch)
    results: list[tuple[str, str, float, list[float], float, float, float, int]] = []

    def train_row(key: str, name: str, det: Detector, spec, regime: str, lambdas=(0.0, 0.0)):
        """One row: the production train step (run/train_step.py: sharded, donated, compiled
        once) on `det`, the masked optimizer and objective from config_base's defaults."""
        step = ProductionStep(det, regime=regime, spec=spec, lambda_orth=lambdas[0],
                              lambda_spec=lambdas[1], batch=args.batch,
                              image_size=args.image_size, total_steps=1000)
        on_mesh = step.device_batch(host_batch)
        c = step.compile(on_mesh)
        times = []
        for i in range(args.warmup + args.iters):
            t = time.perf_counter()
            step(on_mesh)  # blocks until the step's outputs are ready
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        results.append((key, name, c, times, *xla_memory(step.compiled), device_peak(),
                        step.num_trainable))

    if "forward" in rows:
        _, det, _ = build(args, decomposed=False)
        graphdef, state = nnx.split(det)

        def fwd(state, images):
            return nnx.merge(graphdef, state)(images)

        c, times, compiled = time_loop(
            fwd, (state, batch["image"]), lambda out, a: a, warmup=args.warmup, iters=args.iters
        )
        results.append(
            ("forward", "forward (inference)", c, times, *xla_memory(compiled), device_peak(), 0)
        )
    if "a" in rows:
        _, det, spec = build(args, decomposed=True)
        train_row("a", "(a) FMSD factorised", det, spec, "fmsd")
    if "a+" in rows:
        _, det, spec = build(args, decomposed=True)
        train_row("a+", "(a+) FMSD + L_orth + L_spec", det, spec, "fmsd", (0.1, 0.1))
    if "b" in rows:
        _, det, spec = build(args, decomposed=True, mode="rebuild")
        train_row("b", "(b) W rebuilt each step (Effort)", det, spec, "fmsd")
    if "c" in rows:
        _, det, _ = build(args, decomposed=False)
        train_row("c", "(c) full fine-tuning", det, None, "full")
    if "d" in rows:
        _, det, _ = build(args, decomposed=False)
        graphdef, cand, rest = candidate_split(det, args.targets)
        upd = make_moment_update(graphdef, make_loss_fn(CROSS_ENTROPY))
        upd.donate = (0,)
        c, times, compiled = time_loop(
            upd,
            (init_moments(cand), cand, rest, batch),
            lambda out, a: (out, *a[1:]),
            warmup=args.warmup,
            iters=args.iters,
        )
        results.append(
            (
                "d",
                "(d) mask estimator / batch",
                c,
                times,
                *xla_memory(compiled),
                device_peak(),
                sum(x.size for x in jax.tree.leaves(cand)),
            )
        )
    if "e" in rows:
        _, det, spec = build(args, decomposed=True)
        factor_semantic(det, args.targets)
        train_row("e", "(e) semantic part factored", det, spec, "fmsd")

    ref = {k: statistics.median(t) for k, _, _, t, *_ in results}
    base = ref.get("a")
    fwd_t = ref.get("forward")
    dev = jax.devices()[0]
    print(
        f"\n{args.variant} @ {args.image_size}px, batch {args.batch}, {args.dtype}, "
        f"K={args.num_subspaces} d={args.rank} targets={','.join(args.targets)}; "
        f"{dev.platform} ({dev.device_kind}); {args.iters} iters after {args.warmup} warm-up"
    )
    hdr = (
        f"| {'row':34s} | step ms (median) | min–max ms | vs (a) | vs fwd | compile s "
        f"| XLA total MiB | XLA temp MiB | device peak MiB | trainable |"
    )
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for _key, name, c, times, tot, tmp, peak, n in results:
        med = statistics.median(times)
        r_a = f"{med / base:.2f}" if base else "-"
        r_f = f"{med / fwd_t:.2f}" if fwd_t else "-"
        spread = f"{min(times) * 1e3:.1f}–{max(times) * 1e3:.1f}"
        print(
            f"| {name:34s} | {med * 1e3:16.1f} | {spread:>10s}"
            f" | {r_a:>6s} | {r_f:>6s} | {c:9.1f} | {tot:13.1f} | {tmp:12.1f} | {peak:15.1f} "
            f"| {n:9d} |"
        )


if __name__ == "__main__":
    main()
