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
from collections.abc import Callable
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
    """Where P(fake) becomes a label: the run's temperature (which calibrates P(fake)), the
    threshold of the operating point at frame level (an image) and at video level (a video's
    aggregated frames), and the band around it in which the verdict is 'uncertain'."""

    name: str
    thresholds: dict[str, float]  # level ('frame', 'video') -> threshold on calibrated P(fake)
    temperature: float
    band: float
    rules: dict[str, str] = dataclasses.field(default_factory=dict)  # level -> in words
    aggregation: str = "mean"
    topk: int = 4

    def label(self, prob: float, level: str) -> str:
        """As --mode predict labels: fake when P(fake) >= the level's threshold."""
        return "fake" if prob >= self.thresholds[level] else "real"

    def verdict(self, prob: float, level: str) -> str:
        """'fake' from threshold + band up, 'real' below threshold - band, 'uncertain' between:
        with a band of 0 the verdict is the label."""
        t = self.thresholds[level]
        if prob >= t + self.band:
            return "fake"
        if prob < t - self.band:
            return "real"
        return "uncertain"

    def as_dict(self, level: str) -> dict[str, Any]:
        t = self.thresholds[level]
        return {"name": self.name, "level": level, "threshold": t,
                "temperature": self.temperature,
                "uncertain_band": [max(0.0, t - self.band), min(1.0, t + self.band)],
                "rule": self.rules.get(level, "")}


def operating_point(cfg: mlc.ConfigDict, workdir: Path) -> OperatingPoint:
    """The run's decision rule (WORKDIR/decision.json, fitted on validation by --mode
    evaluate) at `config.predict.operating_point`, at both levels: the one place the service
    reads it, as --mode predict does. A point the run lacks is refused here, before loading."""
    from fmsd_jax.evaluators import decision

    decision.check_config(cfg)
    rule = decision.load_decision(workdir)
    point = cfg.predict.operating_point
    thresholds = {lv: rule.threshold(point, lv) for lv in decision.LEVELS}
    rules = {lv: decision.describe(rule, point, lv) for lv in decision.LEVELS}
    return OperatingPoint(str(point), thresholds, float(rule.temperature),
                          float(cfg.serve.uncertain_band), rules, rule.aggregation,
                          int(rule.topk))


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
        self._explainer: _Explainer | None = None
        self.identity: dict[str, Any] | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.load_s: float | None = None
        self.compiled: list[int] = []
        self.pending = 0  # requests admitted (reading, decoding, queued or on the device)
        self.max_pending = int(cfg.serve.max_pending)
        self.max_bytes = int(cfg.serve.max_bytes)
        self.timeout_s = float(cfg.serve.timeout_s)
        # Open connections, as uvicorn counts them (set by serve.server): under a load the
        # event loop cannot keep up with, requests wait as connections not yet read, which
        # `pending` does not see.
        self.connections: Callable[[], int] = lambda: 0
        self.pool = ThreadPoolExecutor(int(cfg.serve.workers), thread_name_prefix="fmsd-decode")
        self.batcher = Batcher(self._call_model, self.sizes, int(cfg.data.image_size),
                               capacity_frames=int(cfg.serve.queue_frames),
                               wait_s=float(cfg.serve.batch_wait_ms) / 1000,
                               observe_batch=self._observe_batch)
        self.metrics = Metrics(self.sizes, self.batcher.queued, lambda: self.batcher.reserved)

    def in_flight(self) -> int:
        """Requests admitted, or waiting on an open connection to be read (closed-loop
        clients' idle keep-alive connections count too: at most one each)."""
        return max(self.pending, self.connections() - 1)

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
        if self._explainer is not None:  # the saliency program and the subspace variants
            self._explainer(np.zeros((image, image, 3), np.uint8))
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
        temperature = scoring.temperature_arg(self.point.temperature)
        sharding = parallel.batch_sharding(mesh)

        def model_fn(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            out = predict(trainable, run.frozen, jax.device_put(batch, sharding), temperature)
            return np.asarray(out["prob"], np.float32), np.asarray(out["logit"], np.float32)

        if self.cfg.serve.explain:
            self._explainer = _Explainer(self.cfg, run, trainable, predict, sharding,
                                         self.sizes[0])
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

    def _aggregate(self, probs: list[float]) -> float:
        """A video's P(fake) from its frames', as its video-level threshold was chosen
        (config.eval.video_aggregation, recorded in decision.json); an image's is its own."""
        if len(probs) == 1:
            return float(probs[0])
        from fmsd_jax.evaluators import metrics

        return metrics.video_score(probs, how=self.point.aggregation, topk=self.point.topk)

    async def _explain(self, pixels: np.ndarray, asked: bool) -> dict[str, Any]:
        """The `explain` field: computed on the device thread for the frame shown, or why not."""
        if not asked:
            return unexplained("not requested (explain=true asks for it)")
        if self._explainer is None:
            return unexplained("this service was started with config.serve.explain=False"
                               if not self.cfg.serve.explain else
                               "the service's model was given by its caller, not restored")
        return await self.batcher.on_device(self._explainer, pixels)

    async def score(self, upload, explain: bool, received: float,
                    read_s: float) -> dict[str, Any]:
        """The answer to one upload (MediaRefused or Overloaded for the app to turn into an
        error answer)."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        decoded = await loop.run_in_executor(self.pool, media.decode, upload.data, self.limits)
        decode_s = time.perf_counter() - t0
        kept = [f for f in decoded.frames if f.pixels is not None]  # a face, or a centre square
        scored = []
        if kept:
            with self.batcher.reserve(len(kept)):
                scored = await self.batcher.score([f.pixels for f in kept])
        by_frame = {id(f): s for f, s in zip(kept, scored, strict=True)}
        probs = [s[0] for s in scored]
        level = "video" if decoded.kind == "video" else "frame"
        prob = self._aggregate(probs) if probs else None
        frames = []
        for f in decoded.frames:
            p, logit = by_frame[id(f)][:2] if id(f) in by_frame else (None, None)
            frames.append({"index": f.index, "time_s": f.time_s, "prob_fake": p,
                           "logit": logit, "face_found": f.face_found, "box": f.box,
                           "scored": id(f) in by_frame})
        looked = [f.face_found for f in decoded.frames if f.face_found is not None]
        best = kept[int(np.argmax(probs))] if kept else None  # the frame shown and explained
        explained = (await self._explain(best.pixels, explain) if best is not None else
                     unexplained("no frame was scored (no face found)"))
        answer = {
            "id": uuid.uuid4().hex[:12], "api_version": "v1",
            "filename": upload.filename, "media_type": decoded.media_type,
            "kind": decoded.kind, "width": decoded.width, "height": decoded.height,
            "frame_count": decoded.frame_count, "processing": decoded.face_mode,
            "prob_fake": prob,
            "aggregation": self.point.aggregation if level == "video" else None,
            "label": self.point.label(prob, level) if prob is not None else None,
            "verdict": self.point.verdict(prob, level) if prob is not None else "no face found",
            "operating_point": self.point.as_dict(level),
            "faces": {"looked_for": bool(looked) or None, "found": sum(looked),
                      "frames": len(decoded.frames),
                      "no_face_found": bool(looked) and not any(looked)},
            "frames": frames,
            "crop": ({"frame": best.index, "png_base64": _png_base64(best.pixels)}
                     if best is not None else None),
            "explain": explained,
            "model": self.identity,
            "timings_ms": {"read": 1000 * read_s, "decode": 1000 * decode_s,
                           "queue": 1000 * max((s[3] for s in scored), default=0.0),
                           "model": 1000 * max((s[2] for s in scored), default=0.0),
                           "total": 1000 * (time.perf_counter() - received)},
        }
        return answer


def unexplained(reason: str) -> dict[str, Any]:
    return {"available": False, "subspaces": None, "heatmap_png_base64": None,
            "reason": reason}


class _Explainer:
    """`explain=true` for one frame (the one the answer shows): each artifact subspace's
    change of the fake logit when its training is undone (evaluators/subspaces.py) and where
    in the crop the fake logit comes from (integrated gradients, evaluators/saliency.py),
    drawn over the crop. Its programs (the undo, the saliency scan) are compiled at start for
    the smallest batch size, so an explanation compiles nothing either."""

    def __init__(self, cfg: mlc.ConfigDict, run: Any, trainable: Any, predict: Any,
                 sharding: Any, size: int):
        from fmsd_jax.evaluators import subspaces

        self.run, self.trainable, self.predict = run, trainable, predict
        self.sharding, self.size = sharding, int(size)
        self.steps = int(cfg.predict.explain_steps)
        self.why_not = subspaces.skip_reason(run)
        self.variants = subspaces.ablations(run, trainable) if self.why_not is None else None

    def __call__(self, pixels: np.ndarray) -> dict[str, Any]:
        import jax

        from fmsd_jax.evaluators import saliency, subspaces

        batch = np.zeros((self.size, *pixels.shape), np.uint8)
        batch[0] = pixels
        images = jax.device_put(batch, self.sharding)
        out: dict[str, Any] = {"available": True, "reason": None, "subspaces": None,
                               "subspaces_reason": self.why_not}
        if self.variants is not None:
            deltas = subspaces.per_input_subspaces(self.run, self.predict, self.variants,
                                                   images)[0]
            out["subspaces"] = [{"k": k, "delta_logit": float(d)} for k, d in enumerate(deltas)]
        maps = saliency.saliency_maps(self.run, self.trainable, images, self.steps)
        patch_map = np.asarray(maps["map"][0], np.float32)
        out["heatmap_png_base64"] = _png_base64(saliency.overlay(pixels, patch_map))
        out["patch_map"] = patch_map.tolist()
        out["completeness_gap"] = float(saliency.completeness_gap(
            {k: v[:1] for k, v in maps.items()})[0])
        return out
