"""The scoring service behind the HTTP app: the run loaded once, every batch size compiled, and
one upload turned into an answer.

Loading happens in a thread after the port is bound, so that liveness answers at once while
readiness waits for the model (an orchestrator then neither kills a slow start nor sends it
traffic). A mistake found while loading (a workdir never trained, a config that does not fit
its checkpoint) is kept in `load_error` and stops the server; the mode then raises it, so the
command still ends in one line.

The answer states everything an analyst needs to act on one input and to say later what said
so: calibrated P(fake), the label at the run's operating point and a verdict with an explicit
"uncertain" band around its threshold, what was cropped (face found or not, and where), per-frame
scores for a video, and which model answered (the workdir's commit and data fingerprint, the
checkpoint step, a hash of the run's config).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ml_collections as mlc
import numpy as np

from fmsd_jax import atomic
from fmsd_jax.errors import BadInput
from fmsd_jax.serve import media
from fmsd_jax.serve.batcher import Batcher, ModelFn
from fmsd_jax.serve.metrics import Metrics

log = logging.getLogger("fmsd_jax")

FACE_MODES = ("detect", "whole")


@dataclasses.dataclass
class OperatingPoint:
    """Where P(fake) becomes a label: the threshold, the temperature that calibrates P(fake),
    and the band around the threshold in which the verdict is 'uncertain'."""

    name: str
    threshold: float
    temperature: float
    band: float
    source: str  # what chose the threshold, in words

    def verdict(self, prob: float) -> str:
        """'fake' above threshold + band, 'real' below threshold - band, else 'uncertain'."""
        if prob > self.threshold + self.band:
            return "fake"
        if prob < self.threshold - self.band:
            return "real"
        return "uncertain"

    def as_dict(self) -> dict[str, Any]:
        lo, hi = max(0.0, self.threshold - self.band), min(1.0, self.threshold + self.band)
        return {"name": self.name, "threshold": self.threshold, "temperature": self.temperature,
                "uncertain_band": [lo, hi], "source": self.source}


def operating_point(cfg: mlc.ConfigDict, workdir: Path) -> OperatingPoint:
    """The run's operating point: today config.predict.threshold on the uncalibrated softmax
    (temperature 1), as `--mode predict` labels; the one function to switch to
    evaluators.decision.load_decision(workdir).threshold(cfg.predict.operating_point) and its
    temperature once calibration lands."""
    band = float(cfg.serve.uncertain_band)
    t = float(cfg.predict.threshold)
    return OperatingPoint(f"threshold {t:g}", t, 1.0, band,
                          "config.predict.threshold (no calibration fitted)")


def explain_fields(frames: list[media.Frame], prob: list[float]) -> dict[str, Any]:
    """What `explain=true` adds: per-subspace Δlogit bars and a saliency heatmap once
    evaluators/subspaces.py and evaluators/saliency.py exist; until then it says why not.
    Never a made-up number."""
    return {"available": False, "subspaces": None, "heatmap_png_base64": None,
            "reason": "per-subspace attribution and saliency are not part of this build "
                      "(evaluators/subspaces.py and evaluators/saliency.py)"}


def config_sha256(workdir: Path) -> str | None:
    """SHA-256 of the run's config.json in canonical form (sorted keys, no whitespace), so the
    hash names the configuration, not its formatting."""
    from fmsd_jax.run import workdir_files

    path = workdir / workdir_files.CONFIG_JSON
    if not path.is_file():
        return None
    canon = json.dumps(atomic.read_json(path), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def model_identity(cfg: mlc.ConfigDict, workdir: Path, which: str, step: int) -> dict[str, Any]:
    """Which model answers: enough to find the run, its code and its data again."""
    from fmsd_jax.run import manifest

    trained = manifest.read(workdir).get("train", {})
    git = trained.get("git") or {}
    return {"workdir": os.fspath(workdir.absolute()), "checkpoint": which, "step": int(step),
            "regime": str(cfg.method.regime), "train_dataset": list(cfg.data.train_dataset),
            "commit": git.get("commit"), "commit_dirty": git.get("dirty"),
            "data_fingerprint": {k: v.get("sha256") for k, v in trained.get("data", {}).items()},
            "config_sha256": config_sha256(workdir), "image_size": int(cfg.data.image_size)}


def check_serve_config(cfg: mlc.ConfigDict) -> None:
    """Mistakes in config.serve, found before anything loads."""
    s = cfg.serve
    sizes = tuple(int(b) for b in s.batch_sizes)
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise BadInput(f"config.serve.batch_sizes={tuple(s.batch_sizes)} must be distinct "
                       "positive sizes, e.g. (1, 8, 32)")
    if s.image_faces not in FACE_MODES:
        raise BadInput(f"config.serve.image_faces={s.image_faces!r} is not one of {FACE_MODES}")
    for name in ("max_bytes", "max_image_pixels", "max_video_pixels", "max_video_frames",
                 "queue_frames", "max_pending", "workers"):
        if int(s[name]) < 1:
            raise BadInput(f"config.serve.{name}={s[name]} must be at least 1")
    if int(s.queue_frames) < int(cfg.predict.video_frames):
        raise BadInput(f"config.serve.queue_frames={s.queue_frames} cannot hold one video's "
                       f"config.predict.video_frames={cfg.predict.video_frames} frames; raise it")
    if not float(s.timeout_s) > 0:
        raise BadInput(f"config.serve.timeout_s={s.timeout_s} must be positive")
    if not 0 <= float(s.uncertain_band) < 0.5:
        raise BadInput(f"config.serve.uncertain_band={s.uncertain_band} must be in [0, 0.5)")


def _png_base64(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Service:
    """One trained run, ready to score uploads once `ready` is set."""

    def __init__(self, cfg: mlc.ConfigDict, workdir: str | os.PathLike,
                 model_fn: ModelFn | None = None):
        check_serve_config(cfg)
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.sizes = tuple(sorted(int(b) for b in cfg.serve.batch_sizes))
        self.limits = media.Limits(cfg.serve, cfg.data, cfg.predict.video_frames)
        self.point = operating_point(cfg, self.workdir)
        self.model_fn = model_fn  # None: the run's jitted predict, built by `load`
        self.identity: dict[str, Any] | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.load_s: float | None = None
        self.compiled: list[int] = []
        self.pending = 0  # requests admitted (reading, decoding, queued or on the device)
        self.max_pending = int(cfg.serve.max_pending)
        self.max_bytes = int(cfg.serve.max_bytes)
        self.timeout_s = float(cfg.serve.timeout_s)
        self.pool = ThreadPoolExecutor(int(cfg.serve.workers), thread_name_prefix="fmsd-decode")
        self.batcher = Batcher(self._call_model, self.sizes, int(cfg.data.image_size),
                               capacity_frames=int(cfg.serve.queue_frames),
                               wait_s=float(cfg.serve.batch_wait_ms) / 1000,
                               observe_batch=self._observe_batch)
        self.metrics = Metrics(self.sizes, self.batcher.queued, lambda: self.batcher.reserved)

    def _observe_batch(self, frames: int, padded: int) -> None:
        self.metrics.observe_batch(frames, padded)

    def _call_model(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.model_fn(batch)

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        """Restore the run, build its predict function and compile every batch size."""
        started = time.perf_counter()
        if self.model_fn is None:
            self.model_fn, which, step = self._restore()
        else:  # a model given by the caller (tests): the identity still names the workdir
            which, step = "given", -1
        self.identity = model_identity(self.cfg, self.workdir, which, step)
        image = int(self.cfg.data.image_size)
        for size in self.sizes:  # one program per size, compiled now, never on a request
            self.model_fn(np.zeros((size, image, image, 3), np.uint8))
            self.compiled.append(size)
        self.load_s = time.perf_counter() - started
        self.metrics.ready.set(1)
        self.ready.set()
        log.info("ready: %s checkpoint (step %d) of %s, batch sizes %s compiled in %.1f s",
                 which, step, self.workdir, list(self.sizes), self.load_s)

    def _restore(self) -> tuple[ModelFn, str, int]:
        import jax

        from fmsd_jax import parallel
        from fmsd_jax.evaluators import scoring
        from fmsd_jax.run import rebuild

        mesh = parallel.make_mesh(self.cfg.mesh)
        for size in self.sizes:
            parallel.check_batch_fits(mesh, size, "config.serve.batch_sizes")
        run = rebuild.open_run(self.cfg, self.workdir, mesh, estimate=False)
        trainable, step, which = rebuild.restore_for_eval(self.cfg, self.workdir, run,
                                                          "serving")
        predict = scoring.make_predict_fn(run.graphdef, mesh)
        sharding = parallel.batch_sharding(mesh)

        def model_fn(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            images = jax.device_put(batch, sharding)
            prob = np.asarray(predict(trainable, run.frozen, images), np.float32)
            # The fake margin l1 - l0 of a 2-class softmax is logit(P(fake)).
            clipped = np.clip(prob.astype(np.float64), 1e-12, 1 - 1e-12)
            return prob, np.log(clipped / (1 - clipped)).astype(np.float32)

        return model_fn, which, step

    def load_in_thread(self, on_error=None) -> threading.Thread:
        def target() -> None:
            try:
                self.load()
            except BaseException as e:  # kept for the mode to raise once the server stops
                self.load_error = e
                if on_error is not None:
                    on_error(e)

        thread = threading.Thread(target=target, name="fmsd-load", daemon=True)
        thread.start()
        return thread

    # -- one request ---------------------------------------------------------------------------

    async def score(self, upload, explain: bool, received: float,
                    read_s: float) -> dict[str, Any]:
        """The answer to one upload (MediaRefused or Overloaded for the app to turn into an
        error answer)."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        decoded = await loop.run_in_executor(self.pool, media.decode, upload.data, self.limits)
        decode_s = time.perf_counter() - t0
        with self.batcher.reserve(len(decoded.frames)):
            scored = await self.batcher.score([f.pixels for f in decoded.frames])
        probs = [s[0] for s in scored]
        prob = float(np.mean(probs))  # a video's P(fake): the mean over its frames
        frames = []
        for f, (p, logit, _, _) in zip(decoded.frames, scored, strict=True):
            frames.append({"index": f.index, "time_s": f.time_s, "prob_fake": p,
                           "logit": logit, "face_found": f.face_found, "box": f.box})
        looked = [f.face_found for f in decoded.frames if f.face_found is not None]
        best = int(np.argmax(probs))
        answer = {
            "id": uuid.uuid4().hex[:12], "api_version": "v1",
            "filename": upload.filename, "media_type": decoded.media_type,
            "kind": decoded.kind, "width": decoded.width, "height": decoded.height,
            "frame_count": decoded.frame_count, "processing": decoded.face_mode,
            "prob_fake": prob, "logit": float(np.mean([s[1] for s in scored])),
            "label": "fake" if prob > self.point.threshold else "real",
            "verdict": self.point.verdict(prob), "operating_point": self.point.as_dict(),
            "faces": {"looked_for": bool(looked) or None, "found": sum(looked),
                      "frames": len(decoded.frames),
                      "no_face_found": bool(looked) and not any(looked)},
            "frames": frames,
            "crop": {"frame": decoded.frames[best].index,
                     "png_base64": _png_base64(decoded.frames[best].pixels)},
            "explain": (explain_fields(decoded.frames, probs) if explain else
                        {"available": False, "subspaces": None, "heatmap_png_base64": None,
                         "reason": "not requested (explain=true asks for it)"}),
            "model": self.identity,
            "timings_ms": {"read": 1000 * read_s, "decode": 1000 * decode_s,
                           "queue": 1000 * max(s[3] for s in scored),
                           "model": 1000 * max(s[2] for s in scored),
                           "total": 1000 * (time.perf_counter() - received)},
        }
        return answer
