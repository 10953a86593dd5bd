"""File names that are not valid UTF-8 (a Latin-1 b'caf\\xe9.png') reach every reader.

Python lists such a name as a surrogate-escaped str ('caf\\udce9.png'); OpenCV segfaulted on
it, tfds refused it, a hash split raised on it. Each test reads a byte-named file and the
same file under a plain name and asserts the two give the same numbers, bit for bit. A
filesystem that refuses such names (macOS APFS: EILSEQ) skips the tests that need one.
Predicting with a trained model on such names is in test_train.py, beside its `trained` run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib

import cv2
import numpy as np
import pytest
from conftest import LATIN1, byte_path, one_line_error, run_cli, write_avi

from fmsd_jax import atomic, main
from fmsd_jax.data import perturbations, sources
from fmsd_jax.data import tfds_builder as T
from fmsd_jax.data import video as vid
from fmsd_jax.data.config import get_data_config
from fmsd_jax.data.deepfakebench import deepfakebench_records
from fmsd_jax.data.file_records import list_records
from fmsd_jax.data.folder import hash_split
from fmsd_jax.data.transforms import ImageReader, read_rgb
from fmsd_jax.errors import BadInput, InputNotFound
from fmsd_jax.evaluators import result_files
from fmsd_jax.modes import predict
from fmsd_jax.pathnames import shown


def write_png(path: str, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ok, data = cv2.imencode('.png', image)
    assert ok
    data.tofile(path)  # Python's file layer: any name


def noise(seed: int, shape=(24, 40, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_shown_escapes_only_undecodable_bytes():
    assert shown('/data/caf\udce9.png') == '/data/caf\\xe9.png'
    assert shown(b'/data/caf\xe9.png') == '/data/caf\\xe9.png'
    assert shown('/data/café 😀.png') == '/data/café 😀.png'  # valid text unchanged
    assert shown('a\ud800b') == 'a\\ud800b'  # a surrogate no file name has: still printable
    print(shown('caf\udce9 \ud800'))  # encodable by any UTF-8 stdout
    record = logging.makeLogRecord({'msg': 'read %s', 'args': ('caf\udce9.png',)})
    assert main.ShownFormatter('%(message)s').format(record) == 'read caf\\xe9.png'


def test_image_and_frame_folder_read_the_same_pixels(tmp_path):
    image = noise(0)
    plain = str(tmp_path / 'plain.png')
    write_png(plain, image)
    odd = byte_path(tmp_path, b'caf' + LATIN1 + b'.png')
    shutil.copy(plain, odd)
    np.testing.assert_array_equal(read_rgb(odd), read_rgb(plain))
    np.testing.assert_array_equal(read_rgb(odd), image[..., ::-1])

    folder = byte_path(tmp_path, b'fold' + LATIN1 + b'r')
    for i in range(3):
        write_png(os.path.join(folder, f'{i:03d}.png'), noise(i + 1))
    # predict's checks before any model is loaded: OpenCV segfaulted here on both inputs.
    frames = predict.frames_to_score([odd, folder], get_data_config(), video_frames=4)
    assert [r['path'] for r in frames] == [odd] + [os.path.join(folder, f'{i:03d}.png')
                                                   for i in range(3)]
    assert [r['video_id'] for r in frames] == [odd] + [folder] * 3
    assert os.fsencode(frames[1]['path']).startswith(os.fsencode(tmp_path) + b'/fold\xe9r/')
    with pytest.raises(BadInput, match='caf') as e:
        predict.frames_to_score([odd + '.missing'], get_data_config(), video_frames=4)
    assert 'caf\\xe9.png.missing' in shown(str(e.value))


def test_video_frames_are_identical_under_a_byte_name(tmp_path):
    plain = str(tmp_path / 'plain.avi')
    write_avi(plain)
    odd = byte_path(tmp_path, b'vid' + LATIN1 + b'o.avi')
    shutil.copy(plain, odd)
    assert vid.frame_count(odd) == vid.frame_count(plain) == 6
    for i in range(6):
        a, b = vid.read_frame(odd, i), vid.read_frame(plain, i)
        assert a.dtype == np.uint8 and a.shape == (32, 48, 3)
        np.testing.assert_array_equal(a, b)
    frames = predict.frames_to_score([odd], get_data_config(), video_frames=3)
    assert [(r['path'], r['frame_index']) for r in frames] == [(odd, 0), (odd, 2), (odd, 4)]
    # The robustness protocol's VC re-encodes the whole file with PyAV.
    got = perturbations.h264_video_file(odd, 30, [1, 4])
    want = perturbations.h264_video_file(plain, 30, [1, 4])
    assert got.keys() == want.keys() == {1, 4}
    for i in got:
        np.testing.assert_array_equal(got[i], want[i])
    assert vid.frame_count(str(tmp_path / 'no\ud800.avi')) == 0  # unopenable, not a crash
    assert vid.read_frame(str(tmp_path / 'no\ud800.avi'), 0) is None


def test_hash_split_keeps_utf8_assignments_and_hashes_the_bytes_of_others():
    fractions = (0.8, 0.1, 0.1)

    def by_crc(data: bytes) -> str:  # the assignment before names with bad bytes were read
        u = zlib.crc32(data) / 2.0**32
        return 'train' if u < 0.8 else 'val' if u < 0.9 else 'test'

    for key in [f'DS/real/v{i}' for i in range(40)] + ['DS/fake/café', 'DS/fake/视频']:
        assert hash_split(key, fractions) == by_crc(key.encode('utf-8'))
    for i in range(40):
        raw = b'DS/fake/v%d' % i + LATIN1
        assert hash_split(os.fsdecode(raw), fractions) == by_crc(raw)


def test_folder_and_video_sources_list_byte_named_videos(tmp_path):
    video = byte_path(tmp_path, b'D/train/fake/clip' + LATIN1)
    write_png(os.path.join(video, '0.png'), noise(1))
    write_png(os.path.join(video, '1.png'), noise(2))
    write_png(str(tmp_path / 'D' / 'train' / 'real' / 'r.png'), noise(3))
    cfg = get_data_config()
    cfg.source, cfg.dataset_root = 'folder', str(tmp_path)
    records = list_records(cfg, 'D', 'train', frame_num=None)
    fake = [r for r in records if r['label'] == 1]
    assert [r['video_id'] for r in fake] == ['fake/clip\udce9'] * 2
    reader = ImageReader(0)
    np.testing.assert_array_equal(reader(fake[1]), noise(2)[..., ::-1])

    write_avi(byte_path(tmp_path, b'V/train/fake/clip' + LATIN1 + b'.avi'))
    cfg.source = 'video'
    [r0, *_] = list_records(cfg, 'V', 'train', frame_num=3)
    assert r0['video_id'] == 'fake/clip\udce9' and r0['frame_index'] == 0
    assert reader.read(r0).shape == (32, 48, 3)


def _bench_json(tmp_path, frames: list[str], *, raw: bool) -> str:
    """A DeepfakeBench JSON: written as DeepfakeBench's json.dump does (ensure_ascii: the name
    as '\\udce9'), or by a writer that keeps the name's raw byte in the file."""
    groups = {group: {'test': {'v': {'label': group, 'frames': frames, 'masks': []}}}
              for group in ('FF-real', 'FF-DF')}
    folder = tmp_path / ('raw' if raw else 'escaped')
    folder.mkdir()
    text = json.dumps({'DS': groups}, ensure_ascii=not raw)
    with open(folder / 'DS.json', 'w', encoding='utf-8', errors='surrogateescape') as f:
        f.write(text)
    return str(folder)


@pytest.mark.parametrize('raw', [False, True], ids=['ensure_ascii', 'raw_bytes'])
def test_deepfakebench_json_with_a_byte_named_frame(tmp_path, raw):
    odd = byte_path(tmp_path, b'frames/caf' + LATIN1 + b'/0.png')
    write_png(odd, noise(5))
    shutil.copy(odd, tmp_path / 'plain.png')
    rel = os.path.relpath(odd, tmp_path).replace('/', '\\')  # DeepfakeBench's separators
    json_folder = _bench_json(tmp_path, [rel], raw=raw)
    assert (b'caf\\udce9' if not raw else b'caf\xe9') in open(
        os.path.join(json_folder, 'DS.json'), 'rb').read()
    cfg = get_data_config()
    cfg.dataset_root, cfg.dataset_json_folder = str(tmp_path), json_folder
    records = deepfakebench_records(cfg, 'DS', 'test')
    assert [os.fsencode(r['path']) for r in records] == [os.fsencode(odd)] * 2
    np.testing.assert_array_equal(ImageReader(0)(records[0]), read_rgb(str(tmp_path / 'plain.png')))


def test_a_json_name_no_file_can_have_is_a_readable_error(tmp_path):
    json_folder = _bench_json(tmp_path, ['frames/x\ud800.png'], raw=False)
    cfg = get_data_config()
    cfg.dataset_root, cfg.dataset_json_folder = str(tmp_path), json_folder
    with pytest.raises(InputNotFound, match='2 of 2 frame files are missing') as e:
        deepfakebench_records(cfg, 'DS', 'test')
    assert 'x\\ud800.png' in shown(str(e.value))
    cfg.check_files = False
    [r, _] = deepfakebench_records(cfg, 'DS', 'test')
    assert ImageReader(0)(r) is None  # unreadable, counted by the pipeline, not a crash


def test_tfds_packs_byte_named_frames_and_refuses_a_byte_named_data_dir(tmp_path):
    video = byte_path(tmp_path, b'root/D/train/real/v' + LATIN1)
    write_png(os.path.join(video, '0.png'), noise(7, (8, 8, 3)))
    cfg = get_data_config()
    cfg.source, cfg.dataset_root = 'folder', str(tmp_path / 'root')
    cfg.tfds.data_dir = str(tmp_path / 'tfds')
    T.build_tfds(cfg, 'D', splits=('train',))
    [want] = list_records(cfg, 'D', 'train')
    src, _ = T.tfds_data_source(cfg, 'D', 'train')
    got = sources.TfdsToRecord().map(src[0])
    assert {k: got[k] for k in want} == want  # the same str, so the same file
    np.testing.assert_array_equal(got['image'], read_rgb(want['path']))

    cfg.tfds.data_dir = byte_path(tmp_path, b'tfds' + LATIN1)
    for call in (lambda: T.build_tfds(cfg, 'D', splits=('train',)),
                 lambda: T.tfds_data_source(cfg, 'D', 'train')):
        with pytest.raises(BadInput, match=r'tfds\\xe9 is not valid UTF-8.*ArrayRecord'):
            call()
    assert not os.path.exists(cfg.tfds.data_dir)


def test_results_and_predictions_json_round_trip_the_bytes(tmp_path):
    name = os.fsdecode(b'Caf' + LATIN1)
    metrics = {'frame_auc': 0.75, 'video_auc': 0.5, 'acc': 0.5, 'ap': 0.25, 'eer': 0.5,
               'frames': 4, 'videos': 2}
    json_path, md_path = result_files.write_results(tmp_path, {name: metrics})
    [key] = json.loads(json_path.read_text())
    assert os.fsencode(key) == b'Caf\xe9'
    assert '| Caf\\xe9 |' in md_path.read_text(encoding='utf-8')  # valid UTF-8, escaped
    atomic.write_json(tmp_path / 'p.json', {'inputs': {name: 1}})
    assert [os.fsencode(k) for k in atomic.read_json(tmp_path / 'p.json')['inputs']] \
        == [b'Caf\xe9']


def test_a_byte_named_workdir_is_refused_before_any_work(tmp_path):
    workdir = byte_path(tmp_path, b'w' + LATIN1)
    line = one_line_error(run_cli('--config', 'configs/clip_b16.py:runlocal',
                                  f'--workdir={workdir}'))
    assert 'w\\xe9 is not valid UTF-8' in line and 'orbax' in line
    assert os.listdir(tmp_path) == []
