"""The HTTP app: a versioned JSON API, Prometheus metrics and the analysts' page.

Why FastAPI on uvicorn: a well-kept ASGI stack whose event loop lets one process hold many slow
uploads while the device works on batches, with an OpenAPI schema made from the same
declarations that route the requests (served at /v1/openapi.json). Gradio was the other
candidate (GenD's page uses it); it brings a front-end fetched at run time and its own queue,
where this service needs a page that works offline and one bounded queue it controls.
FastAPI's own /docs pages load Swagger from a CDN, so they are switched off; the schema is all
a client generator needs.

Routes (all JSON unless said):
  GET  /                 the page (HTML; its script and style are under /static/)
  GET  /v1/live          liveness: the process answers
  GET  /v1/ready         readiness: 200 once the model is loaded and every batch size
                         compiled, 503 before
  GET  /v1/model         which model answers, and its operating point
  POST /v1/score         score one image or video (multipart part 'file', or the raw body);
                         ?explain=true adds per-subspace numbers and a heatmap when available
  GET  /metrics          Prometheus text format
  GET  /v1/openapi.json  the schema

Every refusal is `{"error": one line, "status": code}` with its HTTP status. With a token
configured every API request needs `Authorization: Bearer <token>`; the page and its two static
files carry no data and load without one (the page asks for the token and sends it).

What is logged: one line per scoring request (id, media type, bytes, frames, outcome, status,
milliseconds). Never the file name, the client's address or any pixel.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from fmsd_jax.serve import upload as up
from fmsd_jax.serve.batcher import Overloaded
from fmsd_jax.serve.media import MediaRefused
from fmsd_jax.serve.service import Service

log = logging.getLogger("fmsd_jax")
API = "/v1"
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}

SCORE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}}}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {"400": {"description": "empty upload, a path in the filename, a bad form"},
                  "401": {"description": "missing or wrong bearer token"},
                  "413": {"description": "over serve.max_bytes or a pixel/frame limit"},
                  "415": {"description": "not an image or video (sniffed from the bytes)"},
                  "422": {"description": "truncated or damaged media"},
                  "503": {"description": "not ready, or at capacity (Retry-After)"},
                  "504": {"description": "took longer than serve.timeout_s; cancelled"}},
}


def error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason, "status": status}, status_code=status,
                        headers=headers)


def _static(name: str) -> bytes:
    return (importlib.resources.files("fmsd_jax.serve") / "static" / name).read_bytes()


def create_app(service: Service, token: str | None = None) -> FastAPI:
    """The app serving `service`; `token` set: every API request needs it as a bearer."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.batcher.start()
        try:
            yield
        finally:
            await service.batcher.stop()
            service.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="fmsd_jax detection service", version="1", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=f"{API}/openapi.json",
                  description="Scores an image or video for face forgery with a trained "
                              "fmsd_jax run: calibrated P(fake), the label at the run's "
                              "operating point, per-frame scores and the model's identity.")
    expected = f"Bearer {token}".encode() if token else None

    def authorized(request: Request) -> bool:
        if expected is None:
            return True
        got = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(got, expected)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        path = request.url.path
        if expected is not None and not (path == "/" or path.startswith("/static/")) \
                and not authorized(request):
            if path == f"{API}/score":
                service.metrics.answered(401, 0.0)
            return error(401, "this service needs `Authorization: Bearer <token>` (the "
                         "contents of the file config.serve.token_file names)",
                         {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_static("index.html"))

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC:
            return error(404, f"no static file {name!r}")
        return Response(_static(name), media_type=STATIC[name],
                        headers={"Cache-Control": "no-cache"})

    @app.get(f"{API}/live", summary="Liveness: the process answers")
    async def live() -> dict[str, Any]:
        return {"alive": True}

    @app.get(f"{API}/ready", summary="Readiness: model loaded, every batch size compiled")
    async def ready() -> JSONResponse:
        body = {"ready": service.ready.is_set(), "batch_sizes": list(service.sizes),
                "compiled": list(service.compiled), "load_s": service.load_s}
        return JSONResponse(body, status_code=200 if service.ready.is_set() else 503,
                            headers=None if service.ready.is_set() else {"Retry-After": "5"})

    @app.get(f"{API}/model", summary="Which model answers, and its operating point")
    async def model() -> JSONResponse:
        if not service.ready.is_set():
            return error(503, "the model is still loading; see /v1/ready", {"Retry-After": "5"})
        return JSONResponse({"model": service.identity,
                             "operating_point": {lv: service.point.as_dict(lv)
                                                 for lv in ("frame", "video")},
                             "batch_sizes": list(service.sizes),
                             "limits": limits(service)})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.post(f"{API}/score", summary="Score one image or video", openapi_extra=SCORE_BODY)
    async def score(request: Request, explain: bool = False) -> JSONResponse:
        received = time.perf_counter()
        status, reason, headers, answer = 200, None, None, None
        size = frames = None
        media_type = "-"
        if not service.ready.is_set():
            status, reason, headers = 503, "the model is still loading; see /v1/ready", \
                {"Retry-After": "5"}
        elif service.in_flight() >= service.max_pending:
            status, reason = 503, (f"the service is at capacity (serve.max_pending="
                                   f"{service.max_pending} requests in progress or waiting "
                                   "to be read)")
            headers = {"Retry-After": "1"}
        if status != 200:
            await _drain(request)
            service.metrics.answered(status, time.perf_counter() - received)
            return error(status, reason, headers)
        service.pending += 1
        try:
            async with asyncio.timeout(service.timeout_s):
                body = await up.read_body(request, service.max_bytes)
                size = len(body.data)
                answer = await service.score(body, explain, received,
                                             time.perf_counter() - received)
                media_type, frames = answer["media_type"], len(answer["frames"])
        except MediaRefused as e:
            status, reason = e.status, e.reason
        except Overloaded as e:
            status, reason, headers = 503, e.reason, {"Retry-After": str(e.retry_after_s)}
        except TimeoutError:
            status, reason = 504, (f"the request took longer than serve.timeout_s="
                                   f"{service.timeout_s:g} s and was cancelled; retry "
                                   "later or send a shorter video")
        except Exception:  # a bug: its traceback goes to the log, the client gets a line
            log.exception("score: internal error")
            status, reason = 500, "internal error (the service's log holds the traceback)"
        finally:
            service.pending -= 1
        seconds = time.perf_counter() - received
        service.metrics.answered(status, seconds)
        rid = answer["id"] if answer else "-"
        log.info("score %s %s %s bytes %s frames: %s %d in %.0f ms", rid, media_type,
                 "-" if size is None else size, "-" if frames is None else frames,
                 "ok" if status == 200 else "refused", status, 1000 * seconds)
        if status != 200:
            return error(status, reason, headers)
        return JSONResponse(answer)

    return app


async def _drain(request: Request, cap: int = 64 * 1024) -> None:
    """Read (and drop) a refused request's small body before answering: a server that closes a
    connection holding unread bytes makes the kernel reset it, and the client then sees a
    connection error instead of the 503 and its Retry-After."""
    n = 0
    with contextlib.suppress(Exception):
        async for chunk in request.stream():
            n += len(chunk)
            if n > cap:
                break


def limits(service: Service) -> dict[str, Any]:
    s = service.cfg.serve
    return {"max_bytes": service.max_bytes, "max_image_pixels": int(s.max_image_pixels),
            "max_video_pixels": int(s.max_video_pixels),
            "max_video_frames": int(s.max_video_frames), "timeout_s": service.timeout_s,
            "queue_frames": service.batcher.capacity, "max_pending": service.max_pending,
            "video_frames": int(service.cfg.predict.video_frames)}
