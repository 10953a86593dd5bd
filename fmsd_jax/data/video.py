"""Video files: frame counting and frame decoding with OpenCV (FFmpeg).

Faces are found and cropped by fmsd_jax/data/faces.py, DeepfakeBench's rule; this module only
turns a file into RGB frames.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import cv2
import numpy as np

# A video that does not decode is reported by the caller in one line ("no decodable video
# frames"); FFmpeg's own lines on stderr ("moov atom not found") would only break that line.
# Read by OpenCV when its first capture opens; set it yourself to see FFmpeg's messages.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET

def _capture(path: str) -> cv2.VideoCapture:
    """OpenCV's reader given the name as bytes: a str name that is not valid UTF-8 (a
    surrogate-escaped Latin-1 byte, see fmsd_jax.pathnames) segfaults cv2.VideoCapture, while
    its bytes open the same file the same way (FFmpeg sees the same path). A str no file name
    can have (a surrogate outside the escapes, e.g. from a JSON's "\\ud800") gives a capture
    that is not opened, which callers already treat as an undecodable video."""
    try:
        return cv2.VideoCapture(os.fsencode(path))
    except UnicodeEncodeError:
        return cv2.VideoCapture()


def frame_count(path: str) -> int:
    """Number of decodable frames; container metadata is trusted when present because
    counting by decoding a whole video at start-up is too slow for thousands of files."""
    cap = _capture(path)
    try:
        if not cap.isOpened():
            return 0
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if n > 0:
            return n
        n = 0
        while cap.grab():
            n += 1
        return n
    finally:
        cap.release()


def read_frame(path: str, index: int) -> np.ndarray | None:
    """RGB uint8 frame `index` of a video, or None when it cannot be decoded."""
    cap = _capture(path)
    try:
        if not cap.isOpened():
            return None
        if index > 0:
            cap.set(cv2.CAP_PROP_POS_FRAMES, float(index))
        ok, frame = cap.read()
        if not ok or frame is None:
            return None
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


def read_frames(path: str, indices) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB uint8 frame) for each wanted index, decoding the video once from its start,
    as DeepfakeBench's preprocessing reads (a seek lands on the keyframe before the asked frame
    in many containers, so seeking would take other frames than the index says). Frames not
    wanted are only grabbed, not converted. Stops early at the first frame that does not
    decode; the caller compares what came back with what it asked for."""
    wanted = sorted({int(i) for i in indices})
    if not wanted:
        return
    cap = _capture(path)
    try:
        if not cap.isOpened():
            return
        todo = iter(wanted)
        nxt = next(todo)
        for i in range(wanted[-1] + 1):
            if not cap.grab():
                return
            if i != nxt:
                continue
            ok, frame = cap.retrieve()
            if not ok or frame is None:
                return
            yield i, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            nxt = next(todo, None)
            if nxt is None:
                return
    finally:
        cap.release()
