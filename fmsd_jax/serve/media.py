"""What an upload is, decided from its bytes, and its frames decoded in memory within limits.

Why from the bytes: a name is whatever the sender typed (`notes.txt` renamed `face.png`), and a
decoder picked by the name either fails deep inside a library or, worse, guesses. The magic
numbers at the start of the file decide the type; the name is never consulted.

Why in memory: an upload is someone's media, and the service promises to keep none of it. Images
decode with Pillow from a buffer and videos with PyAV (FFmpeg) from a `BytesIO`, so no upload
touches the disk, and Pillow's header read gives the pixel count before a pixel is allocated,
as PyAV's stream header gives a video's size and claimed frame count before a frame is decoded.

Each refusal is a `MediaRefused` carrying the HTTP status the app answers with and a one-line
reason naming the limit and the fix.
"""

from __future__ import annotations

import dataclasses
import io
import re
import warnings

import ml_collections as mlc
import numpy as np
from PIL import Image, ImageOps

from fmsd_jax.data import faces, transforms
from fmsd_jax.data import records as rec


class MediaRefused(Exception):
    """An upload the service will not score: `status` (HTTP) and a one-line `reason`."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


# (media type, kind) by magic number; the offsets are those of each format's specification.
IMAGE_TYPES = ("image/jpeg", "image/png", "image/bmp", "image/webp")
VIDEO_TYPES = ("video/x-msvideo", "video/mp4", "video/quicktime", "video/x-matroska")


def sniff(data: bytes) -> tuple[str, str] | None:
    """(media type, 'image' or 'video') from the first bytes of `data`, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg", "image"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png", "image"
    if data.startswith(b"BM") and len(data) >= 26:
        return "image/bmp", "image"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", "image"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "video/x-msvideo", "video"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        return ("video/quicktime" if brand == b"qt  " else "video/mp4"), "video"
    if data.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: Matroska and WebM
        return "video/x-matroska", "video"
    return None


def describe_start(data: bytes) -> str:
    """The first bytes as a reader can tell them apart: text shows as text, binary as hex."""
    head = data[:8]
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return repr(head.decode("ascii"))
    return head.hex(" ")


@dataclasses.dataclass
class Frame:
    """One frame to score: the model's input (image_size² RGB uint8) and where it came from."""

    pixels: np.ndarray | None  # None: no face, and data.face.if_none='skip'
    index: int  # frame index in the video; 0 for an image
    time_s: float | None  # presentation time in a video
    face_found: bool | None  # None: face detection is off (data.video.detect_faces)
    box: list[int] | None  # [left, top, right, bottom] of the face found, source pixels
    source_size: tuple[int, int]  # (width, height) of the source frame


@dataclasses.dataclass
class Decoded:
    media_type: str
    kind: str
    frames: list[Frame]
    width: int
    height: int
    frame_count: int  # frames in the whole video (1 for an image)
    face_mode: str  # what was done to find the face (as the response states it)


class Limits:
    """The serve.* limits that decoding enforces, read once from the config."""

    def __init__(self, serve_cfg: mlc.ConfigDict, data_cfg: mlc.ConfigDict, video_frames: int):
        self.max_image_pixels = int(serve_cfg.max_image_pixels)
        self.max_video_pixels = int(serve_cfg.max_video_pixels)
        self.max_video_frames = int(serve_cfg.max_video_frames)
        self.image_faces = str(serve_cfg.image_faces)
        self.video_frames = int(video_frames)
        self.image_size = int(data_cfg.image_size)
        self.detect = bool(data_cfg.face.enabled)
        self.if_none = str(data_cfg.face.if_none)
        # DeepfakeBench's aligned crop (dlib), built once: its models load per thread.
        self.cropper = faces.FaceCropper.from_config(data_cfg) if self.detect else None


def crop_face(rgb: np.ndarray, limits: Limits
              ) -> tuple[np.ndarray | None, bool | None, list[int] | None]:
    """(crop or None, found, [left, top, right, bottom] or None): the one place the service
    crops a face, as training data was cropped (fmsd_jax/data/faces.py: dlib's detector and
    landmarks, five-point alignment, scale 1.3, as DeepfakeBench). Where no face is found,
    `data.face.if_none` decides, as for --mode predict: 'centre' scores the centre square,
    'skip' scores nothing for the frame (None); `found` False lets the answer say so. With
    `data.face.enabled` False every frame is its centre square and `found` is None."""
    if not limits.detect:
        return faces.centre_square(rgb), None, None
    face = limits.cropper.crop(rgb)
    if face.found:
        return face.image, True, [int(v) for v in face.box]
    if limits.if_none == "centre":
        return faces.centre_square(rgb), False, None
    return None, False, None


def _model_input(rgb: np.ndarray, limits: Limits, detect: bool, index: int,
                 time_s: float | None) -> Frame:
    h, w = rgb.shape[:2]
    if detect:
        crop, found, box = crop_face(rgb, limits)
    else:  # the image is taken whole as a face crop, as DeepfakeBench stores frames
        crop, found, box = rgb, None, [0, 0, w, h]
    pixels = None if crop is None else np.ascontiguousarray(
        transforms.resize_square(crop, limits.image_size), np.uint8)
    return Frame(pixels, index, time_s, found, box, (w, h))


def decode(data: bytes, limits: Limits) -> Decoded:
    """The frames to score of one upload, or MediaRefused (415 unknown type, 413 over a pixel
    or frame limit, 422 damaged or empty)."""
    if not data:
        raise MediaRefused(400, "the upload is empty (0 bytes); send an image or a video file")
    found = sniff(data)
    if found is None:
        raise MediaRefused(415, f"not an image or video this service reads (its bytes start "
                           f"{describe_start(data)}; the name is not used): send JPEG, PNG, "
                           "BMP, WebP, AVI, MP4/MOV or MKV/WebM")
    media_type, kind = found
    if kind == "image":
        return _decode_image(data, media_type, limits)
    return _decode_video(data, media_type, limits)


def _decode_image(data: bytes, media_type: str, limits: Limits) -> Decoded:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check below
            image = Image.open(io.BytesIO(data))
            w, h = image.size  # from the header: nothing is decoded yet
            if w * h > limits.max_image_pixels:
                raise MediaRefused(413, f"the image header claims {w}x{h} = {w * h} pixels, "
                                   f"over serve.max_image_pixels={limits.max_image_pixels}; "
                                   "send a smaller image")
            image.load()  # a truncated file raises here (Pillow never pads one with grey)
            image = ImageOps.exif_transpose(image)  # a phone photo stands as it was taken
            rgb = np.asarray(image.convert("RGB"))
    except MediaRefused:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaRefused(422, f"the {media_type} image does not decode ({_one_line(e)}); "
                           "it is truncated or damaged: send the complete file") from None
    if min(rgb.shape[:2]) == 0:
        raise MediaRefused(422, "the image has no pixels")
    detect = limits.image_faces == "detect"
    frame = _model_input(rgb, limits, detect, 0, None)
    mode = (f"the largest face cropped and aligned as DeepfakeBench does ({_none(limits)})"
            if detect and limits.detect else "taken whole as a face crop (no face detection)"
            if not detect else "its centre square (data.face.enabled is False)")
    return Decoded(media_type, "image", [frame], rgb.shape[1], rgb.shape[0], 1, mode)


def _decode_video(data: bytes, media_type: str, limits: Limits) -> Decoded:
    import av  # PyAV: FFmpeg's demuxers and decoders on a buffer, no file needed

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise MediaRefused(422, f"the {media_type} file holds no video stream")
            stream = container.streams.video[0]
            w, h = int(stream.codec_context.width), int(stream.codec_context.height)
            claimed = int(stream.frames or 0)
            if w * h > limits.max_video_pixels:
                raise MediaRefused(413, f"the video header claims {w}x{h} frames, over "
                                   f"serve.max_video_pixels={limits.max_video_pixels}; send a "
                                   "smaller video")
            if claimed > limits.max_video_frames:
                raise MediaRefused(413, f"the video header claims {claimed} frames, over "
                                   f"serve.max_video_frames={limits.max_video_frames}; send a "
                                   "shorter video")
            # Count the frames by their packets (no decoding), stopping at the limit.
            count = 0
            for packet in container.demux(stream):
                if packet.size:
                    count += 1
                    if count > limits.max_video_frames:
                        raise MediaRefused(413, f"the video holds more than "
                                           f"serve.max_video_frames={limits.max_video_frames} "
                                           "frames; send a shorter video")
        if count == 0:
            raise MediaRefused(422, f"the {media_type} file holds no decodable video frames")
        wanted = set(int(i) for i in rec.even_indices(count, limits.video_frames))
        frames = []
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            for i, frame in enumerate(container.decode(stream)):
                if frame.width * frame.height > limits.max_video_pixels:
                    raise MediaRefused(413, f"video frame {i} is {frame.width}x{frame.height}, "
                                       "over serve.max_video_pixels="
                                       f"{limits.max_video_pixels}; send a smaller video")
                if i in wanted:
                    rgb = frame.to_ndarray(format="rgb24")
                    t = float(frame.time) if frame.time is not None else None
                    frames.append(_model_input(rgb, limits, True, i, t))
                if len(frames) == len(wanted):
                    break
    except MediaRefused:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaRefused(422, f"the {media_type} video does not decode ({_one_line(e)}); "
                           "it is truncated or damaged: send the complete file") from None
    if not frames:
        raise MediaRefused(422, f"the {media_type} file holds no decodable video frames")
    mode = (f"{len(frames)} frames taken evenly across its {count}, each the largest face "
            f"cropped and aligned as DeepfakeBench does ({_none(limits)})" if limits.detect
            else f"{len(frames)} frames taken evenly across its {count}, each its centre square")
    return Decoded(media_type, "video", frames, w, h, count, mode)


def _none(limits: Limits) -> str:
    return ("the centre square where none is found" if limits.if_none == "centre"
            else "a frame without a face is not scored")


def _one_line(e: BaseException) -> str:
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
    return " ".join(text.split())[:200] or type(e).__name__
