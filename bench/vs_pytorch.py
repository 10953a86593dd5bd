"""FMSD's jitted training step against Effort's PyTorch design, end to end, same model and batch.

    python bench/vs_pytorch.py                                   # ViT-B/16, 224 px, batch 8, CPU
    python bench/vs_pytorch.py --variant tiny --image-size 32 --iters 2   # smoke (seconds)
    python bench/vs_pytorch.py --device gpu --batch 64 --dtype bf16 --iters 20   # on a GPU host

One CLIP vision tower with random weights is built once in JAX, written as a Hugging Face
checkpoint (`save_hf_clip_vision`) and read back by `transformers.CLIPVisionModel`, and one
linear head is copied across, so both frameworks train the same function (checked: their
logits on the batch are compared before any step). Both decompose the same projections
(q, k, v, out of every block) keeping the same K·d smallest singular directions trainable.

Rows:
  (a)   fmsd         our production step (fmsd_jax.run.train_step.make_train_step), CE only
  (a+)  fmsd+reg     (a) + L_orth + L_spec (λ = 0.1 each)
  (ax)  fmsd-xla     (a) with attention_impl='xla' (jax.nn.dot_product_attention), the path
                     before issue 7's einsum attention became the CPU default (not by default)
  (b)   effort       PyTorch Effort, eager: every projection an `SVDResidualLinear` (frozen
                     W_main + trainable U_res, S_res, V_res; W rebuilt every forward, autograd
                     through it), HF CLIP pooler → Linear(width, 2), CE, torch Adam lr 2e-4
                     wd 5e-4 — the reference row for the ratios
  (b+)  effort+reg   (b) + Effort's paper regularisers as its code computes them (orthogonal
                     loss on the full n×n ÛÛᵀ, keep-singular-value loss on the rebuilt W), λ 0.1
  (bc)  effort-compile, (bc+) effort-compile+reg   (b)/(b+) with the loss under torch.compile
                     (forward and backward compiled by inductor; Adam eager). A compile that
                     fails or exceeds --compile-timeout is reported as a failed row, with why.
  (c)   full         our production step, full fine-tuning of the dense detector
  (tf)  torch-full   PyTorch full fine-tuning, eager (reference for (c))
On a GPU the table adds model FLOP utilisation (item 3 of issue 7): the FLOPs the method needs
(`model_flops`) over the step time, against the card's dense bf16 peak (or --peak-tflops).
Inference (item 4 of issue 7): our plain dense detector vs the same detector decomposed,
trained-looking (perturbed factors) and merged back (`decompose.merge`): merged/plain ≥ 0.98;
the table also says whether both compile to the same XLA program (then the ratio is noise).

Timing: rows run round-robin in one process (one step of each per round; DESIGN.md §3: the
CPU is shared, so only interleaved ratios are trustworthy); median and min–max of --iters
rounds after --warmup. Memory: ours is XLA's compiled memory analysis (arguments + outputs +
temporaries − donated) on every backend; PyTorch's is, on GPU, `torch.cuda.max_memory_allocated`
over one step; on CPU (no allocator statistics) the bytes live at the step's start (parameters,
buffers, gradients, Adam state, batch) plus the rise of the process's peak RSS over one step
(VmHWM reset through /proc/self/clear_refs just before it, glibc's free memory trimmed and its
mmap threshold pinned to 128 KiB so the step's large allocations are fresh mappings that show
in RSS; measured after all timing, since that slows allocation).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    ProductionStep,
    interleaved_times,
    limit_threads,
    random_batch,
    spread,
    xla_memory,
)
from bench.effort_torch import effort_adam, effort_detector, torch_detector  # noqa: E402

ALL_ROWS = ("a", "a+", "ax", "b", "b+", "bc", "bc+", "c", "tf", "infer")
LAMBDA = 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="B/16", help="a key of fmsd_jax.model.vit.VARIANTS")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3, help="timed rounds (one step of each row)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for both frameworks (default: all this process may use)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: our compute dtype bf16 / torch bf16 autocast; params fp32")
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--num-subspaces", type=int, default=4, help="K")
    ap.add_argument("--rank", type=int, default=1, help="d (Effort: K·d = 1)")
    ap.add_argument("--targets", default="q,k,v,out")
    ap.add_argument("--rows", default=",".join(r for r in ALL_ROWS if r != "ax"),
                    help=f"subset of {ALL_ROWS}")
    ap.add_argument("--attention-impl", default=None,
                    help="our ViTConfig.attention_impl (default: the backend's choice)")
    ap.add_argument("--remat", default="dots", choices=["dots", "none", "full"],
                    help="our ViTConfig.remat: what each block keeps for the backward")
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"],
                    help="transformers attention implementation")
    ap.add_argument("--compile-timeout", type=float, default=900.0,
                    help="seconds allowed for torch.compile's first step before the row fails")
    ap.add_argument("--xla-flags", default="",
                    help="extra XLA_FLAGS for our side, e.g. "
                         "--xla_cpu_experimental_xnn_fusion_type=dot")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak for model FLOP utilisation (default: bf16 dense peak of a known "
                         "GPU; none on CPU)")
    ap.add_argument("--tf32", action="store_true", help="TF32 for fp32 matmuls on GPU (both)")
    return ap.parse_args(argv)


# Dense bf16 peak (TFLOP/s, no sparsity) by device kind, for model FLOP utilisation.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def forward_flops(cfg: Any, batch: int) -> float:
    """Matmul FLOPs of one forward pass of the tower (patch embedding, projections, attention,
    MLP; 2 per multiply-add). Norms, activations and the 2-way head are left out."""
    grid = (cfg.image_size // cfg.patch_size) ** 2
    t, d, m = grid + 1, cfg.width, cfg.mlp_dim
    patch = grid * cfg.patch_size**2 * 3 * d
    block = 4 * t * d * d + 2 * t * t * d + 2 * t * d * m
    return 2.0 * batch * (patch + cfg.layers * block)


def model_flops(cfg: Any, batch: int, key: str) -> float:
    """FLOPs a step of this method needs: forward + activation gradients (2×) for the
    decomposed methods, whose factor gradients are skinny; + weight gradients (3×) for full
    fine-tuning. The same count for FMSD and Effort, so Effort's rebuilt-W gradient (its
    design's extra work) lowers its utilisation rather than raising its FLOPs."""
    return forward_flops(cfg, batch) * (3.0 if key in ("c", "tf") else 2.0)


class TorchRow:
    """One PyTorch training step (optionally with the loss under torch.compile), ready to time."""

    def __init__(self, model: Any, x: Any, y: Any, *, reg: bool, compile_: bool, amp: Any,
                 sync: Callable[[], None]):
        import torch
        from torch.nn import functional as F

        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in self.params)
        self.opt = effort_adam(model, lr=2e-4, weight_decay=5e-4)
        self.x, self.y, self.sync = x, y, sync

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with amp():
                logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y)
            if reg:
                orth, ksv = self.model.regularisers()
                loss = loss + LAMBDA * orth + LAMBDA * ksv
            return loss

        self.loss_fn = torch.compile(loss_fn) if compile_ else loss_fn

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss_fn(self.x, self.y).backward()
        self.opt.step()
        self.sync()

    def live_bytes(self) -> int:
        """Tensor bytes held between steps: parameters, buffers, gradients, Adam state, batch."""
        import torch

        ts = [*self.model.parameters(), *self.model.buffers(), self.x, self.y]
        ts += [p.grad for p in self.params if p.grad is not None]
        ts += [v for st in self.opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in ts)

    def peak_mib(self, on_gpu: bool) -> float:
        """Peak MiB of one step: CUDA allocator peak on GPU; on CPU see the module docstring."""
        import torch

        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self()
            return torch.cuda.max_memory_allocated() / 2**20
        base = self.live_bytes()
        try:
            # glibc keeps freed blocks in its heap (its mmap threshold adapts upward), which
            # would hide the step's allocations from RSS: return free memory to the OS and make
            # every large block a fresh mmap. Done only here, after all timing, as it slows
            # allocation-heavy code.
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD = 128 KiB, fixed
            libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux: reset VmHWM (peak RSS) to the current RSS
        except OSError:
            return float("nan")
        before = _proc_status_kib("VmRSS")
        self()
        return (base + (_proc_status_kib("VmHWM") - before) * 1024) / 2**20


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise TimeoutError in the main thread after `seconds` (SIGALRM; POSIX only)."""
    def _raise(*_):
        raise TimeoutError(f"exceeded --compile-timeout={seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------


def _program_text(compiled: Any) -> str:
    """The optimised HLO without names and source metadata, for an equality check."""
    import re

    text = re.sub(r", metadata=\{[^}]*\}", "", compiled.as_text())
    return re.sub(r"^HloModule \S+", "HloModule", text, flags=re.M)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = limit_threads(args.threads)
    if args.device == "cpu":  # before jax initialises: on a GPU host, keep JAX on the CPU too
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    rows_wanted = [r for r in args.rows.split(",") if r]
    unknown = set(rows_wanted) - set(ALL_ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; choose from {ALL_ROWS}")

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from fmsd_jax.method.decompose import decompose, merge
    from fmsd_jax.model.detector import Detector
    from fmsd_jax.model.layers import resolve_attention_impl
    from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig
    from fmsd_jax.model.weights.export_hf import save_hf_clip_vision

    torch.set_num_threads(threads)
    on_gpu = args.device == "gpu"
    if on_gpu and not (jax.devices()[0].platform == "gpu" and torch.cuda.is_available()):
        raise SystemExit("--device gpu: JAX's first device is not a GPU or torch sees no CUDA")
    tdev = torch.device("cuda" if on_gpu else "cpu")
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if args.tf32 else "highest")
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    bf16 = args.dtype == "bf16"
    amp = ((lambda: torch.autocast(tdev.type, dtype=torch.bfloat16)) if bf16
           else contextlib.nullcontext)
    targets = tuple(args.targets.split(","))
    kd = args.num_subspaces * args.rank

    cfg = ViTConfig.from_variant(args.variant, image_size=args.image_size,
                                 dtype="bfloat16" if bf16 else "float32",
                                 attention_impl=args.attention_impl, proj_dim=None,
                                 remat=args.remat)

    def detector(attention_impl: str | None = args.attention_impl) -> Detector:
        """The same random detector every call (fixed seeds), built fresh for each row."""
        c = dataclasses.replace(cfg, attention_impl=attention_impl)
        return Detector(CLIPVisionTower(c, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))

    host = random_batch(args.batch, args.image_size)
    det0 = detector()
    head_w = np.asarray(det0.head_kernel[...])
    head_b = np.asarray(det0.head_bias[...])
    ckpt_dir = tempfile.mkdtemp(prefix="vs_pytorch_")
    save_hf_clip_vision(det0.backbone, ckpt_dir)

    def hf_tower() -> Any:
        return transformers.CLIPVisionModel.from_pretrained(
            ckpt_dir, attn_implementation=args.hf_attn, dtype=torch.float32).to(tdev)

    xt = torch.from_numpy(np.ascontiguousarray(host["image"].transpose(0, 3, 1, 2))).to(tdev)
    yt = torch.from_numpy(host["label"].astype(np.int64)).to(tdev)

    steps: dict[str, Callable[[], None]] = {}
    info: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    names = {
        "a": "(a) ours FMSD, CE", "a+": "(a+) ours FMSD + L_orth + L_spec",
        "b": "(b) PyTorch Effort eager, CE", "b+": "(b+) PyTorch Effort eager + reg",
        "bc": "(bc) PyTorch Effort compiled, CE", "bc+": "(bc+) PyTorch Effort compiled + reg",
        "ax": "(ax) ours FMSD, CE, attention 'xla'", "c": "(c) ours full fine-tuning",
        "tf": "(tf) PyTorch full fine-tuning eager",
        "plain": "ours plain ViT detector (fwd)", "merged": "ours merged FMSD detector (fwd)",
    }

    # ---- parity: same function on both sides before any step
    parity = None
    if any(r in rows_wanted for r in ("a", "b")):
        det = detector()
        decompose(det, targets=targets, num_subspaces=args.num_subspaces, rank=args.rank)
        ours = np.asarray(jax.jit(lambda m, x: m(x))(det, jnp.asarray(host["image"])))
        tm = effort_detector(hf_tower(), head_w, head_b, targets, kd).to(tdev)
        with torch.no_grad(), amp():
            theirs = tm(xt).float().cpu().numpy()
        parity = float(np.abs(ours - theirs).max())
        del det, tm

    # ---- our rows
    for key, regime, lam in (("a", "fmsd", 0.0), ("a+", "fmsd", LAMBDA), ("ax", "fmsd", 0.0),
                             ("c", "full", 0.0)):
        if key not in rows_wanted:
            continue
        det = detector("xla" if key == "ax" else args.attention_impl)
        spec = (decompose(det, targets=targets, num_subspaces=args.num_subspaces,
                          rank=args.rank) if regime == "fmsd" else None)
        ps = ProductionStep(det, regime=regime, spec=spec, lambda_orth=lam, lambda_spec=lam,
                            batch=args.batch, image_size=args.image_size)
        batch = ps.device_batch(host)
        comp = ps.compile(batch)
        t0 = time.perf_counter()
        ps(batch)
        info[key] = dict(fw="jax", first=comp + time.perf_counter() - t0,
                         mem=xla_memory(ps.compiled)[0], n=ps.num_trainable)
        steps[key] = (lambda ps=ps, batch=batch: ps(batch))

    # ---- PyTorch rows
    for key, reg, comp in (("b", False, False), ("b+", True, False), ("bc", False, True),
                           ("bc+", True, True), ("tf", False, False)):
        if key not in rows_wanted:
            continue
        try:
            model = (torch_detector(hf_tower(), head_w, head_b) if key == "tf"
                     else effort_detector(hf_tower(), head_w, head_b, targets, kd)).to(tdev)
            row = TorchRow(model, xt, yt, reg=reg, compile_=comp, amp=amp, sync=sync)
            t0 = time.perf_counter()
            with _deadline(args.compile_timeout) if comp else contextlib.nullcontext():
                row()
            info[key] = dict(fw="torch", first=time.perf_counter() - t0, mem=float("nan"),
                             n=row.num_trainable)
            steps[key] = row
        except Exception as e:  # a failed compile is a result, reported in the table
            failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            traceback.print_exc(limit=3)

    # ---- inference: plain vs merged (exported) detector
    if "infer" in rows_wanted:
        img = jnp.asarray(host["image"])
        plain = detector()
        merged = detector()
        decompose(merged, targets=targets, num_subspaces=args.num_subspaces, rank=args.rank)
        for layer in [getattr(merged.backbone.transformer.blocks.attn, t) for t in targets]:
            layer.s[...] = layer.s[...] * 1.5  # a trained-looking change, so merge is not a no-op
        merge(merged)
        for key, det in (("plain", plain), ("merged", merged)):
            gd, st = nnx.split(det)
            fwd = jax.jit(lambda s, x, gd=gd: nnx.merge(gd, s)(x))
            t0 = time.perf_counter()
            compiled = fwd.lower(st, img).compile()
            jax.block_until_ready(compiled(st, img))
            info[key] = dict(fw="jax", first=time.perf_counter() - t0,
                             mem=xla_memory(compiled)[0], n=0,
                             program=_program_text(compiled))
            steps[key] = (lambda c=compiled, s=st: jax.block_until_ready(c(s, img)))

    times = interleaved_times(steps, warmup=args.warmup, iters=args.iters)
    for key, step in steps.items():  # after timing: measuring memory perturbs the allocator
        if isinstance(step, TorchRow):
            info[key]["mem"] = step.peak_mib(on_gpu)

    # ---- table
    dev = jax.devices()[0]
    where = (f"{dev.device_kind} / {torch.cuda.get_device_name()}" if on_gpu
             else f"CPU x{threads} threads")
    print(f"\nCLIP {args.variant} @ {args.image_size}px, batch {args.batch}, {args.dtype}, "
          f"K={args.num_subspaces} d={args.rank} targets={','.join(targets)}; {where}; "
          f"median of {args.iters} interleaved rounds after {args.warmup} warm-up")
    print(f"jax {jax.__version__} / torch {torch.__version__} / transformers "
          f"{transformers.__version__}; ours attention_impl={args.attention_impl} "
          f"(runs {resolve_attention_impl(args.attention_impl)}), remat={args.remat}, XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, HF attention={args.hf_attn}")
    if parity is not None:
        print(f"max |logits ours − Effort (PyTorch)| before training: {parity:.2e}")
    ref = statistics.median(times["b"]) if "b" in times else None
    peak = args.peak_tflops
    if peak is None and on_gpu:
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in dev.device_kind), None)
    print("\n| row | images/s | step ms (median) | min–max ms | peak MiB | vs (b) eager "
          "| model TFLOP/s | MFU | first step s | trainable |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in [k for k in ALL_ROWS if k in rows_wanted and k != "infer"]:
        if key in failed:
            print(f"| {names[key]} | failed | | | | | | | | {failed[key]} |")
            continue
        t, i = times[key], info[key]
        med = statistics.median(t)
        ratio = f"{ref / med:.2f}x" if ref else "-"
        mem = f"{i['mem']:.0f} ({'XLA' if i['fw'] == 'jax' else 'torch'})"
        tflops = model_flops(cfg, args.batch, key) / med / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "-"
        print(f"| {names[key]} | {args.batch / med:.2f} | {med * 1e3:.0f} | {spread(t)} | "
              f"{mem} | {ratio} | {tflops:.2f} | {mfu} | {i['first']:.1f} | {i['n']} |")
    if "plain" in times:
        base = statistics.median(times["plain"])
        print("\n| inference | images/s | fwd ms (median) | min–max ms | XLA MiB | "
              "throughput vs plain |")
        print("|---|---:|---:|---:|---:|---:|")
        for key in ("plain", "merged"):
            t = times[key]
            med = statistics.median(t)
            print(f"| {names[key]} | {args.batch / med:.2f} | {med * 1e3:.0f} | {spread(t)} | "
                  f"{info[key]['mem']:.0f} | {base / med:.3f} |")
        same = info["plain"]["program"] == info["merged"]["program"]
        print(f"merged and plain compile to {'the same' if same else 'DIFFERENT'} XLA program"
              + (" (the timing ratio is noise around 1)" if same else ""))
    print(f"\nmodel FLOPs per step: forward {forward_flops(cfg, args.batch) / 1e9:.0f} GFLOP; "
          "decomposed methods 2x, full fine-tuning 3x; MFU against "
          + (f"{peak:.0f} TFLOP/s" if peak else "no peak (pass --peak-tflops)"))
    print("ratios are throughput ratios (time of (b) / time of the row); peak MiB: ours = "
          "XLA compiled memory analysis; PyTorch = " +
          ("torch.cuda.max_memory_allocated over one step" if on_gpu else
           "live tensor bytes at step start + rise of peak RSS over one step"))


if __name__ == "__main__":
    main()
