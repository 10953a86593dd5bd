"""The detection service of `--mode serve`: an HTTP API, a batcher that shares the device
between concurrent requests, and the analysts' page (static/, served by the app, no external
assets). `app` routes, `service` loads the run and answers one upload, `batcher` batches,
`media` sniffs and decodes uploads in memory, `upload` reads bodies under a byte cap,
`metrics` counts, `server` binds and runs uvicorn."""
