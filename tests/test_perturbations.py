"""Each robustness perturbation checked against numbers derived independently of its code:
exact rational arithmetic, OpenCV / SciPy / Pillow implementations of the same operation, and
the noise scale the DeeperForensics-1.0 reference implies. Plus determinism and where each
protocol acts (before or after the face crop)."""

from __future__ import annotations

import pickle
from fractions import Fraction

import cv2
import numpy as np
import pytest
from scipy import ndimage

from fmsd_jax.data import perturbations as pt
from fmsd_jax.data import transforms as tr
from fmsd_jax.data.config import get_data_config


def photo(size: int = 96) -> np.ndarray:
    """A fixed, smooth, colourful RGB image with edges (no value is grey 128 by accident)."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([200 * x + 20, 180 * y + 30, 120 * (1 - x * y) + 60], -1)
    img[size // 3: size // 2, size // 4: size // 2] = (230, 40, 90)
    return np.clip(img, 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


DF = pt.PROTOCOLS["deeperforensics"]


def test_deeperforensics_levels_are_the_reference_table():
    # add_distortion_to_video.py's get_distortion_parameter, level 1..5.
    assert {k: t.params for k, t in DF.items()} == {
        "CS": (0.4, 0.3, 0.2, 0.1, 0.0), "CC": (0.85, 0.725, 0.6, 0.475, 0.35),
        "BW": (16, 32, 48, 64, 80), "GNC": (0.001, 0.002, 0.005, 0.01, 0.05),
        "GB": (7, 9, 13, 17, 21), "JPEG": (2, 3, 4, 5, 6), "VC": (30, 32, 35, 38, 40)}
    gend = pt.PROTOCOLS["gend"]
    assert gend["JPEG"].params == (100, 80, 60, 40, 20, 10)
    assert gend["GB"].params == ((0, 0), (5, 0.5), (7, 1), (11, 1.5), (13, 2), (19, 3))
    assert gend["RS"].params == (224, 112, 64)
    assert gend["GN"].params == (0, 0.01, 0.03, 0.05, 0.1, 0.2)


@pytest.mark.parametrize("factor", DF["CS"].params)
def test_colour_saturation_scales_opencv_chroma_and_keeps_luma(factor):
    img = photo()
    out = pt.colour_saturation(img, factor)
    # OpenCV's own 8-bit YCrCb of input and output (not our matrix).
    yin = cv2.cvtColor(img, cv2.COLOR_RGB2YCrCb).astype(float)
    yout = cv2.cvtColor(out, cv2.COLOR_RGB2YCrCb).astype(float)
    np.testing.assert_allclose(yout[..., 1:] - 128, factor * (yin[..., 1:] - 128), atol=2.0)
    # Luma kept up to the reference's truncation (≤ 1 level down) and OpenCV's rounding.
    assert np.all(yout[..., 0] - yin[..., 0] <= 1) and np.all(yout[..., 0] - yin[..., 0] >= -2)
    if factor == 0.0:
        assert np.all(yout[..., 1:] == 128)  # no colour left: Cb = Cr = 128 exactly
        assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])


@pytest.mark.parametrize("factor", DF["CC"].params)
def test_contrast_is_the_truncated_product_for_every_pixel_value(factor):
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    out = pt.contrast(values, factor)
    q = Fraction(str(factor))  # exact: 0.85 = 17/20, ...
    expected = np.array([v * q.numerator // q.denominator for v in range(256)])
    np.testing.assert_array_equal(out[..., 0].ravel(), expected)
    img = photo()
    mean_in, mean_out = img.mean(), pt.contrast(img, factor).mean()
    assert factor * mean_in - 1 < mean_out <= factor * mean_in  # the mean scales by the factor


def test_block_count_rule():
    assert [pt.block_count(256, 256, p) for p in DF["BW"].params] == [16, 32, 48, 64, 80]
    assert pt.block_count(1080, 1920, 16) == 4 * 16  # the reference: min side // 256 × param
    assert pt.block_count(300, 512, 80) == 80
    # Below 256 px: a 256² crop's covered share, at least one block.
    assert [pt.block_count(64, 64, p) for p in DF["BW"].params] == [1, 2, 3, 4, 5]
    assert [pt.block_count(32, 32, p) for p in DF["BW"].params] == [1, 1, 1, 1, 1]
    assert pt.block_count(128, 128, 48) == 12


def test_block_wise_paints_the_drawn_grey_blocks():
    img = photo(256)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    out = pt.block_wise(img, 32, rng_a)
    # The same draws, painted one block at a time as the reference does.
    ys, xs = rng_b.integers(0, 256 - 8, size=32), rng_b.integers(0, 256 - 8, size=32)
    expected = img.copy()
    for y, x in zip(ys, xs, strict=True):
        expected[y:y + 8, x:x + 8] = 128
    np.testing.assert_array_equal(out, expected)
    assert ys.max() <= 256 - 9 and xs.max() <= 256 - 9  # randint(0, side - 1 - 8)
    changed = np.any(out != img, -1)
    assert 64 <= changed.sum() <= 32 * 64
    tiny = pt.block_wise(photo(6), 16, np.random.default_rng(0))  # smaller than a block
    assert np.all(tiny == 128)


@pytest.mark.parametrize("variance", [0.001, 0.002])
def test_gaussian_noise_has_the_references_ycbcr_variance(variance):
    grey = np.full((256, 256, 3), 128, np.uint8)
    out = pt.gaussian_noise_ycbcr(grey, variance, np.random.default_rng(0)).astype(float)
    y = out @ np.array([0.299, 0.587, 0.114])
    cb = (out[..., 2] - y) * 0.564
    cr = (out[..., 0] - y) * 0.713
    # The reference adds N(0, variance) to Y' / 255 with Y' = (Y·219 + 16) / 255, so in Y's
    # 0..255 units the standard deviation is sqrt(variance)·255²/219 (224 for the chroma).
    want_y = variance * (255.0**2 / 219) ** 2
    want_c = variance * (255.0**2 / 224) ** 2
    assert abs(y.var() / want_y - 1) < 0.05
    assert abs(cb.var() / want_c - 1) < 0.05 and abs(cr.var() / want_c - 1) < 0.05
    assert abs(y.mean() - 127.5) < 0.3  # zero-mean noise, then the reference's truncation


@pytest.mark.parametrize("kernel", DF["GB"].params)
def test_gaussian_blur_matches_scipy_with_sigma_kernel_over_six(kernel):
    img = photo(64)
    out = pt.gaussian_blur(img, kernel)
    ref = np.stack([ndimage.gaussian_filter(img[..., c].astype(float), kernel / 6,
                                            radius=kernel // 2, mode="mirror")
                    for c in range(3)], -1)
    # OpenCV blurs uint8 in fixed point: within rounding plus a little of the exact filter.
    assert np.max(np.abs(out - ref)) <= 1.5 and np.mean(np.abs(out - ref)) < 0.35


@pytest.mark.parametrize("factor", DF["JPEG"].params)
def test_pixelation_is_a_bilinear_resize_pair(factor):
    img = photo(100)
    out = pt.pixelation(img, factor)
    small = cv2.resize(img, (100 // factor, 100 // factor), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(out, cv2.resize(small, (100, 100),
                                                  interpolation=cv2.INTER_LINEAR))
    flat = np.full((60, 90, 3), 77, np.uint8)
    np.testing.assert_array_equal(pt.pixelation(flat, factor), flat)
    if factor == 2:  # bilinear at exactly 1/2 averages each 2×2 block: a checkerboard is gone
        checker = (np.indices((60, 60)).sum(0) % 2 * 255).astype(np.uint8)[..., None]
        assert set(np.unique(pt.pixelation(checker.repeat(3, -1), 2))) <= {127, 128}


def test_h264_round_trip_is_deterministic_and_degrades_with_crf():
    frames = [np.roll(photo(), 2 * i, axis=1) for i in range(6)]
    a = pt.h264(frames, 30)
    assert len(a) == 6 and all(f.shape == frames[0].shape and f.dtype == np.uint8 for f in a)
    b = pt.h264(frames, 30)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    q = {crf: np.mean([psnr(f, g) for f, g in zip(frames, pt.h264(frames, crf), strict=True)])
         for crf in (30, 40)}
    assert 25 < q[40] < q[30] < 60
    odd = [photo(33)[:, :31]] * 2  # 4:2:0 needs even sides: padded, then cropped back
    assert [f.shape for f in pt.h264(odd, 35)] == [(33, 31, 3)] * 2


def write_video(path, frames, fps=10):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps,
                             (frames[0].shape[1], frames[0].shape[0]))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()


def test_video_file_compression_reencodes_and_returns_the_asked_frames(tmp_path):
    frames = [np.roll(photo(64), 3 * i, axis=1) for i in range(8)]
    path = tmp_path / "v.avi"
    write_video(path, frames)
    got = pt.h264_video_file(str(path), 35, [1, 6])
    assert sorted(got) == [1, 6]
    for i, f in got.items():
        assert f.shape == (64, 64, 3)
        assert 22 < psnr(f, frames[i]) < 50
    again = pt.h264_video_file(str(path), 35, [1, 6])
    assert all(np.array_equal(got[i], again[i]) for i in got)


def test_gend_jpeg_matches_pillow_and_degrades_with_quality():
    from io import BytesIO

    from PIL import Image

    img = photo()
    for q in (80, 40, 10):
        buf = BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=q)
        pil = np.asarray(Image.open(BytesIO(buf.getvalue())).convert("RGB"))
        assert psnr(pt.jpeg(img, q), pil) > 35  # two libjpeg front ends, same operation
    quality = [psnr(img, pt.jpeg(img, q)) for q in pt.PROTOCOLS["gend"]["JPEG"].params]
    assert quality[0] > 35 and all(a > b for a, b in zip(quality, quality[1:], strict=False))


def test_gend_resize_noise_and_identity_levels():
    img = photo(64)
    np.testing.assert_array_equal(pt.resize_and_back(img, 224), img)
    small = cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA)  # 112 of 224 at 64 px
    np.testing.assert_array_equal(pt.resize_and_back(img, 112),
                                  cv2.resize(small, (64, 64), interpolation=cv2.INTER_LINEAR))
    grey = np.full((128, 128, 3), 128, np.uint8)
    noisy = pt.gaussian_noise_rgb(grey, 0.05, np.random.default_rng(0)).astype(float)
    assert abs(noisy.std() / (0.05 * 255) - 1) < 0.03 and abs(noisy.mean() - 128) < 0.2
    p = pt.Perturbation("gend", "GB", 1, 0)  # (0, 0): no blur
    np.testing.assert_array_equal(p(img, "r"), img)
    assert [pt.is_identity("gend", "GB", v) for v in pt.PROTOCOLS["gend"]["GB"].params] == [
        True, False, False, False, False, False]


def test_levels_inside_the_training_augmentation_are_flagged():
    aug = get_data_config().augment  # JPEG 40-100, blur kernel 3-7
    assert [pt.seen_in_training("deeperforensics", "GB", k, aug) for k in DF["GB"].params] == [
        True, False, False, False, False]
    # (0, 0) is no blur at all; (5, .5) and (7, 1) have kernels inside 3-7.
    assert [pt.seen_in_training("gend", "GB", p, aug)
            for p in pt.PROTOCOLS["gend"]["GB"].params] == [False, True, True, False, False,
                                                            False]
    assert not any(pt.seen_in_training("deeperforensics", k, v, aug)
                   for k in ("CS", "CC", "BW", "GNC", "JPEG", "VC") for v in DF[k].params)
    assert [pt.seen_in_training("gend", "JPEG", q, aug)
            for q in pt.PROTOCOLS["gend"]["JPEG"].params] == [True, True, True, True, False,
                                                              False]
    aug.enabled = False
    assert not pt.seen_in_training("gend", "JPEG", 80, aug)


def test_same_seed_same_pixels_and_keyed_by_record():
    img = photo()
    for key in ("BW", "GNC"):
        p = pt.Perturbation("deeperforensics", key, 3, seed=5)
        a, b = p(img, "SynX|a.png|-1"), p(img, "SynX|a.png|-1")
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, p(img, "SynX|b.png|-1"))  # another frame, other draws
        other = pt.Perturbation("deeperforensics", key, 3, seed=6)
        assert not np.array_equal(a, other(img, "SynX|a.png|-1"))


def _records(tmp_path, n=4, size=48):
    recs = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), cv2.cvtColor(np.roll(photo(size), 5 * i, 0), cv2.COLOR_RGB2BGR))
        recs.append({"path": str(path), "frame_index": -1, "label": 0, "dataset": "D",
                     "label_group": "g", "video_id": "v0"})
    return recs


def test_perturbed_reader_on_stored_crops(tmp_path, monkeypatch):
    recs = _records(tmp_path)
    reader = tr.ImageReader(32, detect_faces=False)
    blur = pt.Perturbation("deeperforensics", "GB", 2, 0)
    wrapped = pt.reader_wrapper(blur)(reader, recs)
    # DeeperForensics: on the stored crop, before the resize to the model input.
    expected = tr.resize_square(pt.gaussian_blur(tr.read_rgb(recs[0]["path"]), 9), 32)
    np.testing.assert_array_equal(wrapped(recs[0]), expected)
    # GenD: on the model input.
    noise = pt.Perturbation("gend", "GN", 4, 0)
    got = pt.reader_wrapper(noise)(reader, recs)(recs[0])
    np.testing.assert_array_equal(got, noise(reader(recs[0]), pt.noise_key(recs[0])))
    # VC: the video's frames as one stream, in order; picklable for grain's workers.
    vc = pt.reader_wrapper(pt.Perturbation("deeperforensics", "VC", 3, 0))(reader, recs)
    stream = pt.h264([tr.read_rgb(r["path"]) for r in recs], 35)
    clone = pickle.loads(pickle.dumps(vc))
    calls = []
    monkeypatch.setattr(pt, "h264", lambda *a: calls.append(1) or stream)
    for i in (2, 0, 3, 1):
        np.testing.assert_array_equal(clone(recs[i]), tr.resize_square(stream[i], 32))
    assert len(calls) == 1  # one encode per video, not per frame


def test_perturbed_reader_acts_before_the_face_crop_on_video_files(tmp_path):
    frames = [np.roll(photo(64)[:, :48], i, 0) for i in range(5)]  # 64×48: crop is 48×48
    path = tmp_path / "clip.avi"
    write_video(path, frames)
    recs = [{"path": str(path), "frame_index": i, "label": 1, "dataset": "V",
             "label_group": "fake", "video_id": "fake/clip"} for i in (1, 3)]
    reader = tr.ImageReader(32, detect_faces=False)
    blur = pt.Perturbation("deeperforensics", "GB", 5, 0)
    got = pt.reader_wrapper(blur)(reader, recs)(recs[0])
    full = reader.read(recs[0])
    assert full.shape == (64, 48, 3)
    np.testing.assert_array_equal(got, reader.finish(pt.gaussian_blur(full, 21), recs[0]))
    after = tr.resize_square(pt.gaussian_blur(reader.finish(full, recs[0]), 21), 32)
    assert not np.array_equal(got, after)  # blurring the crop instead differs at its border
    vc = pt.reader_wrapper(pt.Perturbation("deeperforensics", "VC", 1, 0))(reader, recs)
    coded = pt.h264_video_file(str(path), 30, [3])
    np.testing.assert_array_equal(vc(recs[1]), reader.finish(coded[3], recs[1]))


def test_the_noise_does_not_depend_on_where_the_data_lives(tmp_path):
    """The same frames under two roots get the same random perturbation (block-wise, noise),
    and two frames of one video get different ones."""
    reader = tr.ImageReader(32, detect_faces=False)
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    a, b = _records(tmp_path / "here"), _records(tmp_path / "elsewhere")
    for key, level in (("BW", 5), ("GNC", 5)):
        p = pt.Perturbation("deeperforensics", key, level, 0)
        here, there = pt.reader_wrapper(p)(reader, a), pt.reader_wrapper(p)(reader, b)
        np.testing.assert_array_equal(here(a[0]), there(b[0]), err_msg=key)
        assert not np.array_equal(here(a[0]), reader(a[0])), key  # it did perturb
        other = pt.Perturbation("deeperforensics", key, level, 0)
        assert not np.array_equal(other(tr.read_rgb(a[0]["path"]), pt.noise_key(a[0])),
                                  other(tr.read_rgb(a[0]["path"]), pt.noise_key(a[1]))), key
