"""Video files: frame counting, frame decoding and face cropping with OpenCV.

The face detector is a frontal-face cascade that ships inside an installed package
(OpenCV 4's Haar cascade, or scikit-image's LBP cascade under OpenCV 5), so nothing is
downloaded, and the crop follows DeepfakeBench's preprocessing (square box around the
face scaled by 1.3).
"""

from __future__ import annotations

import os

import cv2
import numpy as np

# A video that does not decode is reported by the caller in one line ("no decodable video
# frames"); FFmpeg's own lines on stderr ("moov atom not found") would only break that line.
# Read by OpenCV when its first capture opens; set it yourself to see FFmpeg's messages.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET

_DETECTOR = None


def _detector():
    """OpenCV 4's Haar cascade when this OpenCV ships it; OpenCV 5 dropped the cascades,
    and then scikit-image's bundled LBP frontal-face cascade (the same OpenCV-trained
    model family) is used.  Either way nothing is downloaded."""
    global _DETECTOR
    if _DETECTOR is None:
        haar = os.path.join(getattr(getattr(cv2, 'data', None), 'haarcascades', '') or '',
                            'haarcascade_frontalface_default.xml')
        if hasattr(cv2, 'CascadeClassifier') and os.path.isfile(haar):
            cascade = cv2.CascadeClassifier(haar)
            if cascade.empty():
                raise RuntimeError(f'OpenCV face cascade could not be loaded from {haar}')
            _DETECTOR = ('opencv', cascade)
        else:
            import skimage.data
            import skimage.feature
            _DETECTOR = ('skimage', skimage.feature.Cascade(
                skimage.data.lbp_frontal_face_cascade_filename()))
    return _DETECTOR


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


def square_crop_box(box: tuple[int, int, int, int], shape: tuple[int, ...],
                    margin: float) -> tuple[int, int, int, int]:
    """Square (x0, y0, x1, y1) of side `margin * max(w, h)` centred on `box` (x, y, w, h),
    shifted (not shrunk) to stay inside the image where possible, as DeepfakeBench's
    crop keeps the face centred at a fixed scale."""
    height, width = shape[:2]
    x, y, w, h = box
    side = min(int(round(max(w, h) * margin)), height, width)
    cx, cy = x + w / 2.0, y + h / 2.0
    x0 = int(round(min(max(cx - side / 2.0, 0), width - side)))
    y0 = int(round(min(max(cy - side / 2.0, 0), height - side)))
    return x0, y0, x0 + side, y0 + side


def detect_face(image: np.ndarray, min_fraction: float = 0.1
                ) -> tuple[int, int, int, int] | None:
    """Largest face (x, y, w, h) in an RGB image, or None."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    min_side = max(int(min(gray.shape) * min_fraction), 16)
    if min_side > min(gray.shape):
        return None
    kind, det = _detector()
    if kind == 'opencv':
        faces = [tuple(int(v) for v in f) for f in det.detectMultiScale(
            gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))]
    else:
        faces = [(int(f['c']), int(f['r']), int(f['width']), int(f['height']))
                 for f in det.detect_multi_scale(img=gray, scale_factor=1.2, step_ratio=1,
                                                 min_size=(min_side, min_side),
                                                 max_size=gray.shape)]
    if not faces:
        return None
    return max(faces, key=lambda f: f[2] * f[3])


def crop_face(image: np.ndarray, *, margin: float = 1.3, detect: bool = True,
              min_fraction: float = 0.1) -> np.ndarray:
    """Face crop with DeepfakeBench's margin; the centre square when no face is found so
    that a frame is never silently dropped from a video's prediction."""
    height, width = image.shape[:2]
    box = detect_face(image, min_fraction) if detect else None
    if box is None:
        side = min(height, width)
        box = ((width - side) // 2, (height - side) // 2, side, side)
        margin = 1.0
    x0, y0, x1, y1 = square_crop_box(box, image.shape, margin)
    return np.ascontiguousarray(image[y0:y1, x0:x1])
