"""Four families of forgery artifacts, each reproducing the trace its real-world source
leaves, applied to a region of an RGB uint8 frame.

Each `forge_*` function returns (forged frame, soft mask in [0, 1]) and takes an explicit
numpy Generator so a benchmark is a pure function of its seed.  The region plays the part
of the swapped face: an ellipse around the centre of the crop (face crops are centred),
elastically deformed and feathered.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

FAMILIES = ('blend', 'upsample', 'autoencode', 'splice')


def _seeded(compose: A.BaseCompose, rng: np.random.Generator) -> A.BaseCompose:
    compose.set_random_seed(int(rng.integers(0, 2**31 - 1)))
    return compose


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """One JPEG round trip (libjpeg through OpenCV, 4:2:0 chroma as cameras and codecs)."""
    ok, buf = cv2.imencode('.jpg', cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError('JPEG encoding failed')
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def region_mask(size: int, rng: np.random.Generator, *, params: dict | None = None,
                feather: float = 0.08, deform: bool = True) -> np.ndarray:
    """Soft float32 mask (size, size): an ellipse (the 'face'), deformed by an elastic
    field as SBI deforms its landmark hull, then Gaussian-blurred so the forged region
    fades into the frame over `feather * size` pixels, as face-swap pipelines blend."""
    p = params or region_params(rng)
    mask = np.zeros((size, size), np.float32)
    centre = (int(round(size * p['cx'])), int(round(size * p['cy'])))
    axes = (max(int(round(size * p['ax'])), 2), max(int(round(size * p['ay'])), 2))
    cv2.ellipse(mask, centre, axes, float(p['angle']), 0, 360, 1.0, -1)
    if deform:
        elastic = A.Compose([A.ElasticTransform(alpha=size * 0.6, sigma=size * 0.08,
                                                border_mode=cv2.BORDER_CONSTANT, p=1.0)])
        mask = _seeded(elastic, rng)(image=mask)['image']
    sigma = max(feather * size, 0.5)
    k = int(2 * round(3 * sigma) + 1)
    mask = cv2.GaussianBlur(mask, (k, k), sigma)
    return np.clip(mask / max(float(mask.max()), 1e-6), 0.0, 1.0).astype(np.float32)


def region_params(rng: np.random.Generator) -> dict:
    """Per-video region geometry, so the 'face' stays put across a video's frames."""
    return {'cx': rng.uniform(0.42, 0.58), 'cy': rng.uniform(0.42, 0.58),
            'ax': rng.uniform(0.22, 0.32), 'ay': rng.uniform(0.26, 0.36),
            'angle': rng.uniform(-20, 20)}


def composite(forged: np.ndarray, frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    out = m * forged.astype(np.float32) + (1.0 - m) * frame.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --- blend: self-blended images (Shiohara & Yamasaki, CVPR 2022) -----------------------

def _sbi_source_transform() -> A.Compose:
    # SBI's source-side perturbations (sbi.py: get_source_transforms + randaffine):
    # colour (RGB shift, HSV, brightness/contrast), frequency (down-up sampling or
    # sharpening) and a small geometric jitter.
    return A.Compose([
        A.Compose([
            A.RGBShift((-20, 20), (-20, 20), (-20, 20), p=0.3),
            A.HueSaturationValue(hue_shift_limit=(-10, 10), sat_shift_limit=(-30, 30),
                                 val_shift_limit=(-20, 20), p=0.3),
            A.RandomBrightnessContrast(brightness_limit=(-0.1, 0.1),
                                       contrast_limit=(-0.1, 0.1), p=1.0),
        ], p=1.0),
        A.OneOf([
            A.Downscale(scale_range=(0.25, 0.5),
                        interpolation_pair={'downscale': cv2.INTER_LINEAR,
                                            'upscale': cv2.INTER_LINEAR}, p=1.0),
            A.Sharpen(alpha=(0.2, 0.5), lightness=(0.5, 1.0), p=1.0),
        ], p=1.0),
        A.Affine(translate_percent={'x': (-0.03, 0.03), 'y': (-0.015, 0.015)},
                 scale=(0.95, 1 / 0.95), border_mode=cv2.BORDER_REFLECT_101, p=1.0),
    ])


def forge_blend(frame: np.ndarray, rng: np.random.Generator, *,
                region: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A perturbed copy of the frame blended back into it through a deformed, blurred mask
    with SBI's blend ratios: the only evidence is the blending boundary and the
    source/target colour and frequency mismatch, which is what face swaps share."""
    size = frame.shape[0]
    source = _seeded(_sbi_source_transform(), rng)(image=frame)['image']
    mask = region_mask(size, rng, params=region, feather=rng.uniform(0.03, 0.1))
    ratio = float(rng.choice([0.25, 0.5, 0.75, 1.0, 1.0, 1.0]))
    return composite(source, frame, mask * ratio), mask * ratio


# --- upsample: GAN transposed-convolution checkerboard (Odena et al. 2016) --------------

# One axis of a stride-2 transposed convolution with a 3-tap kernel: output samples that
# sit on an input sample get weight 1, those between two get 2 * 0.55 = 1.1.  The uneven
# overlap is the checkerboard every zero-insertion upsampler with such a kernel prints,
# and it shows as spectral peaks at half the sampling rate (Zhang et al. 2019, AutoGAN).
UPSAMPLE_KERNEL_1D = np.array([0.55, 1.0, 0.55], np.float32)


def zero_insert_upsample(image: np.ndarray, kernel_1d: np.ndarray = UPSAMPLE_KERNEL_1D
                         ) -> np.ndarray:
    """2x upsampling by zero insertion and a fixed separable kernel, gain-normalised so
    the mean brightness is kept and only the periodic pattern remains."""
    h, w = image.shape[:2]
    z = np.zeros((2 * h, 2 * w) + image.shape[2:], np.float32)
    z[::2, ::2] = image.astype(np.float32)
    k = kernel_1d.astype(np.float32)
    gain = (k[1] + 2 * k[0]) / 2.0  # mean of the two phase gains
    out = cv2.sepFilter2D(z, cv2.CV_32F, k / gain, k / gain, borderType=cv2.BORDER_REFLECT)
    return out


def forge_upsample(frame: np.ndarray, rng: np.random.Generator, *,
                   region: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The region regenerated at half resolution and brought back by a GAN-style
    zero-insertion upsampler: a generated face pasted into a real frame."""
    size = frame.shape[0]
    low = cv2.resize(frame, (size // 2, size // 2), interpolation=cv2.INTER_AREA)
    up = zero_insert_upsample(low)
    if up.shape[0] != size:
        up = cv2.resize(up, (size, size), interpolation=cv2.INTER_NEAREST)
    up = np.clip(np.rint(up), 0, 255).astype(np.uint8)
    mask = region_mask(size, rng, params=region, feather=rng.uniform(0.02, 0.05))
    return composite(up, frame, mask), mask


# --- autoencode: bottleneck reconstruction (DeepFakes/FaceSwap autoencoders) ------------

class PatchAutoencoder:
    """A linear autoencoder on overlapping patches, trained on real photographs: the
    optimum of a linear encoder/decoder with a k-dimensional code is the top-k PCA
    subspace, so fitting it by SVD is training it exactly.  Reconstructions keep the
    coarse content and lose the detail the code cannot hold, the over-smoothed skin of
    autoencoder face swaps."""

    def __init__(self, patch: int = 8, components: int = 10):
        self.patch = int(patch)
        self.components = int(components)
        self.mean: np.ndarray | None = None
        self.basis: np.ndarray | None = None  # (components, patch*patch*3)

    def fit(self, images: list[np.ndarray], rng: np.random.Generator,
            samples: int = 20000) -> PatchAutoencoder:
        p = self.patch
        per = max(samples // max(len(images), 1), 1)
        rows = []
        for im in images:
            h, w = im.shape[:2]
            ys = rng.integers(0, h - p + 1, per)
            xs = rng.integers(0, w - p + 1, per)
            windows = np.lib.stride_tricks.sliding_window_view(im, (p, p), axis=(0, 1))
            rows.append(windows[ys, xs].transpose(0, 2, 3, 1).reshape(per, -1))
        x = np.concatenate(rows).astype(np.float32) / 255.0
        self.mean = x.mean(0)
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.basis = vt[: self.components].astype(np.float32)
        return self

    def reconstruct(self, image: np.ndarray) -> np.ndarray:
        """Encode/decode every patch at stride patch/2 and average the overlaps."""
        if self.basis is None:
            raise RuntimeError('PatchAutoencoder.reconstruct before fit')
        p, s = self.patch, max(self.patch // 2, 1)
        pad = p
        im = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
        im = im.astype(np.float32) / 255.0
        windows = np.lib.stride_tricks.sliding_window_view(im, (p, p), axis=(0, 1))[::s, ::s]
        gy, gx = windows.shape[:2]
        # sliding_window_view puts the window axes last: (gy, gx, C, p, p) -> (gy, gx, p, p, C)
        flat = windows.transpose(0, 1, 3, 4, 2).reshape(gy * gx, -1)
        code = (flat - self.mean) @ self.basis.T
        rec = (code @ self.basis + self.mean).reshape(gy, gx, p, p, -1)
        acc = np.zeros_like(im)
        cnt = np.zeros(im.shape[:2] + (1,), np.float32)
        for dy in range(p):
            for dx in range(p):
                acc[dy:dy + s * gy:s, dx:dx + s * gx:s] += rec[:, :, dy, dx]
                cnt[dy:dy + s * gy:s, dx:dx + s * gx:s] += 1.0
        out = acc / np.maximum(cnt, 1.0)
        out = out[pad:pad + image.shape[0], pad:pad + image.shape[1]]
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def forge_autoencode(frame: np.ndarray, rng: np.random.Generator, *,
                     autoencoder: PatchAutoencoder,
                     region: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The region replaced by its bottleneck reconstruction."""
    size = frame.shape[0]
    mask = region_mask(size, rng, params=region, feather=rng.uniform(0.02, 0.06))
    return composite(autoencoder.reconstruct(frame), frame, mask), mask


# --- splice: another photo's region with misaligned double JPEG --------------------------

def forge_splice(frame: np.ndarray, donor: np.ndarray, rng: np.random.Generator, *,
                 region: dict | None = None, first_quality: int | None = None,
                 grid_offset: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A region cut from a different, already JPEG-compressed photo, whose 8x8 block grid
    does not line up with the frame's: once the frame is saved as JPEG the region carries
    a second, shifted grid (misaligned double compression, Bianchi & Piva 2012)."""
    size = frame.shape[0]
    q1 = int(first_quality if first_quality is not None else rng.integers(50, 80))
    dy, dx = grid_offset if grid_offset is not None else tuple(int(v) for v in
                                                               rng.integers(1, 8, 2))
    compressed = donor.copy()
    compressed[dy:, dx:] = jpeg(np.ascontiguousarray(donor[dy:, dx:]), q1)
    mask = region_mask(size, rng, params=region, feather=rng.uniform(0.01, 0.03))
    return composite(compressed, frame, mask), mask
