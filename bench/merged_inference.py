"""Merged-model inference on CPU: our jitted predict against PyTorch eager and ONNX Runtime on
the model `--mode export` writes, same images, same batch sizes, side by side in one run.

    python bench/merged_inference.py                      # ViT-B/16 at 224 px, batches 1,8,32
    python bench/merged_inference.py --variant tiny --image-size 32 --rounds 1   # smoke
    python bench/merged_inference.py --workdir runs/fmsd_b16 --out /tmp/mi -- \\
        --config configs/clip_b16.py --config.model.init_from=...   # a run of yours

Without --workdir the bench makes a trained run in OUT/workdir: a CLIP tower of --variant with
random weights written in Hugging Face's layout (no pretrained weights are read: none ship
with the project and nothing is downloaded; speed does not depend on the values), the tiny
synthetic benchmark, and `--mode train` for --train-steps FMSD steps at lr 2e-2, so the
artifact factors have moved and merging them changes the weights. With --workdir, the flags
after `--` are the run's own `--config` flags, passed to `--mode export`.

Then `python -m fmsd_jax.main --mode export --out OUT/export`, and rows (bench/_inference_paths.py):
  decomposed  ours: `--mode predict`'s jitted function on the decomposed detector it restores
  merged      ours: the same function on the detector after `decompose.merge` (export's weights)
  torch       PyTorch eager: `transformers.CLIPVisionModel` on OUT/export + the exported head
  onnx        ONNX Runtime (CPU) on that torch module exported by `torch.onnx.export`
              (OUT/onnx/detector.onnx, batch dimension dynamic)
Every row maps host uint8 NHWC pixels to host P(fake) (normalisation inside), so each call
covers the same work. Before timing, all rows score the same images (the first call of the
largest batch, which also compiles) and the largest |P(fake) - decomposed's| is printed;
above --tol the bench stops without timing.

Timing: each framework runs in its own process (DESIGN.md §3: in one process PyTorch's and
XLA's CPU thread pools disturb each other), pinned to the same --threads cores. For each batch
size, --rounds rounds run every row in turn (the order rotating), each row calling repeatedly
for --seconds per round, so all rows see the same load; images/s is images over the summed call
times, p50 the median call. The ratio column is throughput against PyTorch eager, one run.
The machine (CPU model, cores) and the load average before and after are printed: run it under
`flock /tmp/bench.lock` on a shared machine. OUT (default: a new temporary folder, removed at
the end) holds all the bench writes; a given --out keeps them, and a rerun reuses its workdir.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import limit_threads  # noqa: E402

ROWS = ("decomposed", "merged", "torch", "onnx")
NAMES = {"decomposed": "ours, decomposed (what --mode predict runs)",
         "merged": "ours, merged dense weights (jit)",
         "torch": "PyTorch eager, exported transformers model",
         "onnx": "ONNX Runtime, torch.onnx.export of it"}
WORKER = {"decomposed": "jax", "merged": "jax", "torch": "torch", "onnx": "onnx"}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None,
                    help="a trained run (default: make one in OUT/workdir)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where the bench writes (default: a temporary folder, removed after)")
    ap.add_argument("--variant", default="B/16", help="the made run's geometry (vit.VARIANTS)")
    ap.add_argument("--image-size", type=int, default=224, help="the made run's image size")
    ap.add_argument("--train-steps", type=int, default=2, help="the made run's FMSD steps")
    ap.add_argument("--batches", default="1,8,32", help="batch sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per batch size")
    ap.add_argument("--seconds", type=float, default=1.0,
                    help="each row calls repeatedly for this long per round (at least once)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for every framework (default: all this process may use)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"subset of {ROWS}")
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"],
                    help="transformers attention implementation")
    ap.add_argument("--tol", type=float, default=1e-4,
                    help="largest |P(fake) difference| from the decomposed row allowed")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.rows = [r for r in args.rows.split(",") if r]
    if unknown := set(args.rows) - set(ROWS):
        ap.error(f"unknown rows {sorted(unknown)}; choose from {ROWS}")
    if "decomposed" not in args.rows:
        ap.error("--rows must hold 'decomposed': every row is checked against it")
    if args.workdir is not None and not (args.workdir / "config.json").is_file():
        ap.error(f"--workdir {args.workdir} holds no config.json: pass a trained run's folder")
    if args.workdir is not None and not run_flags:
        ap.error("--workdir needs the run's --config flags after `--` (for --mode export)")
    if min(args.batches, default=0) < 1 or args.rounds < 1:
        ap.error("--batches must be positive integers and --rounds at least 1")
    return args, run_flags


def cli(*args: str) -> None:
    """`python -m fmsd_jax.main ARGS` as a user runs it; its output is shown only on failure."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "fmsd_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {proc.returncode}:\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def write_inputs(out: Path, variant: str, image_size: int) -> None:
    """A random CLIP tower in HF layout and the tiny synthetic benchmark (a spawned process:
    this one must not import jax before the workers pin their threads)."""
    from flax import nnx

    from fmsd_jax.data.synthetic import write_benchmark
    from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig
    from fmsd_jax.model.weights.export_hf import save_hf_clip_vision

    cfg = ViTConfig.from_variant(variant, image_size=image_size, proj_dim=None)
    save_hf_clip_vision(CLIPVisionTower(cfg, rngs=nnx.Rngs(0)), out / "clip")
    write_benchmark(out / "data", size="tiny", seed=0)


def made_run_flags(out: Path, args: argparse.Namespace) -> list[str]:
    """The --config flags of the run the bench makes (and exports)."""
    size = str(args.image_size)
    return ["--config", "configs/clip_b16.py:runlocal",
            f"--config.model.init_from={out / 'clip' / 'model.safetensors'}",
            f"--config.data.dataset_root={out / 'data'}",
            f"--config.data.dataset_json_folder={out / 'data' / 'dataset_json'}",
            "--config.data.train_dataset=('SynBlend',)", "--config.data.test_dataset=('SynBlend',)",
            f"--config.model.image_size={size}", f"--config.data.image_size={size}",
            "--config.optim.lr=0.02", "--config.train.eval_after_training=False"]


def make_run(out: Path, args: argparse.Namespace) -> tuple[Path, list[str]]:
    workdir, flags = out / "workdir", made_run_flags(out, args)
    if (workdir / "best").is_dir():
        print(f"reusing the run in {workdir}")
        return workdir, flags
    t0 = time.perf_counter()
    proc = multiprocessing.get_context("spawn").Process(
        target=write_inputs, args=(out, args.variant, args.image_size))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"writing the random CLIP and the synthetic data failed ({proc.exitcode})")
    cli(*flags, f"--workdir={workdir}", "--mode=train",
        f"--config.train.total_steps={args.train_steps}")
    print(f"made a {args.train_steps}-step FMSD run of random {args.variant} at "
          f"{args.image_size} px in {workdir} ({time.perf_counter() - t0:.0f} s)")
    return workdir, flags


class Worker:
    """One framework's process (bench/_inference_paths.serve) and its pipe."""

    def __init__(self, kind: str, spec: dict[str, Any]):
        from bench._inference_paths import serve

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(kind, spec, child), daemon=True)
        self.proc.start()
        child.close()
        self.kind = kind

    def ready(self) -> tuple[list[str], dict[str, str]]:
        _, rows, versions = self._answer()
        return rows, versions

    def ask(self, *msg: Any) -> Any:
        self.conn.send(msg)
        return self._answer()[1]

    def _answer(self) -> tuple:
        try:
            reply = self.conn.recv()
        except EOFError:
            raise SystemExit(f"the {self.kind} worker died (exit {self.proc.exitcode})") from None
        if reply[0] == "error":
            raise SystemExit(f"the {self.kind} worker failed:\n{reply[1]}")
        return reply

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.proc.join(timeout=30)


def machine() -> str:
    model = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                      if ln.startswith("Model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    args, run_flags = parse_args(argv)
    threads = limit_threads(args.threads)
    os.environ["JAX_PLATFORMS"] = "cpu"  # the workers inherit it; this is a CPU benchmark
    load_before, started = load(), time.perf_counter()
    temporary = args.out is None
    out = Path(tempfile.mkdtemp(prefix="merged_inference_") if temporary else args.out)
    out.mkdir(parents=True, exist_ok=True)
    workers: dict[str, Worker] = {}
    try:
        if args.workdir is None:
            workdir, run_flags = make_run(out, args)
            weights = (f"random {args.variant} weights (no pretrained CLIP on disk, nothing "
                       f"downloaded), a {args.train_steps}-step FMSD run on synthetic data")
        else:
            workdir, weights = args.workdir, f"the run in {args.workdir}"
        export_dir, onnx_dir = out / "export", out / "onnx"
        cli(*run_flags, f"--workdir={workdir}", "--mode=export", f"--out={export_dir}")
        report(args, threads, workdir, export_dir, onnx_dir, weights, workers, load_before,
               started)
    finally:
        for w in workers.values():
            w.stop()
        if temporary:
            shutil.rmtree(out, ignore_errors=True)


def report(args: argparse.Namespace, threads: int, workdir: Path, export_dir: Path,
           onnx_dir: Path, weights: str, workers: dict[str, Worker], load_before: str,
           started: float) -> None:
    import json

    import numpy as np

    image_size = json.loads((export_dir / "detector.json").read_text())["image_size"]
    spec = {"workdir": str(workdir), "export_dir": str(export_dir), "threads": threads,
            "hf_attn": args.hf_attn, "image_size": image_size,
            "onnx_dir": str(onnx_dir) if "onnx" in args.rows else None}
    kinds = list(dict.fromkeys(WORKER[r] for r in args.rows))
    for kind in kinds:  # jax and torch build at once; onnx reads the file torch writes
        if kind != "onnx":
            workers[kind] = Worker(kind, spec)
    if "onnx" in kinds and "torch" not in workers:
        workers["torch"] = Worker("torch", spec)  # to write the ONNX file
    versions: dict[str, str] = {}
    for w in list(workers.values()):
        versions.update(w.ready()[1])
    if "onnx" in kinds:
        workers["onnx"] = Worker("onnx", spec)
        versions.update(workers["onnx"].ready()[1])

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (max(args.batches), image_size, image_size, 3), np.uint8)
    first: dict[tuple[str, int], float] = {}
    probs: dict[str, np.ndarray] = {}  # of the largest batch, which holds every image
    for b in args.batches:  # first call of each batch size: JAX compiles, ORT plans memory
        for r in args.rows:
            first[r, b], p = workers[WORKER[r]].ask("call", r, images[:b])
            if b == len(images):
                probs[r] = p
    ref = probs["decomposed"]
    diffs = {r: float(np.abs(probs[r] - ref).max()) for r in args.rows}
    print(f"\nmerged-model inference, CPU: {machine()}; {threads} threads for each framework "
          f"(own process each); load average {load_before} at the start")
    print(f"model: {workdir} at {image_size} px; {weights}")
    print(" / ".join(f"{k} {v}" for k, v in versions.items()) + f"; HF attention {args.hf_attn}")
    print(f"same {len(images)} uint8 images on every row: max |P(fake) - decomposed| = " +
          ", ".join(f"{r} {diffs[r]:.1e}" for r in args.rows if r != "decomposed") +
          f" (tolerance {args.tol:g}); P(fake) spans {ref.min():.4f}-{ref.max():.4f}")
    bad = {r: d for r, d in diffs.items() if d > args.tol}
    if bad:
        raise SystemExit(f"P(fake) differs from the decomposed row beyond --tol {args.tol:g}: "
                         f"{bad}; not timing rows that compute different functions")

    times: dict[tuple[str, int], list[float]] = {(r, b): [] for r in args.rows
                                                 for b in args.batches}
    for i in range(args.rounds):
        for b in args.batches:
            k = i % len(args.rows)
            for r in args.rows[k:] + args.rows[:k]:
                times[r, b] += workers[WORKER[r]].ask("time", r, images[:b], args.seconds)
                time.sleep(0.1)  # let the last pool's spinning threads go to sleep

    print(f"{args.rounds} interleaved rounds of {args.seconds:g} s per row and batch size\n")
    print("| batch | row | images/s | p50 ms | min–max ms | calls | vs PyTorch eager "
          "| first call s (JAX: + compile) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for b in args.batches:
        rate = {r: b * len(times[r, b]) / sum(times[r, b]) for r in args.rows}
        for r in args.rows:
            t = times[r, b]
            ratio = f"{rate[r] / rate['torch']:.2f}x" if "torch" in rate else "-"
            print(f"| {b} | {NAMES[r]} | {rate[r]:.1f} | {statistics.median(t) * 1e3:.1f} | "
                  f"{ms_spread(t)} | {len(t)} | {ratio} | {first[r, b]:.2f} |")
    print(f"\nload average {load()} at the end; bench wall time "
          f"{time.perf_counter() - started:.0f} s")
    busiest = max(float(load_before.split("/")[0]), os.getloadavg()[0])
    if busiest > len(os.sched_getaffinity(0)):
        print(f"the machine was oversubscribed (load {busiest:.1f} on "
              f"{len(os.sched_getaffinity(0))} cores): every row is slowed, and thread pools "
              "suffer unequally from lost cores, so the ratios may move too; rerun on a quiet "
              "machine for figures to quote")


def ms_spread(times: list[float]) -> str:
    return f"{min(times) * 1e3:.1f}–{max(times) * 1e3:.1f}"


if __name__ == "__main__":
    main()
