"""--mode serve: the trained run behind an HTTP API and a web page, until Ctrl-C or SIGTERM.

One process loads the run once, compiles the predict function for every size of
config.serve.batch_sizes, and batches the frames of concurrent requests onto the device
(fmsd_jax/serve/). Mistakes found before anything loads (the serve config, a non-loopback
host without a token file, a port in use) end in one line; so does a mistake found while the
model loads (the server stops, then the error is raised here). Nothing is written: not into
the workdir, not to disk from any upload.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ml_collections as mlc

from fmsd_jax.serve import server as srv
from fmsd_jax.serve.app import create_app
from fmsd_jax.serve.service import Service

log = logging.getLogger("fmsd_jax")


def serve(cfg: mlc.ConfigDict, workdir: str | Path) -> None:
    """Serve WORKDIR's run on config.serve.host:port until the process is stopped."""
    token = srv.read_token(cfg.serve)
    service = Service(cfg, workdir)
    sock = srv.bind(str(cfg.serve.host), int(cfg.serve.port))
    server = srv.uvicorn_server(create_app(service, token), cfg.serve, service)

    def stop(_error: BaseException) -> None:
        server.should_exit = True

    url = srv.url_of(sock)
    log.info("serving %s/ (API %s/v1/, metrics %s/metrics; %s); loading the model, ready "
             "when %s/v1/ready answers 200", url, url, url,
             "bearer token required" if token else "no token: loopback only", url)
    service.load_in_thread(on_error=stop)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if service.load_error is not None:
        raise service.load_error
    names = {2: "Ctrl-C", 15: "SIGTERM"}
    log.info("stopped%s", "".join(f" by {names.get(s, s)}" for s in server.stopped_by[:1]))
