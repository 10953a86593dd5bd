"""`--mode serve` under load on localhost, against one `--mode predict` call on the same images.

    python bench/serve_load.py                       # a tiny trained run made here (32 px)
    python bench/serve_load.py --workdir W --config configs/clip_b16.py [--set a.b=v ...]

Rows: one `--mode predict` command over N images (start-up and compile included, as a user
pays them), then the service (started once, its start-up reported apart) with 1, 8 and 32
closed-loop clients, each sending one image per request and waiting for the answer, for
`--seconds` each: images/s and p50/p99 latency. Last, an open-loop phase at twice the best
sustained rate for `--seconds`: how many requests were answered 200, refused 503 (with
Retry-After), or failed otherwise; whether the service still answers /v1/ready; its resident
memory (VmRSS) before and after. Clients run in this process on one asyncio loop (httpx).

The tiny default run measures the service's own costs (HTTP, upload parsing, decoding, face
detection, batching) more than the model's: its ViT is 32 px, 2 layers. Run it on a real
workdir to measure a deployment. Time it alone: `flock /tmp/bench.lock python bench/...`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tiny_run(root: Path) -> tuple[Path, list[str]]:
    """A tiny trained run (the tests' tiny CLIP and synthetic benchmark, 4 steps)."""
    sys.path.insert(0, str(ROOT))
    from fmsd_jax import platforms

    platforms.skip_absent_tpu()  # before jax starts: no libtpu chatter on a machine without
    from flax import nnx

    from fmsd_jax.data.synthetic import write_benchmark
    from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig
    from fmsd_jax.model.weights.export_hf import save_hf_clip_vision

    cfg = ViTConfig(width=32, layers=2, heads=2, patch_size=8, mlp_dim=64, proj_dim=None,
                    image_size=32)
    save_hf_clip_vision(CLIPVisionTower(cfg, rngs=nnx.Rngs(7)), root / "clip")
    write_benchmark(root / "bench", size="tiny", seed=0)
    sets = [f"model.init_from={root / 'clip' / 'model.safetensors'}",
            f"data.dataset_root={root / 'bench'}",
            f"data.dataset_json_folder={root / 'bench' / 'dataset_json'}",
            "data.train_dataset=('SynBlend',)", "data.test_dataset=('SynBlend',)",
            "train.total_steps=4"]
    workdir = root / "run"
    cli("configs/clip_b16.py:runlocal", workdir, sets, "--mode", "train")
    return workdir, sets


def cli_args(config: str, workdir: Path, sets: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "fmsd_jax.main", "--config", config, f"--workdir={workdir}",
            *[f"--config.{s}" for s in sets], *extra]


def cli(config: str, workdir: Path, sets: list[str], *extra: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cli_args(config, workdir, sets, *extra), cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ,
                                                               "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(f"{' '.join(extra)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - started


def images_for(workdir: Path, sets: list[str], out: Path, n: int, size: int) -> list[Path]:
    """N distinct PNG frames: the run's own benchmark frames where it has them, else noise."""
    from PIL import Image

    root = next((s.split("=", 1)[1] for s in sets if s.startswith("data.dataset_root=")), None)
    found = sorted(Path(root).rglob("*.png"))[:n] if root else []
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    for i in range(n):
        path = out / f"img_{i:04d}.png"
        if i < len(found):
            path.write_bytes(found[i].read_bytes())
        else:
            Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(path)
        paths.append(path)
    return paths


def request_bytes(host: str, body: bytes) -> bytes:
    """One POST /v1/score with a one-file form, encoded once: the clients then spend their
    CPU on sockets only (httpx's per-request Python cost, ~1 ms, would otherwise take a
    large share of the two cores the service runs on)."""
    boundary = "benchboundary1b2c3d"
    form = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            'filename="x.png"\r\nContent-Type: image/png\r\n\r\n').encode() + body + \
        f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/score HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(form)}\r\n\r\n").encode()
    return head + form


class Connection:
    """A keep-alive HTTP/1.1 connection that sends prepared requests and reads the answers."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def send(self, request: bytes) -> tuple[int, dict[str, str]]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(request)
            await self.writer.drain()
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            self.close()
            raise
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:]
                                                         if ln)}
        await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def closed_loop(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    host, port = address(url)
    requests = [request_bytes(host, b) for b in bodies]
    latencies, codes = [], {}
    stop = time.perf_counter() + seconds

    async def one(k: int) -> None:
        conn, i = Connection(host, port), k
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                status, _ = await conn.send(requests[i % len(requests)])
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                status = type(e).__name__
            latencies.append(time.perf_counter() - t)
            codes[status] = codes.get(status, 0) + 1
            i += clients
        conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    lat = np.asarray(latencies) * 1000
    return {"clients": clients, "requests": len(lat), "codes": codes,
            "images_per_s": codes.get(200, 0) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


async def open_loop(url: str, bodies: list[bytes], rate: float, seconds: float) -> dict:
    """Requests sent at `rate` per second whatever the answers (the offered load), each on a
    connection of its own; counts answers by status, and the 200s answered inside the window."""
    host, port = address(url)
    requests = [request_bytes(host, b) for b in bodies]
    codes: dict[str, int] = {}
    retry_after = set()
    in_window = [0]
    started = time.perf_counter()

    async def one(i: int) -> None:
        conn = Connection(host, port)
        try:
            status, headers = await conn.send(requests[i % len(requests)])
            key = str(status)
            if status == 503 and "retry-after" in headers:
                retry_after.add(headers["retry-after"])
            if status == 200 and time.perf_counter() < started + seconds:
                in_window[0] += 1
        except (OSError, asyncio.IncompleteReadError) as e:
            key = type(e).__name__
        finally:
            conn.close()
        codes[key] = codes.get(key, 0) + 1

    tasks, i = [], 0
    while (now := time.perf_counter()) < started + seconds:
        due = int((now - started) * rate) + 1
        while i < due:
            tasks.append(asyncio.create_task(one(i)))
            i += 1
        await asyncio.sleep(0.001)
    offered = i / (time.perf_counter() - started)
    await asyncio.gather(*tasks)
    return {"offered_per_s": offered, "sent": i, "codes": codes,
            "ok_per_s_in_window": in_window[0] / seconds,
            "drained_s": time.perf_counter() - started - seconds,
            "retry_after": sorted(retry_after)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, help="a trained workdir (default: a tiny one)")
    p.add_argument("--config", default="configs/clip_b16.py:runlocal")
    p.add_argument("--set", action="append", default=[], help="a.b=value config overrides")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    args = p.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="serve_load_"))
    if args.workdir is None:
        workdir, sets = tiny_run(scratch)
    else:
        workdir, sets = args.workdir, list(args.set)
    size = 32 if args.workdir is None else 224
    paths = images_for(workdir, sets, scratch / "images", args.images, size)
    bodies = [p.read_bytes() for p in paths]
    predict_s = cli(args.config, workdir, sets, "--mode", "predict",
                    "--config.predict.per_image=True", f"--out={scratch / 'p.json'}",
                    str(scratch / "images"))

    started = time.perf_counter()
    log = scratch / "serve.log"  # a file, not a pipe: a full pipe would stall its logging
    with open(log, "w") as out:
        server = subprocess.Popen(cli_args(args.config, workdir, sets, "--mode", "serve",
                                           "--config.serve.port=0",
                                           "--config.serve.image_faces=whole"),
                                  cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT, env={**os.environ,
                                                                 "PYTHONPATH": str(ROOT)})
    while "ready:" not in (text := log.read_text()):
        if server.poll() is not None or time.perf_counter() - started > 600:
            raise SystemExit(f"the service did not start:\n{text[-3000:]}")
        time.sleep(0.1)
    url = re.search(r"serving (http://[^/ ]+)/", text).group(1)
    ready_s = time.perf_counter() - started
    rss0 = rss_mib(server.pid)
    rows = [asyncio.run(closed_loop(url, bodies, c, args.seconds)) for c in args.clients]
    best = max(r["images_per_s"] for r in rows)
    rss1 = rss_mib(server.pid)
    over = asyncio.run(open_loop(url, bodies, 2 * best, args.seconds))
    alive = httpx.get(f"{url}/v1/ready", timeout=10).status_code == 200
    rss2 = rss_mib(server.pid)
    server.terminate()
    server.wait(timeout=60)

    cpus = os.cpu_count()
    load = os.getloadavg()
    print(f"# {len(paths)} images, {'tiny 32 px run' if args.workdir is None else workdir}, "
          "each taken whole as a face crop by both (serve.image_faces=whole, as predict); "
          f"{cpus} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| how | images/s | p50 ms | p99 ms | answers |")
    print("|---|---:|---:|---:|---|")
    print(f"| one `--mode predict` call (start-up and compile included: {predict_s:.1f} s) | "
          f"{len(paths) / predict_s:.1f} | | | {len(paths)} scored |")
    for r in rows:
        print(f"| service, {r['clients']} client(s) | {r['images_per_s']:.1f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['codes']} |")
    print(f"| service, open loop at 2 x {best:.0f} (sent {over['offered_per_s']:.0f} req/s) "
          f"for {args.seconds:g} s | {over['ok_per_s_in_window']:.1f} | | | {over['codes']}, "
          f"Retry-After {over['retry_after']} s, last answer {over['drained_s']:.1f} s after "
          "the window |")
    print(f"service start to ready {ready_s:.1f} s; RSS {rss0:.0f} MiB at ready, {rss1:.0f} "
          f"after the closed loops, {rss2:.0f} after the overload; still ready after it: "
          f"{alive}; exit {server.returncode}")


if __name__ == "__main__":
    main()
