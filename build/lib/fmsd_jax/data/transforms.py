"""Per-record transforms: reading, resizing, DeepfakeBench augmentation (uint8 in, uint8 out).

These are module-level classes because grain pickles the pipeline into its worker
processes; closures and lambdas cannot cross that boundary.
"""

from __future__ import annotations

import random
import threading

import albumentations as A
import cv2
import grain
import numpy as np

from fmsd_jax.data import video as vid

cv2.setNumThreads(1)  # grain's threads/processes parallelise; nested cv2 threads just fight


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """DeepfakeBench resizes every stored frame to the model resolution; INTER_AREA when
    shrinking (anti-aliased), INTER_CUBIC when enlarging, as its load_rgb does."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interp)


def read_rgb(path: str) -> np.ndarray | None:
    """RGB uint8 image or None; cv2.imread returns None rather than raising on a corrupt
    or truncated file, which is what lets the pipeline skip and count it. The bytes are read
    by numpy (Python's file layer, which takes any file name) and decoded in memory, because
    cv2.imread segfaults on a name that is not valid UTF-8; a str no file can be named
    (UnicodeEncodeError, a ValueError) is unreadable like a missing file, and so is an image
    whose header claims more pixels than OpenCV will allocate (it raises cv2.error)."""
    try:
        data = np.fromfile(path, np.uint8)
    except (OSError, ValueError):
        return None
    if data.size == 0:
        return None
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error:  # a header claiming more than CV_IO_MAX_IMAGE_PIXELS (a "PNG bomb")
        return None
    if image is None:
        return None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class ImageReader:
    """Reads the pixels of one record (image file, video frame, or decoded TFDS image),
    resized to a square `image_size` (0 keeps the stored size)."""

    def __init__(self, image_size: int, face_margin: float = 1.3, detect_faces: bool = True,
                 min_face_fraction: float = 0.1):
        self.image_size = int(image_size)
        self.face_margin = float(face_margin)
        self.detect_faces = bool(detect_faces)
        self.min_face_fraction = float(min_face_fraction)

    @classmethod
    def from_config(cls, data_cfg) -> ImageReader:
        return cls(data_cfg.image_size, data_cfg.video.face_margin,
                   data_cfg.video.detect_faces, data_cfg.video.min_face_fraction)

    def __call__(self, record: dict) -> np.ndarray | None:
        image = self.read(record)
        return None if image is None else self.finish(image, record)

    def read(self, record: dict) -> np.ndarray | None:
        """The stored pixels as (H, W, 3) uint8 RGB, before any face crop or resize: a whole
        video frame for video files, the stored crop otherwise (robustness perturbations that
        the protocol applies before cropping act here)."""
        if record.get('image') is not None:  # tfds: already decoded
            image = np.asarray(record['image'])
        elif record['frame_index'] >= 0:
            image = vid.read_frame(record['path'], record['frame_index'])
        else:
            image = read_rgb(record['path'])
        if image is None or image.ndim not in (2, 3) or min(image.shape[:2]) == 0:
            return None
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        elif image.shape[-1] == 4:
            image = image[..., :3]
        elif image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        return np.ascontiguousarray(image, np.uint8)

    def finish(self, image: np.ndarray, record: dict) -> np.ndarray:
        """`read`'s pixels → model input: the face crop of a video frame, then the resize."""
        if record.get('image') is None and record['frame_index'] >= 0:
            image = vid.crop_face(image, margin=self.face_margin, detect=self.detect_faces,
                                  min_fraction=self.min_face_fraction)
        return resize_square(image, self.image_size) if self.image_size > 0 else image


def build_augmentation(aug_cfg) -> A.Compose:
    """DeepfakeBench's `data_aug` (abstract_dataset.py) with Effort's probabilities."""
    return A.Compose([
        A.HorizontalFlip(p=aug_cfg.flip_prob),
        A.Rotate(limit=tuple(aug_cfg.rotate_limit), p=aug_cfg.rotate_prob,
                 border_mode=cv2.BORDER_CONSTANT),
        A.GaussianBlur(blur_limit=tuple(aug_cfg.blur_limit), p=aug_cfg.blur_prob),
        A.OneOf([
            A.RandomBrightnessContrast(brightness_limit=tuple(aug_cfg.brightness_limit),
                                       contrast_limit=tuple(aug_cfg.contrast_limit), p=1.0),
            A.FancyPCA(p=1.0),
            A.HueSaturationValue(p=1.0),
        ], p=aug_cfg.brightness_prob),
        A.ImageCompression(quality_range=(int(aug_cfg.quality_lower),
                                          int(aug_cfg.quality_upper)),
                           p=aug_cfg.quality_prob),
    ])


class Augment(grain.transforms.RandomMap):
    """Applies the DeepfakeBench augmentation with grain's per-record generator, so the
    result depends on (seed, position in the stream) only, not on worker count or
    timing, and a resumed run sees the same augmented images."""

    def __init__(self, aug_cfg):
        self._cfg = aug_cfg.to_dict() if hasattr(aug_cfg, 'to_dict') else dict(aug_cfg)
        # One Compose per reader thread: set_random_seed + __call__ on a shared Compose races
        # between grain's read threads, so a record could be augmented with another's seed.
        self._local = threading.local()

    def __getstate__(self):
        return {'_cfg': self._cfg}

    def __setstate__(self, state):
        self._cfg = state['_cfg']
        self._local = threading.local()

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        compose = getattr(self._local, 'compose', None)
        if compose is None:
            import ml_collections
            compose = self._local.compose = build_augmentation(
                ml_collections.ConfigDict(self._cfg))
        # Hand grain's per-record generator to every transform (plus one python Random drawn
        # from it): set_random_seed would build two generators per transform per record,
        # ~0.2 ms of pure host overhead an image.
        compose.set_random_state(rng, random.Random(int(rng.integers(0, 2**63 - 1))))
        element['image'] = compose(image=element['image'])['image']
        return element
