"""Training input pipeline throughput (images/s) for 0, 1 and 2 grain workers, against the
rate at which a model consumes images at the demo size.

    python bench/data.py                      # writes the small synthetic set to a tmp dir
    python bench/data.py --data DIR --step-rate 3.5   # use a measured model steps/s

The model rate is either given (--step-rate, steps per second of the real train step) or
measured on a ViT-like forward+backward written here in plain JAX (patch 8, width 192,
6 blocks at 64 px), so this file needs nothing from fmsd_jax.model.  The pipeline keeps up
when its images/s exceeds the model's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fmsd_jax.data import pipeline  # noqa: E402
from fmsd_jax.data import synthetic as S  # noqa: E402
from fmsd_jax.data.config import get_data_config  # noqa: E402


def pipeline_rate(data_dir: str, workers: int, batch: int, image_size: int, batches: int,
                  warmup: int) -> tuple[float, float]:
    """(images/s in steady state, seconds to the first batch)."""
    c = get_data_config()
    c.update(S.data_config_overrides(data_dir))
    c.train_dataset = ('SynBlend', 'SynUpsample')
    c.image_size = image_size
    c.workers = workers
    loader = pipeline.make_train_loader(c, global_batch_size=batch, seed=0)
    t0 = time.perf_counter()
    with iter(loader) as it:
        next(it)
        first = time.perf_counter() - t0
        for _ in range(warmup):
            next(it)
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        dt = time.perf_counter() - t
    return batches * batch / dt, first


def model_rate(batch: int, image_size: int, steps: int = 10) -> float:
    """Training steps/s of a small ViT (forward + backward + SGD update) in plain JAX."""
    import jax
    import jax.numpy as jnp

    patch, width, depth, heads = 8, 192, 6, 3
    tokens = (image_size // patch) ** 2 + 1
    keys = iter(jax.random.split(jax.random.key(0), 8 * depth + 4))

    def dense(i, o):
        return jax.random.normal(next(keys), (i, o), jnp.float32) * (i ** -0.5)

    params = {'embed': dense(patch * patch * 3, width), 'pos': jnp.zeros((tokens, width)),
              'head': dense(width, 2),
              'blocks': [{'qkv': dense(width, 3 * width), 'out': dense(width, width),
                          'fc1': dense(width, 4 * width), 'fc2': dense(4 * width, width)}
                         for _ in range(depth)]}

    def ln(x):
        return (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)

    def forward(p, x):
        b = x.shape[0]
        g = image_size // patch
        x = x.reshape(b, g, patch, g, patch, 3).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, g * g, -1) @ p['embed']
        x = jnp.concatenate([jnp.zeros((b, 1, width)), x], 1) + p['pos']
        for blk in p['blocks']:
            q, k, v = jnp.split(ln(x) @ blk['qkv'], 3, -1)
            sh = lambda t: t.reshape(b, tokens, heads, width // heads)
            a = jax.nn.dot_product_attention(sh(q), sh(k), sh(v)).reshape(b, tokens, width)
            x = x + a @ blk['out']
            h = ln(x) @ blk['fc1']
            x = x + (h * jax.nn.sigmoid(1.702 * h)) @ blk['fc2']
        return ln(x[:, 0]) @ p['head']

    def loss(p, x, y):
        logits = forward(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    @jax.jit
    def step(p, x, y):
        g = jax.grad(loss)(p, x, y)
        return jax.tree.map(lambda a, b: a - 1e-3 * b, p, g)

    x = jnp.ones((batch, image_size, image_size, 3), jnp.float32)
    y = jnp.zeros((batch,), jnp.int32)
    params = jax.block_until_ready(step(params, x, y))  # compile
    t = time.perf_counter()
    for _ in range(steps):
        params = step(params, x, y)
    jax.block_until_ready(params)
    return steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--data', default=None, help='a written synthetic benchmark (dataset_root)')
    ap.add_argument('--size', default='small')
    ap.add_argument('--image-size', type=int, default=64)
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--batches', type=int, default=30)
    ap.add_argument('--warmup', type=int, default=5)
    ap.add_argument('--workers', default='0,1,2')
    ap.add_argument('--step-rate', type=float, default=None,
                    help='model train steps/s at --batch; measured on a small ViT if omitted')
    args = ap.parse_args()

    data = args.data or os.path.join(tempfile.gettempdir(), f'fmsd_synthetic_{args.size}')
    S.write_benchmark(data, size=args.size, seed=0)

    rows = []
    for w in (int(v) for v in args.workers.split(',')):
        rate, first = pipeline_rate(data, w, args.batch, args.image_size, args.batches,
                                    args.warmup)
        rows.append((f'grain pipeline, {w} worker(s)', rate, f'first batch {first:.1f} s'))
    if args.step_rate is not None:
        steps, src = args.step_rate, 'given --step-rate'
    else:
        steps, src = model_rate(args.batch, args.image_size), 'ViT-like p8 w192 d6, JAX CPU'
    rows.append((f'model train step ({src})', steps * args.batch, f'{steps:.2f} steps/s'))

    print(f'\nbatch {args.batch}, {args.image_size}px, synthetic "{args.size}" '
          f'(SynBlend+SynUpsample), augmentation on, {os.cpu_count()} CPUs')
    print(f'| {"what":<48} | {"images/s":>9} | {"note":<22} |')
    print(f'|{"-" * 50}|{"-" * 11}|{"-" * 24}|')
    for what, rate, note in rows:
        print(f'| {what:<48} | {rate:>9.0f} | {note:<22} |')


if __name__ == '__main__':
    main()
