"""The synthetic cross-forgery benchmark: layout, determinism, idempotence, and the
measurable signature of each artifact family."""

from __future__ import annotations

import hashlib
import json
import os

import cv2
import numpy as np
import pytest

from fmsd_jax.data import forgeries as F
from fmsd_jax.data import pipeline
from fmsd_jax.data import synthetic as S
from fmsd_jax.data.config import SYNTHETIC_DATASETS, get_data_config
from fmsd_jax.data.sources import list_records


@pytest.fixture(scope='module')
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp('syn')
    names = S.write_benchmark(out, size='tiny', seed=0)
    return out, names


@pytest.fixture(scope='module')
def photos():
    return [im for _, im in S.load_photos()]


def _digest(root) -> str:
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith('.png') or f.endswith('.json'):
                h.update(f.encode())
                with open(os.path.join(dirpath, f), 'rb') as fh:
                    h.update(fh.read())
    return h.hexdigest()


def test_layout_is_deepfakebench(bench):
    out, names = bench
    assert names == list(SYNTHETIC_DATASETS)
    spec = S.SIZES['tiny']
    for name in names:
        with open(out / 'dataset_json' / f'{name}.json') as f:
            tree = json.load(f)
        assert list(tree) == [name]
        assert sorted(tree[name]) == [f'{name}_fake', f'{name}_real']
        for group, splits in tree[name].items():
            assert sorted(splits) == ['test', 'train', 'val']
            for split, videos in splits.items():
                assert len(videos) == spec.videos[split]
                for info in videos.values():
                    assert info['label'] == group
                    assert len(info['frames']) == spec.frames
                    assert all('\\' in p and '/' not in p for p in info['frames'])
                    assert len(info['masks']) == (spec.frames if group.endswith('fake') else 0)
                    img = cv2.imread(str(out.joinpath(*info['frames'][0].split('\\'))))
                    assert img.shape == (spec.frame_size, spec.frame_size, 3)
    c = get_data_config()
    c.update(S.data_config_overrides(out))
    recs = list_records(c, 'SynUpsample', 'train', frame_num=None)
    assert len(recs) == 2 * spec.videos['train'] * spec.frames
    assert sum(r['label'] for r in recs) == len(recs) // 2


def test_splits_use_disjoint_photos_and_real_frames_listing(bench, photos):
    out, _ = bench
    split = S.split_photos([str(i) for i in range(len(photos))], 0)
    assert not (set(split['train']) & set(split['test']))
    assert not (set(split['train']) & set(split['val']))
    assert sorted(split['train'] + split['val'] + split['test']) == list(range(len(photos)))
    real = S.real_frames(out)
    spec = S.SIZES['tiny']
    assert len(real) == 4 * spec.videos['train'] * spec.frames
    assert all(os.path.isfile(p) and '/real/' in p for p in real)
    assert len(S.real_photos(split='train')) == len(split['train'])


def test_deterministic_idempotent_and_guarded(bench, tmp_path):
    out, _ = bench
    again = tmp_path / 'again'
    S.write_benchmark(again, size='tiny', seed=0, families=('upsample', 'splice'))
    for name in ('SynUpsample', 'SynSplice'):
        assert _digest(again / name) == _digest(out / name)
    other = tmp_path / 'other'
    S.write_benchmark(other, size='tiny', seed=1, families=('upsample',))
    assert _digest(other / 'SynUpsample') != _digest(out / 'SynUpsample')
    marker = again / S.MARKER
    mtime = os.path.getmtime(marker)
    frame = next((again / 'SynSplice').rglob('*.png'))
    frame_mtime = os.path.getmtime(frame)
    assert S.write_benchmark(again, size='tiny', seed=0,
                             families=('upsample', 'splice')) == ['SynUpsample', 'SynSplice']
    assert os.path.getmtime(marker) == mtime and os.path.getmtime(frame) == frame_mtime
    with pytest.raises(FileExistsError, match='other parameters'):
        S.write_benchmark(again, size='tiny', seed=3, families=('upsample', 'splice'))


def test_cli_and_user_photos(tmp_path, photos):
    pdir = tmp_path / 'mine'
    pdir.mkdir()
    for i in range(3):
        cv2.imwrite(str(pdir / f'p{i}.jpg'), cv2.cvtColor(photos[i], cv2.COLOR_RGB2BGR))
    S.main(['--out', str(tmp_path / 'cli'), '--size', 'tiny', '--photos', str(pdir),
            '--families', 'blend'])
    marker = json.loads((tmp_path / 'cli' / S.MARKER).read_text())
    assert marker['photos_dir'] == str(pdir) and marker['families'] == ['blend']
    assert (tmp_path / 'cli' / 'dataset_json' / 'SynBlend.json').is_file()


def test_benchmark_feeds_the_pipeline(bench):
    out, _ = bench
    c = get_data_config()
    c.update(S.data_config_overrides(out))
    c.train_dataset = ('SynBlend', 'SynSplice')
    c.image_size = 32
    loader = pipeline.make_train_loader(c, global_batch_size=8, seed=0)
    assert loader.num_records == 2 * 2 * 4 * 3
    batch = next(iter(loader))
    assert batch['image'].shape == (8, 32, 32, 3) and np.isfinite(batch['image']).all()
    ev = list(pipeline.make_eval_loader(c, 'SynAutoencode', batch_size=8))
    assert sum(int(b['valid'].sum()) for b in ev) == 2 * 2 * 3


# --- artifact signatures -----------------------------------------------------------------

def _frames(photos, n, size, seed):
    rng = np.random.default_rng(seed)
    return [S.video_frames(photos[i % len(photos)], rng, 1, size)[0] for i in range(n)]


def _nyquist_ratio(img: np.ndarray) -> float:
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float64)
    p = np.abs(np.fft.fft2(g - g.mean())) ** 2
    h = g.shape[0] // 2
    return float((p[h, 0] + p[0, h] + p[h, h]) / p.mean())


def test_upsample_leaves_checkerboard_spectral_peaks(photos):
    rng = np.random.default_rng(0)
    real, fake = [], []
    for frame in _frames(photos, 12, 64, 1):
        forged, _ = F.forge_upsample(frame, rng)
        real.append(_nyquist_ratio(F.jpeg(frame, 90)))
        fake.append(_nyquist_ratio(F.jpeg(forged, 90)))
    assert np.median(fake) > 10 * np.median(real)
    # The kernel itself: phase gains 1 and 1.1 (normalised), mean brightness kept.
    up = F.zero_insert_upsample(np.full((8, 8), 100.0, np.float32))
    np.testing.assert_allclose(up[4:12:2, 4:12:2].mean() / up[5:12:2, 5:12:2].mean(),
                               1 / 1.21, rtol=1e-3)
    assert abs(up[2:-2, 2:-2].mean() - 100) < 1.0


def test_blend_changes_only_inside_a_soft_deformed_mask(photos):
    rng = np.random.default_rng(0)
    inside, outside, soft = [], [], []
    for frame in _frames(photos, 10, 64, 2):
        forged, mask = F.forge_blend(frame, rng)
        diff = np.abs(forged.astype(int) - frame).mean(-1)
        m = mask / mask.max()
        inside.append(diff[m > 0.9].mean())
        outside.append(diff[m < 1e-3].mean() if (m < 1e-3).any() else 0.0)
        soft.append(((m > 0.05) & (m < 0.95)).mean())  # the feathered boundary band
    assert max(outside) == 0.0
    assert np.median(inside) > 2.0
    assert min(soft) > 0.03  # a boundary band, not a hard edge
    ratios = F.region_mask(64, np.random.default_rng(3))
    assert 0.0 <= ratios.min() and ratios.max() == pytest.approx(1.0)


def test_autoencode_oversmooths_the_region(photos):
    ae = S._fit_autoencoder(photos[:8], 64, 0)
    rng = np.random.default_rng(0)
    ratios = []
    for frame in _frames(photos, 8, 64, 3):
        forged, mask = F.forge_autoencode(frame, rng, autoencoder=ae)
        lap = [cv2.Laplacian(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float32),
                             cv2.CV_32F) ** 2 for x in (frame, forged)]
        inside = mask > 0.99
        ratios.append(lap[1][inside].mean() / max(lap[0][inside].mean(), 1e-6))
    assert np.median(ratios) < 0.3  # most high-frequency energy is gone
    # ...while the coarse content is kept (it is a reconstruction, not a blur to grey).
    frame = _frames(photos, 1, 64, 4)[0]
    small = lambda x: cv2.resize(x, (8, 8), interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(small(ae.reconstruct(frame)) - small(frame)).mean() < 12


def _ghost_argmin(img, mask, quality):
    """JPEG ghost (Farid 2009): recompressing at the first quality on the first grid
    changes the doubly-compressed region least."""
    errs = np.zeros((8, 8))
    for dy in range(8):
        for dx in range(8):
            re = img.copy()
            re[dy:, dx:] = F.jpeg(np.ascontiguousarray(img[dy:, dx:]), quality)
            errs[dy, dx] = np.abs(re.astype(float) - img).mean(-1)[mask > 0.99].mean()
    return np.unravel_index(np.argmin(errs), errs.shape)


def test_splice_carries_a_misaligned_double_jpeg_grid(photos):
    rng = np.random.default_rng(0)
    frames = _frames(photos, 12, 64, 5)
    donors = _frames(photos[::-1], 12, 64, 6)
    fake_hits = real_hits = 0
    for frame, donor in zip(frames, donors, strict=True):
        forged, mask = F.forge_splice(frame, donor, rng, first_quality=65, grid_offset=(3, 5))
        fake_hits += _ghost_argmin(F.jpeg(forged, 90), mask, 65) == (3, 5)
        real_hits += _ghost_argmin(F.jpeg(frame, 90), mask, 65) == (3, 5)
    assert fake_hits >= 8 and real_hits <= 1
