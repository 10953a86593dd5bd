"""grain train/eval pipelines: determinism, epochs, resume, shards, unreadable files,
padding, augmentation."""

from __future__ import annotations

import json
import os

import chex
import cv2
import jax
import ml_collections
import numpy as np
import pytest

from fmsd_jax.data import pipeline
from fmsd_jax.data import transforms as tr
from fmsd_jax.data.config import get_data_config

N_VIDEOS, N_FRAMES, SIZE = 6, 4, 16  # 2 groups x 6 videos x 4 frames = 48 records


def _value(k: int) -> int:
    return 5 * k + 3  # distinct grey level per record


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """A DeepfakeBench dataset 'Toy' whose every frame is a constant image identifying it."""
    root = tmp_path_factory.mktemp('toy')
    tree: dict = {'Toy_real': {}, 'Toy_fake': {}}
    k = 0
    for split in ('train', 'val', 'test'):
        for group in ('Toy_real', 'Toy_fake'):
            videos = {}
            for v in range(N_VIDEOS):
                frames = []
                for f in range(N_FRAMES):
                    rel = f'Toy\\{group}\\{split}_{v}\\{f}.png'
                    path = os.path.join(root, *rel.split('\\'))
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    cv2.imwrite(path, np.full((SIZE + 4, SIZE + 4, 3),
                                              _value(k % 48), np.uint8))
                    frames.append(rel)
                    k += 1
                videos[f'{split}_{v}'] = {'label': group, 'frames': frames, 'masks': []}
            tree[group][split] = videos
    os.makedirs(root / 'json')
    (root / 'json' / 'Toy.json').write_text(json.dumps({'Toy': tree}))
    return root


def _cfg(root, **kw) -> ml_collections.ConfigDict:
    c = get_data_config()
    c.dataset_root = str(root)
    c.dataset_json_folder = str(root / 'json')
    c.train_dataset = ('Toy',)
    c.label_dict['Toy_real'] = 0
    c.label_dict['Toy_fake'] = 1
    c.image_size = SIZE
    c.frame_num.train = c.frame_num.test = N_FRAMES
    c.read_threads = 0
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _ids(images: np.ndarray) -> np.ndarray:
    """Record id from a constant grey image (channel 0)."""
    return np.rint((images[:, 0, 0, 0].astype(float) - 3) / 5).astype(int)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_train_batches_are_uint8_static_and_cover_each_epoch(toy):
    c = _cfg(toy)
    c.augment.enabled = False
    loader = pipeline.make_train_loader(c, global_batch_size=8, seed=3)
    assert (loader.num_records, loader.num_videos, loader.steps_per_epoch) == (48, 12, 6)
    with iter(loader) as it:
        batches = _take(it, 12)
    b = batches[0]
    chex.assert_shape(b['image'], (8, SIZE, SIZE, 3))
    chex.assert_type(b['image'], np.uint8)  # normalised on the device by the detector
    chex.assert_type(b['label'], np.int32)
    np.testing.assert_array_equal(b['image'][0, 0, 0], [_value(_ids(b['image'])[0])] * 3)
    epoch1 = np.concatenate([_ids(x['image']) for x in batches[:6]])
    epoch2 = np.concatenate([_ids(x['image']) for x in batches[6:]])
    assert sorted(epoch1) == list(range(48)) and sorted(epoch2) == list(range(48))
    assert not np.array_equal(epoch1, epoch2)  # reshuffled per epoch
    labels = np.concatenate([x['label'] for x in batches[:6]])
    np.testing.assert_array_equal(labels, (epoch1 % 48) // (N_VIDEOS * N_FRAMES) % 2)


def test_same_seed_same_batches_other_seed_differs(toy):
    c = _cfg(toy)  # augmentation on: its randomness must be seeded too
    a = _take(iter(pipeline.make_train_loader(c, global_batch_size=8, seed=1)), 3)
    b = _take(iter(pipeline.make_train_loader(c, global_batch_size=8, seed=1)), 3)
    d = _take(iter(pipeline.make_train_loader(c, global_batch_size=8, seed=2)), 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x['image'], y['image'])
    assert not np.array_equal(a[0]['image'], d[0]['image'])


@pytest.mark.parametrize('workers', [0, 2])
def test_resumed_iterator_continues_with_the_same_batches(toy, workers, tmp_path):
    c = _cfg(toy, workers=workers)
    loader = pipeline.make_train_loader(c, global_batch_size=8, seed=5)
    with iter(loader) as it:
        _take(it, 7)  # past an epoch boundary
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        expected = _take(it, 4)
        if workers:  # worker start-up costs seconds: rewind the same iterator
            it.set_state(state)
            resumed = _take(it, 4)
    if not workers:  # through grain's orbax checkpoint handler, as the trainer saves it
        import grain
        from etils import epath
        with iter(loader) as it:
            _take(it, 7)
            grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
        with iter(loader) as it2:
            grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), item=it2)
            resumed = _take(it2, 4)
    for x, y in zip(expected, resumed, strict=True):
        np.testing.assert_array_equal(x['image'], y['image'])
        np.testing.assert_array_equal(x['label'], y['label'])


def test_resume_under_another_worker_count_is_refused_by_name(toy):
    c = _cfg(toy, workers=0)
    with iter(pipeline.make_train_loader(c, global_batch_size=8, seed=5)) as it:
        _take(it, 2)
        state = json.loads(json.dumps(it.get_state()))
    assert state['workers'] == 0
    state['workers'] = 3  # as written by a run on a machine where -1 resolved to 3
    with iter(pipeline.make_train_loader(c, global_batch_size=8, seed=5)) as it:
        with pytest.raises(ValueError, match='data.workers=3'):
            it.set_state(state)


def test_auto_workers_none_on_cpu_backend_and_two_cores_each_on_accelerators():
    assert pipeline.auto_workers(16, accelerator=True) == 7  # an H100/H200 host
    assert pipeline.auto_workers(2, accelerator=True) == 1
    assert pipeline.auto_workers(64, accelerator=False) == 0
    assert pipeline.resolve_workers(3) == 3
    if jax.default_backend() == 'cpu':
        assert pipeline.resolve_workers(-1) == 0
    with pytest.raises(ValueError, match='data.workers=-2'):
        pipeline.resolve_workers(-2)


def test_shards_are_disjoint_and_cover_the_data(toy):
    c = _cfg(toy)
    c.augment.enabled = False
    seen = []
    for shard in (0, 1):
        loader = pipeline.make_train_loader(c, global_batch_size=8, seed=0, shard_index=shard,
                                            shard_count=2)
        batches = _take(iter(loader), 6)  # one epoch of this shard: 24 records, batch 4
        assert batches[0]['image'].shape[0] == 4
        seen.append(set(np.concatenate([_ids(b['image']) for b in batches]).tolist()))
    assert not (seen[0] & seen[1]) and seen[0] | seen[1] == set(range(48))


def test_unreadable_images_are_skipped_counted_and_stop_the_run(toy, tmp_path):
    import shutil
    root = tmp_path / 'copy'
    shutil.copytree(toy, root)
    bad = root / 'Toy' / 'Toy_fake' / 'train_2' / '1.png'
    bad.write_bytes(b'not a png')
    c = _cfg(root, max_unreadable_fraction=0.1)
    with iter(pipeline.make_train_loader(c, global_batch_size=8, seed=0)) as it:
        batches = _take(it, 18)  # 3 epochs
        stats = it.stats()
    assert all(b['image'].shape[0] == 8 for b in batches)
    assert stats['unreadable'] == 3 and stats['read'] == 144
    assert stats['bad_paths'] == [str(bad)]
    c.max_unreadable_fraction = 0.01
    with pytest.raises(pipeline.UnreadableDataError, match='max_unreadable_fraction'):
        _take(iter(pipeline.make_train_loader(c, global_batch_size=8, seed=0)), 30)
    for p in (root / 'Toy').rglob('*.png'):
        p.write_bytes(b'')
    with pytest.raises(pipeline.UnreadableDataError, match='consecutive'):
        next(iter(pipeline.make_train_loader(c, global_batch_size=8, seed=0)))


def test_eval_loader_pads_with_invalid_and_carries_metadata(toy):
    c = _cfg(toy)
    loader = pipeline.make_eval_loader(c, 'Toy', split='test', batch_size=10)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    assert [int(b['valid'].sum()) for b in batches] == [10, 10, 10, 10, 8]
    for b in batches:
        chex.assert_shape(b['image'], (10, SIZE, SIZE, 3))
        assert b['video_id'].dtype.kind == 'U' and b['path'].dtype.kind == 'U'
    valid_paths = np.concatenate([b['path'][b['valid']] for b in batches])
    assert len(set(valid_paths.tolist())) == 48
    last = batches[-1]
    assert last['video_id'][0].startswith('Toy_') and last['video_id'][-1] == ''
    assert set(last['dataset'][last['valid']].tolist()) == {'Toy'}
    # Two shards: same number of batches each, every frame exactly once.
    shards = [list(pipeline.make_eval_loader(c, 'Toy', split='val', batch_size=20,
                                             shard_index=s, shard_count=2)) for s in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 3
    paths = np.concatenate([b['path'][b['valid']] for s in shards for b in s])
    assert len(paths) == len(set(paths.tolist())) == 48
    assert all('val_' in p for p in paths)
    assert pipeline.has_split(c, 'Toy', 'val') and not pipeline.has_split(c, 'Toy', 'dev')
    assert pipeline.num_records(loader) == 48


def _augment_fraction(aug_kw: dict, test, n: int = 400) -> float:
    cfg = get_data_config().augment
    for k in ('flip_prob', 'rotate_prob', 'blur_prob', 'brightness_prob', 'quality_prob'):
        cfg[k] = 0.0
    cfg.update(aug_kw)
    aug = tr.Augment(cfg)
    image = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    image = cv2.GaussianBlur(image, (5, 5), 1.0)
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(n):
        out = aug.random_map({'image': image.copy()}, rng)['image']
        hits += bool(test(image, out))
    return hits / n


def test_augmentation_probabilities_and_ranges():
    flip = _augment_fraction({'flip_prob': 0.5},
                             lambda a, b: np.array_equal(b, a[:, ::-1]))
    assert 0.43 < flip < 0.57
    jpeg = _augment_fraction({'quality_prob': 0.5}, lambda a, b: not np.array_equal(a, b))
    assert 0.43 < jpeg < 0.57
    # Rotation within +-10 degrees: a rotated image loses its corner to the black border
    # but keeps its centre pixel's neighbourhood.
    rot = _augment_fraction({'rotate_prob': 1.0},
                            lambda a, b: not np.array_equal(a, b) and
                            np.abs(b[10:14, 10:14].astype(int) - a[10:14, 10:14]).mean() < 40)
    assert rot > 0.95
    colour = _augment_fraction({'brightness_prob': 0.5},
                               lambda a, b: not np.array_equal(a, b))
    # p = 0.5 for the colour group, but FancyPCA's and a small brightness/contrast draw's
    # effect can round away on uint8, so somewhat fewer images change.
    assert 0.3 < colour < 0.55
    # Same generator state, same output: augmentation is a function of the seed.
    cfg = get_data_config().augment
    image = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    outs = [tr.Augment(cfg).random_map({'image': image.copy()},
                                       np.random.default_rng(7))['image'] for _ in range(2)]
    np.testing.assert_array_equal(*outs)
