"""Binding, the token, and running the app under uvicorn: in the foreground for `--mode serve`,
or in a thread for the tests and benches that talk to a real socket in-process.

Why bind the socket here rather than let uvicorn do it: a port in use, or a host that is not
an address of this machine, is the user's mistake and must end in one line before the model
loads; uvicorn reports it as a log line and `sys.exit(1)`. With port 0 the kernel picks a free
port, which the printed URL names.

Why a token off loopback: the default bind, 127.0.0.1, is reachable from this machine only.
Binding any other address exposes the detector (and whatever the machine's users upload) to
the network, so it is refused unless `serve.token_file` names a file holding a secret, which
every API request must then carry as `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import socket
import stat
import threading
import time
from pathlib import Path

import ml_collections as mlc

from fmsd_jax.errors import BadInput, InputNotFound

log = logging.getLogger("fmsd_jax")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only 'localhost' is known to stay on this machine
        return False


def read_token(serve_cfg: mlc.ConfigDict) -> str | None:
    """The bearer token, or None on loopback without a token file; a non-loopback host without
    one is refused."""
    host, path = str(serve_cfg.host), str(serve_cfg.token_file)
    if not path:
        if not is_loopback(host):
            raise BadInput(f"config.serve.host={host!r} is reachable from other machines: set "
                           "config.serve.token_file to a file holding a secret token (every "
                           "request then needs `Authorization: Bearer <token>`), or bind "
                           "127.0.0.1")
        return None
    file = Path(path)
    if not file.is_file():
        raise InputNotFound(f"config.serve.token_file={path!r} is not a file; write a secret "
                            "into it (e.g. `openssl rand -hex 32 > token; chmod 600 token`)")
    token = file.read_text(encoding="utf-8", errors="strict").strip()
    if len(token) < 16 or any(c.isspace() for c in token):
        raise BadInput(f"config.serve.token_file={path!r} must hold one token of at least 16 "
                       "characters without spaces (e.g. `openssl rand -hex 32`)")
    if file.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s is readable by other users; `chmod 600 %s` keeps the token yours",
                    path, path)
    return token


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or one line saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BadInput(f"config.serve.host={host!r} is not an address of this machine ({e})"
                       ) from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise BadInput(f"cannot listen on {host}:{port} ({e.strerror}); choose another "
                       "config.serve.port (0 picks a free one) or stop what holds it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def uvicorn_server(app, serve_cfg: mlc.ConfigDict, service=None):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGTERM and Ctrl-C end it with status 0 after the
        graceful shutdown: for a service, being stopped is its normal end (uvicorn raises
        the signal again once it has shut down, so the process would die of it)."""

        stopped_by: list[int] = []

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                captured = getattr(self, "_captured_signals", [])
                self.stopped_by = list(captured)
                captured.clear()

    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                            limit_concurrency=int(serve_cfg.max_connections),
                            timeout_keep_alive=5, timeout_graceful_shutdown=5,
                            h11_max_incomplete_event_size=64 * 1024)
    server = Server(config)
    if service is not None:  # admission counts the connections uvicorn holds open
        service.connections = lambda: len(server.server_state.connections)
    return server


@dataclasses.dataclass
class Running:
    """A service on a real socket in a thread of this process (tests, benches)."""

    url: str
    service: object
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_in_thread(service, token: str | None = None, host: str = "127.0.0.1",
                    port: int = 0, wait_ready: float | None = 300) -> Running:
    """Bind, start uvicorn in a thread and the model loading beside it; with `wait_ready`,
    return once the service is ready (raising what loading raised)."""
    from fmsd_jax.serve.app import create_app

    sock = bind(host, port)
    server = uvicorn_server(create_app(service, token), service.cfg.serve, service)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="fmsd-uvicorn")
    thread.start()
    if not service.ready.is_set():  # a service the caller loaded itself is served as it is
        service.load_in_thread()
    running = Running(url_of(sock), service, server, thread)
    if wait_ready:
        deadline = time.monotonic() + wait_ready
        while not service.ready.wait(0.05):
            if service.load_error is not None:
                running.stop()
                raise service.load_error
            if time.monotonic() > deadline:
                running.stop()
                raise TimeoutError(f"the service was not ready within {wait_ready} s")
        while not server.started:
            time.sleep(0.01)
    return running

