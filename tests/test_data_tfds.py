"""TFDS builder: packs a DeepfakeBench-layout dataset into ArrayRecord and reads it back."""

from __future__ import annotations

import numpy as np
import pytest

from fmsd_jax.data import pipeline
from fmsd_jax.data import synthetic as S
from fmsd_jax.data import tfds_builder as T
from fmsd_jax.data.config import get_data_config
from fmsd_jax.data.sources import list_records
from fmsd_jax.data.transforms import read_rgb


def test_tfds_roundtrip_matches_file_source(tmp_path):
    out = tmp_path / 'syn'
    S.write_benchmark(out, size='tiny', seed=0, families=('upsample',))
    c = get_data_config()
    c.update(S.data_config_overrides(out))
    c.tfds.data_dir = str(tmp_path / 'tfds')
    c.frame_num.train = 2  # packing follows the config's frame sampling
    path = T.build_tfds(c, 'SynUpsample')
    assert path.endswith('fmsd_frames/SynUpsample/1.0.0')

    expected = {r['path']: r for r in list_records(c, 'SynUpsample', 'train')}
    source, info = T.tfds_data_source(c, 'SynUpsample', 'train')
    assert len(source) == len(expected) == info['frames'] == 2 * 4 * 2
    assert info['videos'] == 8 and info['fake'] == 8
    for i in range(len(source)):
        ex = source[i]
        r = expected[ex['path'].decode()]
        assert int(ex['label']) == r['label'] and ex['video_id'].decode() == r['video_id']
        np.testing.assert_array_equal(ex['image'], read_rgb(r['path']))  # lossless PNG

    c.source = 'tfds'
    c.train_dataset = ('SynUpsample',)
    c.image_size = 32
    batch = next(iter(pipeline.make_train_loader(c, global_batch_size=4, seed=0)))
    assert batch['image'].shape == (4, 32, 32, 3)
    ev = list(pipeline.make_eval_loader(c, 'SynUpsample', split='test', batch_size=5))
    valid = np.concatenate([b['video_id'][b['valid']] for b in ev])
    assert len(valid) == 2 * 2 * 3 and all(v.startswith('SynUpsample_') for v in valid)
    with pytest.raises(FileNotFoundError, match='pack it first'):
        T.tfds_data_source(c, 'SynBlend', 'train')
