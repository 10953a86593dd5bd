"""One module per `--mode`: train, mask, evaluate, predict, export, robustness, plan. Each
is what the CLI calls; the machinery they share is fmsd_jax/run/."""
