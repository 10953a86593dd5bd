"""--mode serve: the API on a real socket, against a tiny trained run.

One service (module-scoped, a bearer token required) answers most tests over HTTP, as a
client would reach it; its scores are checked against `--mode predict` on the same files, its
refusals each by status and one-line reason, its metrics by count, and its batches by the XLA
compiles they cause after readiness (none). The CLI itself is started once as a user starts it.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ROOT, counting_compiles, one_line_error, overrides, run_cli, serve_cfg
from conftest import write_avi as _write_avi
from PIL import Image

from fmsd_jax.modes import predict
from fmsd_jax.serve import media, server
from fmsd_jax.serve.service import OperatingPoint, Service

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def frame_png(bench: Path) -> Path:
    return sorted((bench / "SynBlend" / "fake" / "frames").rglob("*.png"))[0]


def avi_bytes(path: Path, n: int = 6) -> bytes:
    _write_avi(str(path), n=n, size=(48, 32))
    return path.read_bytes()


@pytest.fixture(scope="module")
def compiles_at_start() -> list[int]:
    return []


@pytest.fixture(scope="module")
def service(served_run, tiny_clip_checkpoint, tiny_benchmark, compiles_at_start):
    """The tiny run served with a token, loaded in this thread so its compiles are counted."""
    cfg = serve_cfg(tiny_clip_checkpoint, tiny_benchmark, **{"serve.max_bytes": str(2**20)})
    svc = Service(cfg, served_run)
    counting_compiles(svc.load, compiles_at_start)()
    running = server.start_in_thread(svc, token=TOKEN)
    yield running
    running.stop()


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """A form with one file part named as given (httpx would keep only the name's last part,
    hiding a path from the service)."""
    boundary = "fmsdtestboundary7f3a"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"'
            "\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def post(running, data: bytes, name: str | None = "upload.png", **kw) -> httpx.Response:
    """POST /v1/score: a form with one file part `name`, or the raw body when name is None."""
    headers = dict(kw.pop("headers", AUTH))
    if name is not None:
        data, headers["Content-Type"] = multipart(name, data)
    return httpx.post(f"{running.url}/v1/score", content=data, headers=headers, timeout=60,
                      **kw)


def refusal(response: httpx.Response, status: int) -> str:
    """The one-line reason of a refusal with `status`."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["status"] == status and "\n" not in body["error"], body
    return body["error"]


def test_scores_equal_mode_predict_and_the_answer_says_what_decided_it(
        service, served_run, tiny_clip_checkpoint, tiny_benchmark, tmp_path):
    png = frame_png(tiny_benchmark)
    video = tmp_path / "clip.avi"
    raw = avi_bytes(video)
    image = post(service, png.read_bytes(), "face.png")
    assert image.status_code == 200, image.text
    a = image.json()
    v = post(service, raw, None)  # the raw body, no form: `curl --data-binary @clip.avi`
    assert v.status_code == 200, v.text
    b = v.json()
    cfg = serve_cfg(tiny_clip_checkpoint, tiny_benchmark)
    want = predict.predict(cfg, served_run, [str(png), str(video)], tmp_path / "p.json")
    # 32 px square PNG: no face found, so the centre square, the whole image, is scored.
    np.testing.assert_allclose(a["prob_fake"], want["inputs"][str(png)]["prob_fake"], atol=1e-6)
    assert (a["kind"], a["media_type"], a["frame_count"], a["filename"]) == \
        ("image", "image/png", 1, "face.png")
    assert a["faces"] == {"looked_for": True, "found": 0, "frames": 1, "no_face_found": True}
    assert a["frames"][0]["box"] is None and a["frames"][0]["scored"]
    # The video: 6 frames decoded by PyAV from memory, the same frames predict reads from disk.
    np.testing.assert_allclose([f["prob_fake"] for f in b["frames"]],
                               want["inputs"][str(video)]["frame_probs"], atol=1e-5)
    np.testing.assert_allclose(b["prob_fake"], np.mean([f["prob_fake"] for f in b["frames"]]),
                               rtol=1e-6)  # the run's aggregation: the mean
    assert b["aggregation"] == "mean" and a["aggregation"] is None
    assert [f["index"] for f in b["frames"]] == list(range(6)) and b["filename"] is None
    np.testing.assert_allclose([f["time_s"] for f in b["frames"]], np.arange(6) / 10, atol=1e-6)
    # logit is the uncalibrated fake margin: P(fake) = sigmoid(logit / T).
    t = a["operating_point"]["temperature"]
    np.testing.assert_allclose(1 / (1 + np.exp(-a["frames"][0]["logit"] / t)), a["prob_fake"],
                               rtol=1e-5)
    np.testing.assert_allclose(b["frames"][0]["logit"],
                               want["inputs"][str(video)]["frame_logits"][0], atol=1e-5)
    # Calibrated with the run's temperature, labelled at its validation EER threshold (frame
    # level for an image, video level for a video), as --mode predict labels.
    rule = json.loads((served_run / "decision.json").read_text())
    op = a["operating_point"]
    assert (op["name"], op["level"], b["operating_point"]["level"]) == ("eer", "frame", "video")
    assert op["temperature"] == rule["temperature"] != 1.0
    assert op["threshold"] == rule["thresholds"]["frame"]["eer"]
    assert b["operating_point"]["threshold"] == rule["thresholds"]["video"]["eer"]
    assert op["uncertain_band"] == pytest.approx([op["threshold"] - 0.1, op["threshold"] + 0.1])
    assert "equal error rate" in op["rule"]
    assert a["label"] == want["inputs"][str(png)]["label"]
    assert b["label"] == want["inputs"][str(video)]["label"]
    np.testing.assert_allclose(b["prob_fake"], want["inputs"][str(video)]["prob_fake"],
                               atol=1e-5)
    point = OperatingPoint("eer", {"frame": op["threshold"]}, 1.0, 0.1)
    assert a["verdict"] == point.verdict(a["prob_fake"], "frame")
    model = a["model"]
    run = json.loads((served_run / "run.json").read_text())["train"]
    assert model["commit"] == run["git"]["commit"] and model["step"] == 4
    assert model["checkpoint"] == "best"
    assert model["data_fingerprint"] == {k: d["sha256"] for k, d in run["data"].items()}
    assert re.fullmatch(r"[0-9a-f]{64}", model["config_sha256"])
    assert set(a["timings_ms"]) == {"read", "decode", "queue", "model", "total"}
    assert a["timings_ms"]["total"] >= a["timings_ms"]["model"] > 0
    crop = Image.open(io.BytesIO(base64.b64decode(a["crop"]["png_base64"])))
    assert crop.size == (32, 32)
    assert a["explain"] == {"available": False, "subspaces": None, "heatmap_png_base64": None,
                            "reason": "not requested (explain=true asks for it)"}


def test_explain_gives_each_subspace_and_a_heatmap_that_add_up(service, served_run,
                                                               tiny_benchmark):
    """Δ fake logit per artifact subspace equals the ablation's own function on the same
    crop, and the patch map sums to the logit's change from the baseline (completeness)."""
    png = frame_png(tiny_benchmark)
    a = post(service, png.read_bytes(), params={"explain": "true"}).json()
    ex = a["explain"]
    assert ex["available"] and ex["reason"] is None and ex["subspaces_reason"] is None
    assert [s["k"] for s in ex["subspaces"]] == [0, 1, 2, 3]  # K = 4 in the run's config
    svc = service.service
    explainer = svc._explainer
    import jax

    from fmsd_jax.data.transforms import read_rgb
    from fmsd_jax.evaluators import subspaces

    image = jax.device_put(read_rgb(str(png))[None], explainer.sharding)
    want = subspaces.per_input_subspaces(explainer.run, explainer.predict, explainer.variants,
                                         image)[0]
    np.testing.assert_allclose([s["delta_logit"] for s in ex["subspaces"]], want, atol=1e-5)
    patch_map = np.asarray(ex["patch_map"])
    assert patch_map.shape == (4, 4)  # 32 px, patch 8
    assert abs(ex["completeness_gap"]) < 0.05 * max(abs(patch_map.sum()), 1e-3) + 1e-3
    heat = Image.open(io.BytesIO(base64.b64decode(ex["heatmap_png_base64"])))
    assert heat.size == (32, 32)


def test_the_verdict_band_is_uncertain_around_the_threshold():
    point = OperatingPoint("eer", {"frame": 0.3, "video": 0.6}, 1.5, 0.05)
    assert [point.verdict(p, "frame") for p in (0.2, 0.24, 0.25, 0.3, 0.34, 0.35, 0.9)] == \
        ["real", "real", "uncertain", "uncertain", "uncertain", "fake", "fake"]
    assert [point.label(p, "frame") for p in (0.29, 0.3)] == ["real", "fake"]
    assert point.verdict(0.5, "video") == "real" and point.verdict(0.5, "frame") == "fake"
    assert point.as_dict("video")["uncertain_band"] == pytest.approx([0.55, 0.65])
    assert OperatingPoint("t", {"frame": 0.5}, 1.0, 0.0).verdict(0.5, "frame") == "fake"


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def absurd_frame_count(path: Path) -> bytes:
    """An AVI whose stream header claims 2**31 - 1 frames (its 6 real frames follow)."""
    data = bytearray(avi_bytes(path))
    strh = data.find(b"strh")
    struct.pack_into("<I", data, strh + 8 + 32, 2**31 - 1)  # AVISTREAMHEADER.dwLength
    return bytes(data)


def test_hostile_uploads_are_refused_with_a_status_and_one_line_and_nothing_on_disk(
        service, tiny_benchmark, tmp_path, monkeypatch):
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # where a spooled upload would go
    big = service.service.max_bytes
    cases = [
        (b"just some text\n", "notes.png", 415, "its bytes start 'just som'"),
        (truncated_jpeg(), "face.jpg", 422, "truncated or damaged"),
        (b"", "empty.png", 400, "empty (0 bytes)"),
        (frame_png(tiny_benchmark).read_bytes(), "../../etc/face.png", 400, "holds a path"),
        (frame_png(tiny_benchmark).read_bytes(), "C:\\x\\face.png", 400, "holds a path"),
        (absurd_frame_count(tmp_path / "v.avi"), "clip.avi", 413,
         "claims 2147483647 frames, over serve.max_video_frames=108000"),
        (b"\0" * (big + 1), "big.png", 413, f"over serve.max_bytes={big}"),
    ]
    for data, name, status, words in cases:
        reason = refusal(post(service, data, name), status)
        assert words in reason, (name, reason)
    assert refusal(post(service, b"\x89PNG\r\n\x1a\n" + b"\0" * 30, None), 422)
    assert list(spool.iterdir()) == [] and not list(tmp_path.glob("*.png"))


def read_answer(s: socket.socket) -> bytes:
    """An HTTP answer read off a raw socket, up to the end of its JSON body."""
    answer = b""
    while not answer.rstrip().endswith(b"}"):
        data = s.recv(65536)
        if not data:
            break
        answer += data
    return answer


def test_an_oversized_upload_is_refused_before_its_body_is_read(service):
    """The declared length alone decides: the answer comes while the body is still unsent."""
    host, port = service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  "Content-Type: application/octet-stream\r\n"
                  f"Content-Length: {10 * 2**30}\r\n\r\n".encode() + b"\xff\xd8\xff")
        answer = read_answer(s).decode()
    assert answer.startswith("HTTP/1.1 413"), answer
    assert "the upload is 10737418240 bytes, over serve.max_bytes" in answer
    # Without a length (chunked), reading stops at the cap: the answer comes while the
    # client is still sending, long before the 1 GiB it would send.
    sent, answer = 0, b""
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"%x\r\n" % 2**16 + b"\0" * 2**16 + b"\r\n"
        with contextlib.suppress(OSError):  # the server closes once it has answered
            while sent < 2**30 and not select.select([s], [], [], 0)[0]:
                s.sendall(chunk)
                sent += 2**16
        answer = read_answer(s)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"stopped reading there" in answer
    assert sent < service.service.max_bytes + 2**24  # the cap plus what socket buffers hold


def test_the_video_header_and_pixel_limits_are_checked_before_decoding(served_run, tmp_path,
                                                                     tiny_clip_checkpoint,
                                                                     tiny_benchmark):
    cfg = serve_cfg(tiny_clip_checkpoint, tiny_benchmark, **{"serve.max_video_pixels":
                                                             str(48 * 32 - 1),
                                                             "serve.max_image_pixels": "1000"})
    limits = media.Limits(cfg.serve, cfg.data, 6)
    with pytest.raises(media.MediaRefused, match="claims 48x32 frames, over "
                       "serve.max_video_pixels=1535") as e:
        media.decode(avi_bytes(tmp_path / "v.avi"), limits)
    assert e.value.status == 413
    with pytest.raises(media.MediaRefused, match="claims 32x32 = 1024 pixels, over "
                       "serve.max_image_pixels=1000"):
        media.decode(frame_png(tiny_benchmark).read_bytes(), limits)
    assert media.sniff(b"\0\0\0\x18ftypisom") == ("video/mp4", "video")
    assert media.sniff(b"\x1a\x45\xdf\xa3\x01") == ("video/x-matroska", "video")
    assert media.sniff(b"RIFF\0\0\0\0WEBPVP8 ") == ("image/webp", "image")
    assert media.sniff(b"GIF89a") is None


def test_a_token_is_required_on_every_api_request_but_not_for_the_page(service):
    for path in ("/v1/ready", "/v1/model", "/metrics", "/v1/live"):
        assert httpx.get(service.url + path).status_code == 401
        assert httpx.get(service.url + path, headers={"Authorization": "Bearer wrong"}
                         ).status_code == 401
        assert httpx.get(service.url + path, headers=AUTH).status_code == 200
    reason = refusal(post(service, b"x", headers={}), 401)
    assert "Authorization: Bearer" in reason
    for path in ("/", "/static/app.js", "/static/app.css"):
        page = httpx.get(service.url + path)
        text = page.text.replace("http://www.w3.org/2000/svg", "")  # a name, not a fetch
        assert page.status_code == 200 and not re.search(r"https?://|//cdn", text)


def test_openapi_schema_is_served_under_the_version(service):
    schema = httpx.get(f"{service.url}/v1/openapi.json", headers=AUTH).json()
    assert {"/v1/score", "/v1/live", "/v1/ready", "/v1/model"} <= set(schema["paths"])
    body = schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/octet-stream"} <= set(body)
    assert httpx.get(f"{service.url}/docs").status_code in (401, 404)  # no CDN-backed page


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + (f"{{{want}}}" if want else "")) + r" ([0-9.e+-]+)"
    found = re.search("^" + pattern + "$", text, re.M)
    assert found, (name, labels)
    return float(found.group(1))


def test_concurrent_requests_share_batches_and_compile_nothing_after_readiness(
        service, tiny_benchmark, tmp_path, compiles_at_start):
    # Start-up compiled one program per batch size (1, 4, 8), before readiness.
    assert compiles_at_start and compiles_at_start[0] >= 3
    pngs = [p.read_bytes() for p in
            sorted((tiny_benchmark / "SynBlend").rglob("*.png"))[:12]]
    raw = avi_bytes(tmp_path / "clip.avi")
    text0 = httpx.get(f"{service.url}/metrics", headers=AUTH).text
    batches0 = metric(text0, "fmsd_serve_batch_frames_count")
    frames0 = metric(text0, "fmsd_serve_batch_frames_sum")
    ok0 = metric(text0, "fmsd_serve_requests_total", outcome="ok")

    def burst() -> list[httpx.Response]:
        bodies = pngs + [raw, raw]  # 12 images, 2 videos of 6 frames: 24 frames
        with ThreadPoolExecutor(14) as pool:
            return list(pool.map(lambda b: post(service, b), bodies))

    calls: list[int] = []
    answers = counting_compiles(burst, calls)()
    explained = counting_compiles(lambda: post(service, pngs[0], params={"explain": "true"}),
                                  calls)()
    assert calls == [0, 0] and explained.json()["explain"]["available"]
    assert [a.status_code for a in answers] == [200] * 14
    text = httpx.get(f"{service.url}/metrics", headers=AUTH).text
    batches = metric(text, "fmsd_serve_batch_frames_count") - batches0
    assert metric(text, "fmsd_serve_batch_frames_sum") - frames0 == 25
    assert batches < 24  # frames of different requests went through the device together
    assert metric(text, "fmsd_serve_requests_total", outcome="ok") - ok0 == 15
    assert metric(text, "fmsd_serve_queue_frames") == 0
    assert metric(text, "fmsd_serve_reserved_frames") == 0
    assert metric(text, "fmsd_serve_ready") == 1
    # Every batch ran at a compiled size: the padded-size histogram has mass only on 1, 4, 8.
    padded = {float(m.group(1)): float(m.group(2)) for m in re.finditer(
        r'^fmsd_serve_batch_padded_size_bucket\{le="([0-9.]+)"\} ([0-9.]+)$', text, re.M)}
    assert set(padded) == {1.0, 4.0, 8.0}
    assert metric(text, "fmsd_serve_request_seconds_count", outcome="ok") - \
        metric(text0, "fmsd_serve_request_seconds_count", outcome="ok") == 15


@pytest.fixture
def slow_model(service):
    """The service's model, made to take `delay[0]` seconds per batch (then put back)."""
    svc = service.service
    fast, delay = svc.model_fn, [0.0]

    def slow(batch):
        time.sleep(delay[0])
        return fast(batch)

    svc.model_fn = slow
    yield svc, delay
    svc.model_fn = fast


def test_a_request_past_the_timeout_is_cancelled_and_frees_its_slots(service, slow_model,
                                                                     tiny_benchmark):
    svc, delay = slow_model
    png = frame_png(tiny_benchmark).read_bytes()
    delay[0], svc.timeout_s = 1.0, 0.3
    try:
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: post(service, png), range(3)))
        for a in answers:
            assert "longer than serve.timeout_s=0.3 s and was cancelled" in refusal(a, 504)
        assert svc.batcher.reserved == 0  # every slot returned at once
        time.sleep(1.5)  # the batch already on the device finishes; the queued ones never ran
        assert svc.batcher.queued() == 0
    finally:
        delay[0], svc.timeout_s = 0.0, 30.0
    assert post(service, png).status_code == 200
    text = httpx.get(f"{service.url}/metrics", headers=AUTH).text
    assert metric(text, "fmsd_serve_requests_total", outcome="timeout") >= 3


def test_a_full_queue_answers_503_with_retry_after(service, slow_model, tiny_benchmark):
    svc, delay = slow_model
    png = frame_png(tiny_benchmark).read_bytes()
    delay[0], svc.batcher.capacity = 0.5, 2
    try:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: post(service, png), range(6)))
    finally:
        delay[0], svc.batcher.capacity = 0.0, int(svc.cfg.serve.queue_frames)
    codes = sorted(a.status_code for a in answers)
    assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) <= {200, 503}
    for a in answers:
        if a.status_code == 503:
            assert "at capacity" in refusal(a, 503) and int(a.headers["Retry-After"]) >= 1
    assert svc.batcher.reserved == 0


def test_readiness_waits_for_every_batch_size_while_liveness_answers(tiny_clip_checkpoint,
                                                                      tiny_benchmark,
                                                                      served_run):
    release, seen = threading.Event(), []

    def held(batch):  # a model whose first compile is held back until released
        release.wait(30)
        seen.append(len(batch))
        return np.zeros(len(batch), np.float32), np.zeros(len(batch), np.float32)

    svc = Service(serve_cfg(tiny_clip_checkpoint, tiny_benchmark), served_run, model_fn=held)
    running = server.start_in_thread(svc, wait_ready=None)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{running.url}/v1/live").status_code == 200:
                    break
            time.sleep(0.05)
        ready = httpx.get(f"{running.url}/v1/ready")
        assert ready.status_code == 503 and ready.json()["compiled"] == []
        assert "still loading" in refusal(httpx.post(f"{running.url}/v1/score", content=b"x"),
                                          503)
        release.set()
        assert svc.ready.wait(30)
        ready = httpx.get(f"{running.url}/v1/ready").json()
        assert ready["ready"] and ready["compiled"] == [1, 4, 8] and seen == [1, 4, 8]
    finally:
        release.set()
        running.stop()


def test_a_non_loopback_host_needs_a_token_file(tmp_path, tiny_clip_checkpoint,
                                                tiny_benchmark):
    cfg = serve_cfg(tiny_clip_checkpoint, tiny_benchmark, **{"serve.host": "0.0.0.0"})
    with pytest.raises(Exception, match="reachable from other machines: set "
                       "config.serve.token_file"):
        server.read_token(cfg.serve)
    short = tmp_path / "token"
    short.write_text("abc\n")
    cfg = serve_cfg(tiny_clip_checkpoint, tiny_benchmark,
                    **{"serve.host": "0.0.0.0", "serve.token_file": str(short)})
    with pytest.raises(Exception, match="at least 16 characters"):
        server.read_token(cfg.serve)
    short.write_text(TOKEN + "\n")
    assert server.read_token(cfg.serve) == TOKEN
    busy = server.bind("127.0.0.1", 0)
    try:
        with pytest.raises(Exception, match="cannot listen on 127.0.0.1:"):
            server.bind("127.0.0.1", busy.getsockname()[1])
    finally:
        busy.close()


def _cli_args(workdir: Path, ckpt: Path, bench: Path, *flags: str) -> list[str]:
    args = ["--config", "configs/clip_b16.py:runlocal", f"--workdir={workdir}", "--mode", "serve"]
    return args + [f"--config.{k}={v}" for k, v in overrides(ckpt, bench).items()] + list(flags)


def test_the_cli_refuses_an_exposed_bind_without_a_token_in_one_line(served_run,
                                                                      tiny_clip_checkpoint,
                                                                      tiny_benchmark):
    proc = run_cli(*_cli_args(served_run, tiny_clip_checkpoint, tiny_benchmark,
                              "--config.serve.host=0.0.0.0"))
    assert "config.serve.host='0.0.0.0' is reachable from other machines" in \
        one_line_error(proc)


def test_mode_serve_starts_scores_and_stops_on_sigterm(served_run, tiny_clip_checkpoint,
                                                       tiny_benchmark):
    args = _cli_args(served_run, tiny_clip_checkpoint, tiny_benchmark, "--config.serve.port=0",
                     "--config.serve.batch_sizes=(1,2)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "fmsd_jax.main", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        url = None
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"serving (http://127\.0\.0\.1:\d+)/", line):
                url = m.group(1)
            if "ready:" in line:
                break
        assert url, "".join(lines)
        assert httpx.get(f"{url}/v1/ready").json()["compiled"] == [1, 2]
        answer = httpx.post(f"{url}/v1/score", files={"file": (
            "f.png", frame_png(tiny_benchmark).read_bytes())}, timeout=60)
        # The run's data.face.if_none is 'skip' (DeepfakeBench stores no faceless frame): the
        # tiny frame holds no face, so nothing is scored and the answer says so.
        a = answer.json()
        assert answer.status_code == 200 and a["faces"]["no_face_found"]
        assert (a["prob_fake"], a["label"], a["verdict"], a["crop"]) == \
            (None, None, "no face found", None)
        assert a["frames"][0]["scored"] is False
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines)
    out = "".join(lines)
    assert "score " in out and "face.png" not in out and "f.png" not in out  # no names logged
    assert "stopped by SIGTERM" in out and "wrote no file" in out


def test_an_operating_point_the_run_lacks_is_refused_before_loading(tmp_path,
                                                                   tiny_clip_checkpoint,
                                                                   tiny_benchmark):
    """A workdir never evaluated has no decision.json: 'eer' is refused in one line naming
    the fix; a threshold given as a number serves at T = 1."""
    from fmsd_jax.errors import BadInput

    with pytest.raises(BadInput, match="operating point 'eer' is not in this run's "
                       "decision.json.*run --mode evaluate"):
        Service(serve_cfg(tiny_clip_checkpoint, tiny_benchmark), tmp_path)
    svc = Service(serve_cfg(tiny_clip_checkpoint, tiny_benchmark,
                            **{"predict.operating_point": "0.7"}), tmp_path)
    assert svc.point.thresholds == {"frame": 0.7, "video": 0.7}
    assert svc.point.temperature == 1.0
    with pytest.raises(BadInput, match="config.serve.image_faces='all' is not one of"):
        Service(serve_cfg(tiny_clip_checkpoint, tiny_benchmark,
                          **{"serve.image_faces": "all"}), tmp_path)
