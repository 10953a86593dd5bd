"""Is the training step limited by host work? Steps/s fed from memory vs from the real pipeline.

    python bench/input_bound.py                      # demo geometry, synthetic benchmark 'small'
    python bench/input_bound.py --size small-256 --image-size 224   # 256 px frames -> 224
    python bench/input_bound.py --variant B/16 --image-size 224 --batch 8 --steps 4 \
        --size small-256

Issue 7 asks that the step never wait on the host (input pipeline, metric fetches, Python in
the loop). The production step (fmsd_jax.run.train_step.make_train_step, FMSD regime,
regularisers on as
in the demo config, the detector normalising uint8 pixels on the device) is driven these ways:

  memory       the same device batch every step, dispatched back to back (the ceiling)
  host arrays  ready uint8 numpy batches, put on the device each step as modes/train.py does (the
               cost of `global_batch` and of the transfer, without decoding)
  pipeline     the host side alone: `next()` on make_train_loader's iterator, no step
  train loop   exactly train.train's loop body: `global_batch(mesh, next(it))`, then the step,
               with async dispatch (the host builds batch n+1 while the device runs step n)
  host-normalised  the reference: the same loop with CLIP normalisation done on the host into
               float32, as the pipeline did before (4x the bytes, one float pass per pixel)
  prefetched   the loop with the iterator wrapped in grain's ThreadPrefetchDatasetIterator (a
               background thread keeps `--prefetch` batches ready; checkpointable)

Default geometry is the demo's (configs/demo.py: a CLIP-shaped ViT of width 64, 4 layers, patch
8, at 64 px, batch 32, grain workers 0) on the synthetic benchmark at size 'small' (its
SynBlend family, the demo's training set), written once to --data-dir. Each mode runs --steps
steps after one warm-up step; steps/s is wall time over the run with one block at the end (as
train.py, which syncs only every log_every); the table gives the median over --rounds
interleaved rounds and the spread. `--size small-256` stores frames at DeepfakeBench's 256 px,
so `--image-size 224` measures the real decode + resize + augmentation cost.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ProductionStep, limit_threads, random_batch  # noqa: E402

DEMO = dict(width=64, layers=4, heads=4, patch_size=8, mlp_dim=256, proj_dim=None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="demo",
                    help="'demo' (configs/demo.py's pretrained ViT) or a VARIANTS key")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prefetch", type=int, default=2, help="batches the prefetch thread keeps")
    ap.add_argument("--size", default="small", choices=["small", "small-256"],
                    help="synthetic benchmark size: 64 px frames, or DeepfakeBench's 256 px")
    ap.add_argument("--data-dir", default=None,
                    help="where the synthetic benchmark is written / found "
                         "[default /tmp/fmsd_input_bound_SIZE]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0,
                    help="config.data.workers (grain); -1: auto, as the paper configs")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype (bfloat16 on accelerators)")
    ap.add_argument("--attention-impl", default=None, choices=[None, "einsum", "xla", "cudnn"])
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = limit_threads(args.threads)

    import grain
    import jax
    import numpy as np
    from flax import nnx

    from fmsd_jax.data import pipeline
    from fmsd_jax.data.config import get_data_config
    from fmsd_jax.data.synthetic import data_config_overrides, write_benchmark
    from fmsd_jax.method.decompose import decompose
    from fmsd_jax.model.detector import Detector
    from fmsd_jax.model.layers import resolve_attention_impl
    from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig

    args.data_dir = args.data_dir or f"/tmp/fmsd_input_bound_{args.size}"
    write_benchmark(args.data_dir, size=args.size, families=("blend",))  # SynBlend only
    data = get_data_config()
    data.update(data_config_overrides(args.data_dir))
    data.train_dataset = ("SynBlend",)
    data.image_size = args.image_size
    data.workers = args.workers

    geometry = DEMO if args.variant == "demo" else {}
    numerics = dict(dtype=args.dtype, attention_impl=args.attention_impl)
    cfg = (ViTConfig(image_size=args.image_size, **geometry, **numerics)
           if args.variant == "demo" else
           ViTConfig.from_variant(args.variant, image_size=args.image_size, proj_dim=None,
                                  **numerics))
    det = Detector(CLIPVisionTower(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1),
                   pixel_mean=data.mean, pixel_std=data.std)
    spec = decompose(det, num_subspaces=4, rank=1)
    step = ProductionStep(det, regime="fmsd", spec=spec, lambda_orth=0.1, lambda_spec=0.1,
                          batch=args.batch, image_size=args.image_size)
    fixed = step.device_batch(random_batch(args.batch, args.image_size, pixels=True))
    step(fixed)
    mean, std = np.asarray(data.mean, np.float32), np.asarray(data.std, np.float32)

    def host_normalised(batch: dict[str, Any]) -> dict[str, Any]:
        return {**batch, "image": (batch["image"].astype(np.float32) / 255.0 - mean) / std}

    def loader() -> Any:
        return pipeline.make_train_loader(data, global_batch_size=args.batch, seed=0)

    def timed(body, n: int) -> float:
        body()  # warm-up (first batch: file listing, first decode)
        step.block()
        t0 = time.perf_counter()
        for _ in range(n):
            body()
        step.block()
        return n / (time.perf_counter() - t0)

    hosts = [random_batch(args.batch, args.image_size, seed=i, pixels=True) for i in range(4)]
    count = iter(range(10**9))

    def modes() -> dict[str, Callable[[], Callable[[], Any]]]:
        """mode -> a factory of its loop body (a fresh iterator per round)."""
        def loop(wrap=lambda it: it, host=lambda b: b):
            it = wrap(iter(loader()))
            return lambda: step(step.device_batch(host(next(it))), block=False)

        def pipeline_only():
            it = iter(loader())
            return lambda: next(it)

        prefetch = lambda it: grain.experimental.ThreadPrefetchDatasetIterator(it, args.prefetch)
        return {
            "memory": lambda: lambda: step(fixed, block=False),
            "host arrays": lambda: lambda: step(step.device_batch(hosts[next(count) % 4]),
                                                block=False),
            "pipeline": pipeline_only,
            "train loop": loop,
            "host-normalised": lambda: loop(host=host_normalised),
            "prefetched": lambda: loop(wrap=prefetch),
        }

    # Both input dtypes compiled before timing (jit caches one executable per dtype).
    step(step.device_batch(host_normalised(random_batch(args.batch, args.image_size))))
    rates: dict[str, list[float]] = {}
    for _ in range(args.rounds):  # interleaved rounds: drift on a shared machine hits all
        for mode, make in modes().items():
            rates.setdefault(mode, []).append(timed(make(), args.steps))
    results = {mode: float(np.median(r)) for mode, r in rates.items()}
    spread = {mode: (min(r), max(r)) for mode, r in rates.items()}

    dev = jax.devices()[0]
    name = "demo ViT (w64, 4 layers, p8)" if args.variant == "demo" else args.variant
    print(f"\n{name} @ {args.image_size}px, batch {args.batch}, FMSD K=4 d=1 + L_orth + L_spec, "
          f"attention {resolve_attention_impl(cfg.attention_impl)}; {dev.platform} "
          f"({dev.device_kind}), {cfg.dtype}, {threads} threads; grain workers "
          f"{pipeline.resolve_workers(args.workers)} (--workers {args.workers}); "
          f"{args.steps} steps per mode after 1 warm-up, median of {args.rounds} interleaved "
          f"rounds; frames {args.size} ({args.data_dir})")
    print("\n| mode | steps/s | (min-max) | images/s | vs memory |")
    print("|---|---:|---:|---:|---:|")
    for mode, sps in results.items():
        lo, hi = spread[mode]
        print(f"| {mode} | {sps:.2f} | {lo:.2f}-{hi:.2f} | {sps * args.batch:.0f} | "
              f"{sps / results['memory']:.2f} |")


if __name__ == "__main__":
    main()
