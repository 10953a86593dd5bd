"""Forward throughput of our CLIP vision tower against transformers' CLIPVisionModel.

Both run the same random weights (the PyTorch model is written with `save_pretrained` and read
back through `load_clip_vision`, so the bench also exercises the loader) on the same batch,
with the same number of CPU threads, and the table reports images/s and our ratio to PyTorch.
The outputs are compared too, so a fast but wrong tower cannot win.

    python bench/backbone.py --variant B/16 --batch 8 --image-size 224 --iters 10
    python bench/backbone.py --variant B/16 --batch 64 --dtype bfloat16   # on a GPU host

Threads: the process is pinned to `--threads` cores (sched_setaffinity), PyTorch gets
`torch.set_num_threads`, XLA gets `intra_op_parallelism_threads`; pinning is what actually
holds XLA's CPU runtime to the count. On a GPU host (jax's first device is a GPU and torch
sees CUDA) both run on the GPU; `--dtype bfloat16` means bf16 compute with float32 parameters
on both sides (ours by config, PyTorch by autocast). fp32 matmuls are full fp32 on both sides
unless `--tf32`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench._common import limit_threads, median_seconds  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="B/16", help="a key of fmsd_jax.model.vit.VARIANTS")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=10, help="timed forward passes (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for both (default: all cores this process may use)")
    ap.add_argument("--attention-impl", default=None, choices=[None, "xla", "cudnn"],
                    help="jax.nn.dot_product_attention implementation")
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"],
                    help="transformers attention implementation")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls on GPU")
    ap.add_argument("--skip-torch", action="store_true", help="time only our tower")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = limit_threads(args.threads)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from fmsd_jax.model.vit import VARIANTS
    from fmsd_jax.model.weights.load import load_clip_vision

    torch.set_num_threads(threads)
    on_gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
    tdev = torch.device("cuda" if on_gpu else "cpu")
    jax.config.update("jax_default_matmul_precision",
                      "tensorfloat32" if args.tf32 else "highest")
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")

    v = VARIANTS[args.variant]
    hf_cfg = transformers.CLIPVisionConfig(
        hidden_size=v["width"], num_hidden_layers=v["layers"], num_attention_heads=v["heads"],
        intermediate_size=v["mlp_dim"], patch_size=v["patch_size"], image_size=args.image_size,
        hidden_act="quick_gelu", layer_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModel._from_config(hf_cfg, attn_implementation=args.hf_attn).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        tower = load_clip_vision(d, dtype=args.dtype, attention_impl=args.attention_impl)
    hf = hf.to(tdev)

    x = np.random.default_rng(0).standard_normal(
        (args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
    xj = jax.device_put(jnp.asarray(x), jax.devices()[0])
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(tdev)

    graphdef, state = nnx.split(tower)
    fwd = jax.jit(lambda s, im: nnx.merge(graphdef, s)(im))
    ours_out = {}

    def ours_step():
        ours_out["y"] = fwd(state, xj).block_until_ready()

    rows = []
    first, med = median_seconds(ours_step, args.iters, args.warmup)
    dev_name = jax.devices()[0].device_kind if on_gpu else f"cpu x{threads} threads"
    rows.append(("fmsd_jax CLIPVisionTower (jit)", first, med))

    err = None
    if not args.skip_torch:
        amp = (torch.autocast(tdev.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
               else contextlib.nullcontext())
        torch_out = {}

        def torch_step():
            with torch.inference_mode(), amp:
                torch_out["y"] = hf(pixel_values=xt).pooler_output
            if on_gpu:
                torch.cuda.synchronize()

        first_t, med_t = median_seconds(torch_step, args.iters, args.warmup)
        rows.append((f"transformers CLIPVisionModel ({args.hf_attn})", first_t, med_t))
        err = float(np.abs(np.asarray(ours_out["y"]) -
                           torch_out["y"].float().cpu().numpy()).max())

    print(f"\nCLIP {args.variant} forward, batch {args.batch}, {args.image_size} px, "
          f"{args.dtype}, {dev_name}; median of {args.iters} after {args.warmup} warm-up")
    print(f"jax {jax.__version__} / torch {torch.__version__} / transformers "
          f"{transformers.__version__}\n")
    base = rows[-1][2] if not args.skip_torch else None
    print("| implementation | first call s | median ms | images/s | vs PyTorch |")
    print("|---|---:|---:|---:|---:|")
    for name, first_s, med_s in rows:
        ratio = f"{base / med_s:.2f}x" if base else "-"
        print(f"| {name} | {first_s:.2f} | {med_s * 1e3:.1f} | {args.batch / med_s:.1f} | "
              f"{ratio} |")
    if err is not None:
        print(f"\nmax |ours - transformers| on the pooled feature: {err:.2e}")


if __name__ == "__main__":
    main()
