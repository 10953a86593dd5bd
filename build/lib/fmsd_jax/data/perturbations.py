"""Image and video perturbations for robustness evaluation (uint8 RGB in, uint8 RGB out).

Two protocols, each a table of types × severity levels:

* ``deeperforensics``: the seven distortions of DeeperForensics-1.0
  (`EndlessSora/DeeperForensics-1.0`, ``perturbation/distortions.py`` and the level table in
  ``add_distortion_to_video.py``), the "unseen perturbations" protocol of LipForensics and
  DFD-FCG. Re-implemented here on RGB arrays with vectorised numpy / OpenCV, with the
  reference's semantics: the same parameters, the same colour transform and noise scale, and
  the same truncation to uint8 (``astype(np.uint8)``, i.e. floor) where the reference has it.
  The reference applies them to the whole video before face cropping; which pixels we can
  reach for each data source is decided by ``PerturbedReader`` (see ``WHERE_APPLIED``).
* ``gend``: the image-level grid of GenD (WACV 2026) on the face crop at the model's input
  size: JPEG quality, Gaussian blur (kernel, σ), down-and-up resizing, additive Gaussian noise.

Randomness (block positions, noise) comes from a generator seeded by (seed, protocol, type,
level, record identity), so a frame gets the same perturbation whatever the worker count,
batch or order: the same seed gives identical pixels. The identity (`noise_key`) names the
frame within its dataset (video id, file name, frame index), never the folder the dataset
sits in, so a copy of the data elsewhere gets the same noise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import cv2
import numpy as np

from fmsd_jax.data import transforms as tr
from fmsd_jax.errors import BadInput

# ----------------------------------------------------------------------------------------------
# Colour space: BT.601 full-swing YCbCr, as OpenCV's COLOR_BGR2YCrCb that the reference calls.

_RGB_TO_YCBCR = np.array([[0.299, 0.587, 0.114],
                          [-0.168736, -0.331264, 0.5],
                          [0.5, -0.418688, -0.081312]])
_YCBCR_TO_RGB = np.linalg.inv(_RGB_TO_YCBCR)

# The reference maps OpenCV's float YCrCb (computed on 0..255 values) with
# Y' = (Y·219 + 16) / 255 and C' = (C·224 + 16) / 255, divides by 255, adds N(0, level) and
# maps back. In 0..255 pixel units its noise therefore has these standard deviations per √level:
NOISE_STD_Y = 255.0 * 255.0 / 219.0
NOISE_STD_C = 255.0 * 255.0 / 224.0

BLOCK = 8  # side of a block-wise distortion block, grey 128 as in the reference
BLOCK_VALUE = 128
H264_FPS = 25  # frame rate given to streams made of stored frames (the reference keeps the video's)


def _floor_u8(x: np.ndarray) -> np.ndarray:
    """The reference's `np.clip(x, 0, 255).astype(np.uint8)`: truncation, not rounding."""
    return np.clip(x, 0, 255).astype(np.uint8)


def _round_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def rgb_to_ycbcr(image: np.ndarray) -> np.ndarray:
    """float64 (H, W, 3) Y, Cb, Cr with chroma centred on 128 (the 8-bit convention)."""
    out = image.astype(np.float64) @ _RGB_TO_YCBCR.T
    out[..., 1:] += 128.0
    return out


def ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    centred = ycbcr - np.array([0.0, 128.0, 128.0])
    return centred @ _YCBCR_TO_RGB.T


# ----------------------------------------------------------------------------------------------
# DeeperForensics-1.0


def colour_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """CS: Cb and Cr scaled by `factor` around neutral, luma kept. Scaling the chroma of a
    linear YCbCr transform is, back in RGB, a blend of each pixel towards its own luma."""
    x = image.astype(np.float64)
    y = (x @ _RGB_TO_YCBCR[0])[..., None]
    return _floor_u8(y + float(factor) * (x - y))


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """CC: every channel multiplied by `factor` in float32 and truncated, as the reference."""
    return (image.astype(np.float32) * np.float32(factor)).astype(np.uint8)


def block_count(height: int, width: int, param: int) -> int:
    """Blocks for BW. The reference places (min(H, W) // 256) × param blocks, none at all below
    256 px. Below 256 px we keep the share of pixels a 256×256 crop loses at that level
    (param × H·W / 256², rounded) and place at least one block."""
    short = min(height, width)
    if short >= 256:
        return short // 256 * int(param)
    return max(1, int(round(param * height * width / 256.0**2)))


def block_wise(image: np.ndarray, param: int, rng: np.random.Generator) -> np.ndarray:
    """BW: grey 8×8 blocks at uniform positions; top-left corners in [0, side - 9] as the
    reference's `random.randint(0, side - 1 - 8)`."""
    h, w = image.shape[:2]
    n = block_count(h, w, param)
    ys = rng.integers(0, max(h - BLOCK, 1), size=n)
    xs = rng.integers(0, max(w - BLOCK, 1), size=n)
    # Paint all blocks at once: a mask from the union of the n squares (no per-pixel loop).
    mask = np.zeros((h + BLOCK, w + BLOCK), np.int32)
    np.add.at(mask, (ys, xs), 1)
    mask = cv2.boxFilter(mask.astype(np.float32), -1, (BLOCK, BLOCK), anchor=(BLOCK - 1, BLOCK - 1),
                         normalize=False, borderType=cv2.BORDER_CONSTANT)[:h, :w] > 0
    out = image.copy()
    out[mask] = BLOCK_VALUE
    return out


def gaussian_noise_ycbcr(image: np.ndarray, variance: float,
                         rng: np.random.Generator) -> np.ndarray:
    """GNC: white Gaussian noise on Y, Cb and Cr with the reference's scale (see NOISE_STD_*),
    back to RGB, clipped and truncated."""
    std = np.sqrt(float(variance)) * np.array([NOISE_STD_Y, NOISE_STD_C, NOISE_STD_C])
    noise = rng.standard_normal(image.shape) * std
    return _floor_u8(image.astype(np.float64) + noise @ _YCBCR_TO_RGB.T)


def gaussian_blur(image: np.ndarray, kernel: int, sigma: float | None = None) -> np.ndarray:
    """GB: OpenCV Gaussian blur, kernel × kernel, σ = kernel / 6 unless given."""
    kernel = int(kernel)
    if kernel <= 0:
        return image.copy()
    sigma = kernel / 6.0 if sigma is None else float(sigma)
    return cv2.GaussianBlur(image, (kernel, kernel), sigma)


def pixelation(image: np.ndarray, factor: int) -> np.ndarray:
    """'JPEG' in DeeperForensics' code: bilinear downscale to (W // f, H // f) and back up."""
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(w // int(factor), 1), max(h // int(factor), 1)),
                       interpolation=cv2.INTER_LINEAR)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _h264_stream(width: int, height: int, crf: int, rate: Fraction | int):
    import av

    buf = io.BytesIO()
    container = av.open(buf, "w", format="mp4")
    stream = container.add_stream("libx264", rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    # ffmpeg's defaults for `-crf N` (preset medium); one thread, because x264's output depends
    # on its thread count and the machine must not change the result.
    stream.options = {"crf": str(int(crf)), "preset": "medium"}
    stream.codec_context.thread_count = 1
    stream.codec_context.time_base = 1 / Fraction(rate)
    return buf, container, stream


def _decode(buf: io.BytesIO, keep: Callable[[int], bool], crop: tuple[int, int] | None
            ) -> dict[int, np.ndarray]:
    import av

    buf.seek(0)
    out: dict[int, np.ndarray] = {}
    with av.open(buf, "r") as container:
        for i, frame in enumerate(container.decode(video=0)):
            if keep(i):
                rgb = frame.to_ndarray(format="rgb24")
                out[i] = np.ascontiguousarray(rgb[:crop[0], :crop[1]] if crop else rgb)
    return out


def h264(frames: Sequence[np.ndarray], crf: int, fps: int = H264_FPS) -> list[np.ndarray]:
    """VC on a sequence of same-size RGB frames: one H.264 stream (libx264, CRF `crf`,
    yuv420p, preset medium), decoded back. Odd sides are edge-padded for 4:2:0, then cropped."""
    import av

    if not frames:
        return []
    h, w = frames[0].shape[:2]
    ph, pw = h + h % 2, w + w % 2
    buf, container, stream = _h264_stream(pw, ph, crf, fps)
    with container:
        for i, f in enumerate(frames):
            if f.shape[:2] != (h, w):
                raise ValueError(f"h264: frame {i} is {f.shape[:2]}, the first is {(h, w)}")
            padded = np.pad(f, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(padded), format="rgb24")
            vf.pts, vf.time_base = i, 1 / Fraction(fps)
            container.mux(stream.encode(vf))
        container.mux(stream.encode())
    decoded = _decode(buf, lambda i: True, (h, w))
    if len(decoded) != len(frames):
        raise RuntimeError(f"h264: encoded {len(frames)} frames, decoded {len(decoded)}")
    return [decoded[i] for i in range(len(frames))]


def h264_video_file(path: str, crf: int, indices: Sequence[int]) -> dict[int, np.ndarray]:
    """VC on a video file as the protocol does it: every frame of the video re-encoded at its
    own size and frame rate (libx264, CRF `crf`), then frames `indices` decoded as RGB."""
    import av

    wanted = set(int(i) for i in indices)
    with av.open(path, "r") as src:
        vs = src.streams.video[0]
        width, height = vs.codec_context.width, vs.codec_context.height
        pw, ph = width - width % 2, height - height % 2  # 4:2:0 needs even sides
        rate = vs.average_rate or H264_FPS
        buf, container, stream = _h264_stream(pw, ph, crf, rate)
        with container:
            for i, frame in enumerate(src.decode(vs)):
                frame = frame.reformat(width=pw, height=ph, format="yuv420p")
                frame.pts, frame.time_base = i, 1 / Fraction(rate)
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
    return _decode(buf, lambda i: i in wanted, None)


# ----------------------------------------------------------------------------------------------
# GenD's image grid


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG at `quality` (OpenCV's libjpeg, 4:2:0), decoded back."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"JPEG encoding at quality {quality} failed")
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def resize_and_back(image: np.ndarray, size: int, reference: int = 224) -> np.ndarray:
    """Down to `size` px (of a `reference`-px input: scaled to this image's side) with area
    averaging, back up bilinearly; a size at or above the reference is the identity."""
    h, w = image.shape[:2]
    scale = float(size) / float(reference)
    if scale >= 1.0:
        return image.copy()
    small = cv2.resize(image, (max(int(round(w * scale)), 1), max(int(round(h * scale)), 1)),
                       interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def gaussian_noise_rgb(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive N(0, σ²) on [0, 1] RGB values, rounded and clipped."""
    if sigma <= 0:
        return image.copy()
    return _round_u8(image.astype(np.float64) + rng.standard_normal(image.shape) * 255.0 * sigma)


# ----------------------------------------------------------------------------------------------
# Protocol tables


@dataclasses.dataclass(frozen=True)
class PerturbationType:
    """One row of a protocol: a distortion and its parameter at each severity level."""

    key: str
    name: str
    params: tuple
    param_name: str
    fn: Callable[..., np.ndarray]  # (image, param, rng) -> image
    video: bool = False  # needs the whole video (VC)

    def label(self, level: int) -> str:
        p = self.params[level - 1]
        return "×".join(f"{v:g}" for v in p) if isinstance(p, tuple) else f"{p:g}"


def _no_rng(fn):
    """(image, param) -> image as the table's (image, param, rng) -> image."""
    return lambda image, param, rng: fn(image, param)


def _gend_blur(image, param, rng):
    return gaussian_blur(image, param[0], param[1])


def _video_only(image, param, rng):
    raise TypeError("VC acts on a whole video; PerturbedReader calls h264 / h264_video_file")


PROTOCOLS: dict[str, dict[str, PerturbationType]] = {
    "deeperforensics": {t.key: t for t in (
        PerturbationType("CS", "colour saturation", (0.4, 0.3, 0.2, 0.1, 0.0),
                         "chroma factor", _no_rng(colour_saturation)),
        PerturbationType("CC", "contrast", (0.85, 0.725, 0.6, 0.475, 0.35), "pixel factor",
                         _no_rng(contrast)),
        PerturbationType("BW", "block-wise", (16, 32, 48, 64, 80), "blocks per 256 px",
                         block_wise),
        PerturbationType("GNC", "Gaussian noise (YCbCr)", (0.001, 0.002, 0.005, 0.01, 0.05),
                         "variance", gaussian_noise_ycbcr),
        PerturbationType("GB", "Gaussian blur", (7, 9, 13, 17, 21), "kernel (σ = k/6)",
                         _no_rng(gaussian_blur)),
        PerturbationType("JPEG", "pixelation ('JPEG')", (2, 3, 4, 5, 6), "downscale factor",
                         _no_rng(pixelation)),
        PerturbationType("VC", "H.264 compression", (30, 32, 35, 38, 40), "CRF", _video_only,
                         video=True),
    )},
    "gend": {t.key: t for t in (
        PerturbationType("JPEG", "JPEG", (100, 80, 60, 40, 20, 10), "quality", _no_rng(jpeg)),
        PerturbationType("GB", "Gaussian blur", ((0, 0), (5, 0.5), (7, 1), (11, 1.5), (13, 2),
                                                 (19, 3)), "kernel×σ", _gend_blur),
        PerturbationType("RS", "resize", (224, 112, 64), "px of 224", _no_rng(resize_and_back)),
        PerturbationType("GN", "Gaussian noise (RGB)", (0, 0.01, 0.03, 0.05, 0.1, 0.2),
                         "σ of [0, 1]", gaussian_noise_rgb),
    )},
}

# Where each protocol acts, per data source (also written into robustness.md).
STAGE = {"deeperforensics": "before_crop", "gend": "model_input"}
WHERE_APPLIED = {
    "deeperforensics": {
        "video files": "CS, CC, BW, GNC, GB and pixelation on each whole decoded frame "
                 "*before* the face crop, as the protocol does; VC re-encodes the whole video "
                 "(every frame, its own size and frame rate, libx264 CRF, preset medium, one "
                 "thread) and the sampled frames are then decoded and cropped",
        "stored face crops": "DeepfakeBench, image-folder and TFDS frames (already face "
                        "crops): every type on the stored crop at its stored size, *after* the "
                        "cropping that made it (the full frames are not available) and before "
                        "the resize to the model input; VC encodes the video's sampled crops, "
                        f"in frame order, as one H.264 stream at {H264_FPS} fps and decodes "
                        "them back (a sparser stream than the full video the protocol "
                        "compresses)",
    },
    "gend": {
        "all sources": "on the face crop at the model's input size, after cropping and "
                       "resizing (GenD's grid is defined on cropped faces); resize sizes are "
                       "for a 224 px input and scale with the input size",
    },
}


def get_type(protocol: str, key: str) -> PerturbationType:
    if protocol not in PROTOCOLS:
        raise BadInput(f"robustness protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    types = PROTOCOLS[protocol]
    if key not in types:
        raise BadInput(f"protocol {protocol!r} has no perturbation type {key!r}; its types: "
                       f"{list(types)}")
    return types[key]


def seen_in_training(protocol: str, key: str, param: Any, aug_cfg) -> bool:
    """Whether a level lies inside the training augmentation's own range (JPEG quality,
    blur kernel), i.e. is not an *unseen* perturbation for a model trained with it."""
    if aug_cfg is None or not aug_cfg.enabled:
        return False
    if protocol == "gend" and key == "JPEG" and aug_cfg.quality_prob > 0:
        return int(aug_cfg.quality_lower) <= int(param) <= int(aug_cfg.quality_upper)
    if key == "GB" and aug_cfg.blur_prob > 0:
        k = int(param[0] if isinstance(param, tuple) else param)
        lo, hi = (int(v) for v in aug_cfg.blur_limit)
        return k > 0 and lo <= k <= hi
    return False


def is_identity(protocol: str, key: str, param: Any) -> bool:
    """Levels of GenD's grid that leave the image unchanged (its 'no perturbation' column)."""
    if protocol != "gend":
        return False
    return ((key == "GB" and param[0] == 0) or (key == "GN" and param == 0)
            or (key == "RS" and param >= 224))


# ----------------------------------------------------------------------------------------------
# Per-record application


def record_key(record: dict) -> str:
    return f"{record['dataset']}|{record['path']}|{record['frame_index']}"


def noise_key(record: dict) -> str:
    """What seeds a frame's random perturbation: the frame's identity within its dataset.

    Not `record_key`: that holds the absolute path, so the same data under another root (two
    copies of a benchmark, a demo rerun in another workdir) drew other noise and gave other
    robustness numbers (seen in the demo: block-wise and noise levels differed between two
    runs of the same code)."""
    return (f"{record['dataset']}|{record['video_id']}|{os.path.basename(record['path'])}|"
            f"{record['frame_index']}")


def _video_key(record: dict) -> tuple[str, str]:
    return record["dataset"], record["video_id"]


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """One (protocol, type, level) with its seed; picklable into grain's workers."""

    protocol: str
    key: str
    level: int  # 1-based, as in the reference
    seed: int

    @property
    def spec(self) -> PerturbationType:
        return get_type(self.protocol, self.key)

    @property
    def param(self) -> Any:
        return self.spec.params[self.level - 1]

    def rng(self, record_id: str) -> np.random.Generator:
        digest = hashlib.sha1(f"{self.protocol}|{self.key}|{self.level}|{record_id}".encode())
        return np.random.default_rng([int(self.seed), int.from_bytes(digest.digest()[:8], "big")])

    def __call__(self, image: np.ndarray, record_id: str) -> np.ndarray:
        return self.spec.fn(image, self.param, self.rng(record_id))


class PerturbedReader:
    """An ImageReader whose pixels are perturbed where the protocol says (see WHERE_APPLIED).

    For VC the unit is a video: the reader compresses all frames of the record's video once and
    keeps the last few videos (eval records of a video are contiguous, and grain's read threads
    may be on two neighbouring videos at once)."""

    CACHED_VIDEOS = 4

    def __init__(self, reader: tr.ImageReader, perturbation: Perturbation, records=None,
                 videos: dict[tuple[str, str], list[int]] | None = None):
        self.reader = reader
        self.perturbation = perturbation
        self.records = records
        self.videos = videos
        self._init_cache()

    def _init_cache(self) -> None:
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], dict[str, np.ndarray]] = OrderedDict()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_cache")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def __call__(self, record: dict) -> np.ndarray | None:
        if self.perturbation.spec.video:
            return self._from_video(record)
        image = self.reader.read(record)
        if image is None:
            return None
        stage = STAGE[self.perturbation.protocol]
        if stage == "before_crop":
            image = self.perturbation(image, noise_key(record))
        image = self.reader.finish(image, record)
        if stage == "model_input":
            image = self.perturbation(image, noise_key(record))
        return image

    def _from_video(self, record: dict) -> np.ndarray | None:
        vkey = _video_key(record)
        with self._lock:
            if vkey not in self._cache:
                self._cache[vkey] = self._compress(vkey)
                while len(self._cache) > self.CACHED_VIDEOS:
                    self._cache.popitem(last=False)
            frames = self._cache[vkey]
        image = frames.get(record_key(record))
        return None if image is None else self.reader.finish(image, record)

    def _compress(self, vkey: tuple[str, str]) -> dict[str, np.ndarray]:
        members = [self.records[i] for i in self.videos[vkey]]
        crf = int(self.perturbation.param)
        first = members[0]
        if first.get("image") is None and first["frame_index"] >= 0:
            by_path: dict[str, list[dict]] = {}
            for r in members:
                by_path.setdefault(r["path"], []).append(r)
            out = {}
            for path, rs in by_path.items():
                decoded = h264_video_file(path, crf, [r["frame_index"] for r in rs])
                out.update({record_key(r): decoded[r["frame_index"]] for r in rs
                            if r["frame_index"] in decoded})
            return out
        images = [(r, self.reader.read(r)) for r in members]
        images = [(r, im) for r, im in images if im is not None]
        if not images:
            return {}
        h, w = images[0][1].shape[:2]
        same = [im if im.shape[:2] == (h, w) else cv2.resize(im, (w, h)) for _, im in images]
        coded = h264(same, crf)
        return {record_key(r): (c if im.shape[:2] == (h, w)
                                else cv2.resize(c, (im.shape[1], im.shape[0])))
                for (r, im), c in zip(images, coded, strict=True)}


def reader_wrapper(perturbation: Perturbation) -> Callable[[tr.ImageReader, Any], PerturbedReader]:
    """For `pipeline.make_eval_loader(reader_wrapper=...)`: wraps its reader; for VC it also
    groups the records by video (one pass over the record list)."""

    def wrap(reader: tr.ImageReader, records) -> PerturbedReader:
        videos = None
        if perturbation.spec.video:
            videos = {}
            for i in range(len(records)):
                videos.setdefault(_video_key(records[i]), []).append(i)
        return PerturbedReader(reader, perturbation, records, videos)

    return wrap
