"""DeepfakeBench JSON, folder and video sources, and the config they read."""

from __future__ import annotations

import json
import os

import cv2
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from fmsd_jax.data import records as rec
from fmsd_jax.data import video as vid
from fmsd_jax.data.config import get_data_config
from fmsd_jax.data.deepfakebench import deepfakebench_records
from fmsd_jax.data.folder import folder_records, hash_split
from fmsd_jax.data.sources import list_records


def _png(path, value: int, size: int = 8) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(str(path), np.full((size, size, 3), value, np.uint8))


def _ff_like(root, n_frames: dict[str, int]) -> str:
    """A FaceForensics++-style JSON (compression level, two label groups) whose frame
    paths use Windows separators, non-padded integer names and arbitrary order."""
    groups: dict = {'FF-real': {}, 'FF-DF': {}}
    for group, sub in (('FF-real', 'original'), ('FF-DF', 'Deepfakes')):
        for split in ('train', 'val', 'test'):
            videos = {}
            for video, n in n_frames.items():
                frames = []
                for i in range(n):
                    rel = f'FaceForensics++\\{sub}\\c23\\frames\\{split}{video}\\{i}.png'
                    _png(os.path.join(root, *rel.split('\\')), i)
                    frames.append(rel)
                frames = frames[::-1]  # JSON order is not frame order
                videos[f'{split}{video}'] = {'label': group, 'frames': frames, 'masks': []}
            groups[group][split] = {'c23': videos, 'c40': {}}
    os.makedirs(os.path.join(root, 'json'), exist_ok=True)
    with open(os.path.join(root, 'json', 'FaceForensics++.json'), 'w') as f:
        json.dump({'FaceForensics++': groups}, f)
    return os.path.join(root, 'json')


def _cfg(root, json_folder, **kw):
    c = get_data_config()
    c.dataset_root = str(root)
    c.dataset_json_folder = str(json_folder)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_even_indices_fix_deepfakebench_first_n_bug():
    np.testing.assert_array_equal(rec.even_indices(32, 8), [0, 4, 8, 12, 16, 20, 24, 28])
    np.testing.assert_array_equal(rec.even_indices(10, 4), [0, 2, 5, 7])
    np.testing.assert_array_equal(rec.even_indices(5, 8), [0, 1, 2, 3, 4])  # all when fewer
    np.testing.assert_array_equal(rec.even_indices(6, None), np.arange(6))
    assert rec.even_indices(0, 8).size == 0


def test_frames_sorted_by_integer_name_and_windows_paths():
    names = ['a\\v\\10.png', 'a\\v\\2.png', 'a\\v\\1.png', 'a/v/frame_100.png', 'a/v/0.png']
    assert [os.path.basename(p.replace('\\', '/')) for p in rec.sort_frames(names)] == [
        '0.png', '1.png', '2.png', '10.png', 'frame_100.png']
    assert rec.normalise_path('x\\y\\0.png', '/root') == '/root/x/y/0.png'
    assert rec.normalise_path('/abs/0.png', '/root') == '/abs/0.png'


def test_deepfakebench_reads_compression_level_and_samples_evenly(tmp_path):
    jf = _ff_like(tmp_path, {'000': 12, '001': 3})
    cfg = _cfg(tmp_path, jf)
    recs = deepfakebench_records(cfg, 'FaceForensics++', 'train', frame_num=4)
    # 2 groups x (4 evenly spaced of 12 + all 3 of 3)
    assert len(recs) == 2 * (4 + 3)
    v0 = [r for r in recs if r['video_id'] == 'FF-real/train000']
    assert [os.path.basename(r['path']) for r in v0] == ['0.png', '3.png', '6.png', '9.png']
    assert all(os.path.isabs(r['path']) and os.path.exists(r['path']) for r in recs)
    assert {r['label'] for r in recs if r['label_group'] == 'FF-DF'} == {1}
    assert {r['label'] for r in recs if r['label_group'] == 'FF-real'} == {0}
    assert {r['dataset'] for r in recs} == {'FaceForensics++'}
    # frame_num from config.data.frame_num (test: 8 of 12)
    assert len(list_records(cfg, 'FaceForensics++', 'test')) == 2 * (8 + 3)


def test_frame_num_val_key_serves_only_the_val_split():
    import ml_collections as mlc

    from fmsd_jax.data.file_records import split_frame_num
    d = mlc.ConfigDict({'frame_num': {'train': 8, 'test': 6}})
    assert [split_frame_num(d, s) for s in ('train', 'val', 'test')] == [8, 6, 6]  # DFB
    d.frame_num.val = 4
    assert [split_frame_num(d, s) for s in ('train', 'val', 'test')] == [8, 4, 6]


def test_deepfakebench_errors_name_json_split_and_missing_frames(tmp_path):
    jf = _ff_like(tmp_path, {'000': 4})
    cfg = _cfg(tmp_path, jf)
    with pytest.raises(FileNotFoundError, match=r'Celeb-DF-v2.*FaceForensics\+\+'):
        deepfakebench_records(cfg, 'Celeb-DF-v2', 'test')
    with pytest.raises(KeyError, match=r"FaceForensics\+\+\.json.*no split 'holdout'"):
        deepfakebench_records(cfg, 'FaceForensics++', 'holdout')
    cfg.compression = 'raw'
    with pytest.raises(KeyError, match="compression 'raw'"):
        deepfakebench_records(cfg, 'FaceForensics++', 'test')
    cfg.compression = 'c23'
    for i in (1, 2, 3):
        os.remove(tmp_path / 'FaceForensics++' / 'Deepfakes' / 'c23' / 'frames' / 'val000'
                  / f'{i}.png')
    with pytest.raises(FileNotFoundError) as e:
        deepfakebench_records(cfg, 'FaceForensics++', 'val', frame_num=None)
    msg = str(e.value)
    assert "split 'val'" in msg and 'FaceForensics++.json' in msg
    assert '3 of 8 frame files are missing' in msg and 'val000/1.png' in msg
    assert 'dataset_root' in msg
    del cfg.label_dict['FF-DF']
    with pytest.raises(KeyError, match="label group 'FF-DF'"):
        deepfakebench_records(cfg, 'FaceForensics++', 'train')


def test_a_damaged_or_foreign_deepfakebench_json_is_named(tmp_path):
    from fmsd_jax.errors import BadInput

    cfg = _cfg(tmp_path, tmp_path)
    for i, (text, said) in enumerate([
            ('{"D": {', r'D.json is not valid JSON \(Expecting'),
            ('{"D": [1, 2]}', r'D.json: D is a JSON list, expected an object of label groups'),
            ('{"D": {"real": {"test": {"c23": []}}}}', r'D/real/test/c23 is a JSON list'),
            ('{"D": {"real": {"test": {"v1": "x.png"}}}}',
             r'D/real/test/v1 is a JSON str, expected an object with a "frames" list'),
            ('{"D": {"real": {"test": {"v1": {"frames": "x.png"}}}}}', r'D/real/test/v1 is a JSON '
             'dict')]):
        (tmp_path / 'D.json').write_text(text)
        os.utime(tmp_path / 'D.json', (i, i))  # a new mtime: the reader caches by it
        with pytest.raises(BadInput, match=said):
            deepfakebench_records(cfg, 'D', 'test')


def test_an_image_claiming_more_pixels_than_opencv_allocates_is_unreadable(tmp_path):
    import struct
    import zlib

    from fmsd_jax.data.transforms import read_rgb

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack('>I', len(data)) + kind + data
                + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))

    bomb = tmp_path / 'bomb.png'  # 60000 x 60000 RGB in its header: 10.8 GB if decoded
    bomb.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 60000, 60000,
                                                                       8, 2, 0, 0, 0))
                     + chunk(b'IDAT', zlib.compress(b'\0' * 1000)) + chunk(b'IEND', b''))
    assert read_rgb(str(bomb)) is None  # counted unreadable, not a cv2.error


def test_folder_source_classes_videos_and_hash_split(tmp_path):
    root = tmp_path / 'MyData'
    for i in range(30):
        _png(root / 'real' / f'r{i}.png', 10)
    for m in ('FF-DF', 'fake'):
        for v in range(10):
            for f in range(5):
                _png(root / m / f'vid{v}' / f'{f}.png', 200)
    cfg = _cfg(tmp_path, '', source='folder')
    cfg.folder.split_fractions = (0.6, 0.2, 0.2)
    parts = {s: list_records(cfg, 'MyData', s) for s in ('train', 'val', 'test')}
    ids = [{(r['label_group'], r['video_id']) for r in p} for p in parts.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    total_videos = sum(len(i) for i in ids)
    assert total_videos == 30 + 20
    assert 0.4 < len(ids[0]) / total_videos < 0.8  # crc32 split is near 60 %
    for p in parts.values():
        for r in p:
            assert r['label'] == (0 if r['label_group'] == 'real' else 1)
        per_video = {}
        for r in p:
            per_video.setdefault(r['video_id'], []).append(r)
        assert all(len(v) == (1 if k.startswith('real') else 5) for k, v in per_video.items())
    assert hash_split('MyData/real/r1', (0.6, 0.2, 0.2)) == hash_split('MyData/real/r1',
                                                                       (0.6, 0.2, 0.2))
    _png(root / 'weird' / 'a.png', 0)
    with pytest.raises(KeyError, match="class folder 'weird'"):
        list_records(cfg, 'MyData', 'train')


def test_folder_split_directories(tmp_path):
    for split in ('train', 'test'):
        for cls in ('real', 'fake'):
            for i in range(3):
                _png(tmp_path / 'D' / split / cls / f'{i}.png', 1)
    cfg = _cfg(tmp_path, '', source='folder')
    assert len(folder_records(cfg, 'D', 'train', frame_num=8)) == 6
    with pytest.raises(FileNotFoundError, match="no 'val' folder"):
        folder_records(cfg, 'D', 'val', frame_num=8)


def _write_video(path, n: int, size=(96, 64)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'MJPG'), 10, size)
    assert w.isOpened()
    for i in range(n):
        frame = np.full((size[1], size[0], 3), 0, np.uint8)
        frame[:, :, 1] = i * 10  # frame number readable from the pixels
        w.write(frame)
    w.release()


def test_video_source_samples_evenly_and_says_when_a_frame_has_no_face(tmp_path):
    for cls in ('real', 'fake'):
        _write_video(tmp_path / 'V' / 'train' / cls / 'clip.avi', 20)
    cfg = _cfg(tmp_path, '', source='video')
    cfg.frame_num.train = 4
    recs = list_records(cfg, 'V', 'train')
    assert [r['frame_index'] for r in recs if r['label'] == 0] == [0, 5, 10, 15]
    assert vid.frame_count(str(tmp_path / 'V' / 'train' / 'real' / 'clip.avi')) == 20
    frame = vid.read_frame(recs[2]['path'], 10)
    assert frame.shape == (64, 96, 3) and abs(int(frame[..., 1].mean()) - 100) <= 3
    from fmsd_jax.data.transforms import ImageReader
    # No face in these frames: dropped by default (DeepfakeBench stores no such frame), or
    # their centre square when asked for (data.face.if_none), never without saying which.
    assert ImageReader(32).frame(recs[2]) == (None, 'no_face')
    img, how = ImageReader(32, if_none='centre').frame(recs[2])
    assert how == 'centre' and img.shape == (32, 32, 3)
    assert abs(int(img[..., 1].mean()) - 100) <= 3  # frame 10's pixels, cropped and resized


def test_config_fields_override_from_command_line():
    root = ml_collections.ConfigDict()
    root.data = get_data_config()
    argv = ['prog', "--config.data.test_dataset=('Celeb-DF-v2','DFDC')",
            '--config.data.dataset_json_folder=/j', '--config.data.frame_num.train=32',
            '--config.data.augment.enabled=False']
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict('config', root, flag_values=fv, sys_argv=argv)
    fv(argv)
    d = fv.config.data
    assert d.test_dataset == ('Celeb-DF-v2', 'DFDC')
    assert d.dataset_json_folder == '/j' and d.frame_num.train == 32
    assert not d.augment.enabled
    assert d.label_dict['FF-real'] == 0 and d.label_dict['DFDCP_FakeB'] == 1
    assert d.label_dict['SynSplice_fake'] == 1 and d.image_size == 224
