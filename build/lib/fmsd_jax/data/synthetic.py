"""A synthetic cross-forgery benchmark written in DeepfakeBench's layout.

Real photographs that ship inside scikit-image and matplotlib (or the user's own) are cut
into "videos" (a crop window drifting and zooming slowly over one photo), and the fake
videos of each dataset carry one artifact family (fmsd_jax.data.forgeries).  Train on one
family, test on the others: a real generalisation gap, offline, in minutes.

Every frame, real or fake, ends with one JPEG round trip at a per-video quality (the
"c23" of this benchmark), so compression alone never tells real from fake.

Layout under `out_dir` (dataset_root = out_dir, dataset_json_folder = out_dir/dataset_json):
  dataset_json/<Dataset>.json
  <Dataset>/<real|fake>/frames/<split>_<nnnn>/<iii>.png
  <Dataset>/fake/masks/<split>_<nnnn>/<iii>.png
with JSON frame paths relative to out_dir and Windows separators, as DeepfakeBench's
rearrange.py writes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from collections.abc import Sequence

import cv2
import numpy as np

from fmsd_jax import atomic
from fmsd_jax.data import forgeries as F
from fmsd_jax.data.config import SYNTHETIC_DATASETS

FORMAT_VERSION = 1
MARKER = '.fmsd_synthetic.json'
SPLITS = ('train', 'val', 'test')
FAMILY_DATASET = dict(zip(F.FAMILIES, SYNTHETIC_DATASETS, strict=True))

# Natural photographs bundled with scikit-image (skimage/data) and matplotlib
# (mpl-data/sample_data); the synthetic or microscopy images are left out.
_SKIMAGE_PHOTOS = ('astronaut.png', 'brick.png', 'camera.png', 'chelsea.png', 'coffee.png',
                   'coins.png', 'grass.png', 'gravel.png', 'hubble_deep_field.jpg',
                   'ihc.png', 'moon.png', 'motorcycle_left.png', 'motorcycle_right.png',
                   'retina.jpg', 'rocket.jpg', 'text.png', 'clock_motion.png')
_MPL_PHOTOS = ('grace_hopper.jpg', 'Minduka_Present_Blue_Pack.png')


@dataclasses.dataclass(frozen=True)
class SizeSpec:
    frame_size: int  # side of the stored PNG frames
    frames: int  # frames per video
    videos: dict  # split -> videos per label group (real and fake each)


SIZES: dict[str, SizeSpec] = {
    # Unit tests: 4 datasets x 2 groups x (4+2+2) videos x 3 frames, 32 px; ~1 s.
    'tiny': SizeSpec(32, 3, {'train': 4, 'val': 2, 'test': 2}),
    # Demo on 2 CPU cores: 192 training frames per family at 64 px. Validation (128 videos)
    # is large because the demo's backbone contribution is a difference of two validation
    # AUCs: its 95 % interval spanned ±0.45 on 8 videos, ±0.22 on 32 and ±0.11 on 128.
    'small': SizeSpec(64, 8, {'train': 12, 'val': 64, 'test': 8}),
    # The 'small' train/test layout at DeepfakeBench's stored 256 px: input-pipeline
    # benchmarks at 224 (they read no validation split).
    'small-256': SizeSpec(256, 8, {'train': 12, 'val': 4, 'test': 8}),
    'medium': SizeSpec(128, 8, {'train': 100, 'val': 20, 'test': 50}),
    # Thousands of videos: 4 x 2 x 1250 videos x 32 frames at DeepfakeBench's 256 px.
    'large': SizeSpec(256, 32, {'train': 1000, 'val': 100, 'test': 150}),
}


def _photo_dirs() -> list[tuple[str, tuple[str, ...]]]:
    import matplotlib
    import skimage
    return [(os.path.join(os.path.dirname(skimage.__file__), 'data'), _SKIMAGE_PHOTOS),
            (os.path.join(matplotlib.get_data_path(), 'sample_data'), _MPL_PHOTOS)]


def _read_photo(path: str) -> np.ndarray | None:
    from fmsd_jax.data.transforms import read_rgb
    image = read_rgb(path)
    if image is None or min(image.shape[:2]) < 64:
        return None
    return image


def load_photos(photos_dir: str | None = None) -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8) of the real photographs: the bundled ones, or every image in
    `photos_dir` (sorted by name; images under 64 px are ignored)."""
    if photos_dir:
        names = sorted(f for f in os.listdir(photos_dir)
                       if os.path.splitext(f)[1].lower() in ('.png', '.jpg', '.jpeg', '.bmp',
                                                             '.webp', '.tif', '.tiff'))
        found = [(n, _read_photo(os.path.join(photos_dir, n))) for n in names]
    else:
        found = [(n, _read_photo(os.path.join(d, n)))
                 for d, files in _photo_dirs() for n in files
                 if os.path.isfile(os.path.join(d, n))]
    photos = [(n, im) for n, im in found if im is not None]
    if len(photos) < 3:
        raise ValueError(f'need at least 3 readable photographs (one per split), found '
                         f'{len(photos)} in {photos_dir or "the bundled sample images"}.')
    return photos


def split_photos(names: Sequence[str], seed: int) -> dict[str, list[int]]:
    """Disjoint photos per split (60/20/20, at least one each), so a test video never
    shows a scene seen in training."""
    order = np.random.default_rng(np.random.SeedSequence([seed, 7])).permutation(len(names))
    n = len(names)
    n_val = max(1, round(0.2 * n))
    n_test = max(1, round(0.2 * n))
    n_train = n - n_val - n_test
    return {'train': sorted(order[:n_train].tolist()),
            'val': sorted(order[n_train:n_train + n_val].tolist()),
            'test': sorted(order[n_train + n_val:].tolist())}


def video_frames(photo: np.ndarray, rng: np.random.Generator, frames: int,
                 size: int) -> list[np.ndarray]:
    """A slow pan and zoom over one photograph: consecutive frames overlap heavily, like a
    face track, and differ by resampling phase, like real video frames."""
    h, w = photo.shape[:2]
    short = min(h, w)
    side0 = rng.uniform(0.35, 0.8) * short
    zoom = rng.uniform(0.9, 1.1)
    cx0 = rng.uniform(side0 / 2, w - side0 / 2)
    cy0 = rng.uniform(side0 / 2, h - side0 / 2)
    drift = rng.normal(0.0, 0.08 * side0, 2)
    out = []
    for t in np.linspace(0.0, 1.0, frames):
        side = min(side0 * (1 + (zoom - 1) * t), short)
        cx = float(np.clip(cx0 + drift[0] * t, side / 2, w - side / 2))
        cy = float(np.clip(cy0 + drift[1] * t, side / 2, h - side / 2))
        m = np.array([[size / side, 0, size / 2 - cx * size / side],
                      [0, size / side, size / 2 - cy * size / side]], np.float32)
        out.append(cv2.warpAffine(photo, m, (size, size), flags=cv2.INTER_AREA,
                                  borderMode=cv2.BORDER_REFLECT_101))
    return out


def _fit_autoencoder(photos: list[np.ndarray], size: int, seed: int) -> F.PatchAutoencoder:
    # Train at the scale the frames are seen at (a crop of ~0.55 of the short side).
    scaled = []
    for im in photos:
        f = size / (0.55 * min(im.shape[:2]))
        scaled.append(cv2.resize(im, (max(int(im.shape[1] * f), 16),
                                      max(int(im.shape[0] * f), 16)),
                                 interpolation=cv2.INTER_AREA))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    return F.PatchAutoencoder(patch=8, components=12).fit(scaled, rng)


def _rel(*parts: str) -> str:
    return '\\'.join(parts)  # DeepfakeBench's JSONs carry Windows separators


def _write_png(path: str, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    # bytes: OpenCV segfaults on a str name that is not valid UTF-8 (see fmsd_jax.pathnames)
    if not cv2.imwrite(os.fsencode(path), image, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f'could not write {path}')


def _forge_video(family: str, frames: list[np.ndarray], rng: np.random.Generator, *,
                 donor_frames: list[np.ndarray] | None,
                 autoencoder: F.PatchAutoencoder | None
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    region = F.region_params(rng)
    q1 = int(rng.integers(50, 80))
    offset = tuple(int(v) for v in rng.integers(1, 8, 2))
    out, masks = [], []
    for i, frame in enumerate(frames):
        if family == 'blend':
            fake, mask = F.forge_blend(frame, rng, region=region)
        elif family == 'upsample':
            fake, mask = F.forge_upsample(frame, rng, region=region)
        elif family == 'autoencode':
            fake, mask = F.forge_autoencode(frame, rng, autoencoder=autoencoder, region=region)
        elif family == 'splice':
            fake, mask = F.forge_splice(frame, donor_frames[i], rng, region=region,
                                        first_quality=q1, grid_offset=offset)
        else:
            raise ValueError(f'unknown forgery family {family!r}; expected {F.FAMILIES}')
        out.append(fake)
        masks.append(mask)
    return out, masks


def _write_dataset(out_dir: str, family: str, photos: list[np.ndarray],
                   photo_split: dict[str, list[int]], spec: SizeSpec, seed: int,
                   autoencoder: F.PatchAutoencoder | None) -> str:
    name = FAMILY_DATASET[family]
    fam = F.FAMILIES.index(family)
    tree: dict = {f'{name}_real': {}, f'{name}_fake': {}}
    for s, split in enumerate(SPLITS):
        pool = photo_split[split]
        for label, group in enumerate(('real', 'fake')):
            videos: dict = {}
            for v in range(spec.videos[split]):
                rng = np.random.default_rng(np.random.SeedSequence([seed, fam, s, label, v]))
                photo_i = pool[int(rng.integers(len(pool)))]
                frames = video_frames(photos[photo_i], rng, spec.frames, spec.frame_size)
                masks: list[np.ndarray] = []
                if group == 'fake':
                    donors = None
                    if family == 'splice':
                        others = [p for p in pool if p != photo_i] or pool
                        donors = video_frames(photos[others[int(rng.integers(len(others)))]],
                                              rng, spec.frames, spec.frame_size)
                    frames, masks = _forge_video(family, frames, rng, donor_frames=donors,
                                                 autoencoder=autoencoder)
                quality = int(rng.integers(80, 96))  # this benchmark's "c23"
                vid = f'{split}_{v:04d}'
                rel_frames, rel_masks = [], []
                for i, frame in enumerate(frames):
                    rel = _rel(name, group, 'frames', vid, f'{i:03d}.png')
                    _write_png(os.path.join(out_dir, *rel.split('\\')),
                               F.jpeg(frame, quality))
                    rel_frames.append(rel)
                for i, mask in enumerate(masks):
                    rel = _rel(name, group, 'masks', vid, f'{i:03d}.png')
                    _write_png(os.path.join(out_dir, *rel.split('\\')),
                               np.clip(np.rint(mask * 255), 0, 255).astype(np.uint8))
                    rel_masks.append(rel)
                videos[vid] = {'label': f'{name}_{group}', 'frames': rel_frames,
                               'masks': rel_masks}
            tree[f'{name}_{group}'][split] = videos
    json_dir = os.path.join(out_dir, 'dataset_json')
    os.makedirs(json_dir, exist_ok=True)
    atomic.write_json(os.path.join(json_dir, f'{name}.json'), {name: tree}, sort_keys=False)
    return name


def write_benchmark(out_dir: str | os.PathLike, *, size: str = 'small', seed: int = 0,
                    photos_dir: str | None = None,
                    families: Sequence[str] = F.FAMILIES, overwrite: bool = False,
                    ) -> list[str]:
    """Writes (or finds already written) the benchmark and returns its dataset names, in
    the order of `families` ('blend' -> SynBlend, 'upsample' -> SynUpsample,
    'autoencode' -> SynAutoencode, 'splice' -> SynSplice).

    A marker holding the parameters is written last, so an interrupted write is redone,
    a finished one is skipped, and a request with different parameters for the same
    directory is refused (or redone with overwrite=True) instead of mixing two versions.
    """
    if size not in SIZES:
        raise ValueError(f'size={size!r}; expected one of {sorted(SIZES)}')
    unknown = [f for f in families if f not in F.FAMILIES]
    if unknown:
        raise ValueError(f'unknown forgery families {unknown}; expected {F.FAMILIES}')
    out_dir = os.fspath(out_dir)
    spec = SIZES[size]
    params = {'version': FORMAT_VERSION, 'size': size, 'seed': int(seed),
              'photos_dir': os.path.abspath(photos_dir) if photos_dir else None,
              'families': list(families), 'spec': dataclasses.asdict(spec)}
    names = [FAMILY_DATASET[f] for f in families]
    marker = os.path.join(out_dir, MARKER)
    if os.path.isfile(marker):
        with open(marker, encoding='utf-8') as f:
            found = json.load(f)
        if found == params:
            return names
        if not overwrite:
            raise FileExistsError(f'{out_dir} holds a synthetic benchmark with other '
                                  f'parameters ({found}); choose another directory or pass '
                                  'overwrite=True (--overwrite).')
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(marker):
        os.remove(marker)
    for name in SYNTHETIC_DATASETS:  # drop leftovers of an interrupted or older write
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
        stale = os.path.join(out_dir, 'dataset_json', f'{name}.json')
        if os.path.exists(stale):
            os.remove(stale)
    named = load_photos(photos_dir)
    photos = [im for _, im in named]
    photo_split = split_photos([n for n, _ in named], seed)
    autoencoder = None
    if 'autoencode' in families:
        autoencoder = _fit_autoencoder([photos[i] for i in photo_split['train']],
                                       spec.frame_size, seed)
    for family in families:
        _write_dataset(out_dir, family, photos, photo_split, spec, seed, autoencoder)
    atomic.write_json(marker, params, sort_keys=False)
    return names


def real_frames(out_dir: str | os.PathLike, *, datasets: Sequence[str] | None = None,
                split: str = 'train') -> list[str]:
    """Paths of the real frames of `split` (default: all synthetic datasets), e.g. for
    self-supervised pretraining of a small backbone on real images only."""
    out_dir = os.fspath(out_dir)
    json_dir = os.path.join(out_dir, 'dataset_json')
    datasets = datasets or [n for n in SYNTHETIC_DATASETS
                            if os.path.isfile(os.path.join(json_dir, f'{n}.json'))]
    paths: list[str] = []
    for name in datasets:
        with open(os.path.join(json_dir, f'{name}.json'), encoding='utf-8') as f:
            tree = json.load(f)[name]
        for group, splits in sorted(tree.items()):
            if not group.endswith('_real'):
                continue
            for vid in sorted(splits.get(split, {})):
                paths.extend(os.path.join(out_dir, *p.split('\\'))
                             for p in splits[split][vid]['frames'])
    return paths


def real_photos(photos_dir: str | None = None, *, split: str = 'train',
                seed: int = 0) -> list[np.ndarray]:
    """The real photographs assigned to `split` (the same assignment write_benchmark makes
    for this seed), full resolution."""
    named = load_photos(photos_dir)
    return [named[i][1] for i in split_photos([n for n, _ in named], seed)[split]]


def data_config_overrides(out_dir: str | os.PathLike) -> dict:
    """The config.data fields that point the DeepfakeBench source at a written benchmark."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    return {'source': 'deepfakebench', 'dataset_root': out_dir,
            'dataset_json_folder': os.path.join(out_dir, 'dataset_json')}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog='python -m fmsd_jax.data.synthetic',
        description='Write the synthetic cross-forgery benchmark in DeepfakeBench layout.')
    parser.add_argument('--out', required=True, help='output directory (dataset_root)')
    parser.add_argument('--size', default='small', choices=sorted(SIZES))
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--photos', default=None,
                        help='folder of your own photographs instead of the bundled ones')
    parser.add_argument('--families', default=','.join(F.FAMILIES),
                        help=f'comma-separated subset of {",".join(F.FAMILIES)}')
    parser.add_argument('--overwrite', action='store_true')
    args = parser.parse_args(argv)
    names = write_benchmark(args.out, size=args.size, seed=args.seed, photos_dir=args.photos,
                            families=[f for f in args.families.split(',') if f],
                            overwrite=args.overwrite)
    spec = SIZES[args.size]
    per_split = {s: 2 * v * spec.frames for s, v in spec.videos.items()}
    print(f'wrote {names} to {os.path.abspath(args.out)} ({spec.frame_size}px; frames per '
          f'dataset {per_split})')
    print(f'  --config.data.dataset_root={os.path.abspath(args.out)} '
          f'--config.data.dataset_json_folder='
          f'{os.path.join(os.path.abspath(args.out), "dataset_json")}')


if __name__ == '__main__':
    main()
