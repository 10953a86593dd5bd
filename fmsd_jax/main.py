"""Command line: `python -m fmsd_jax.main --config configs/clip_b16.py --workdir DIR [--mode M]`.

Modes: train (default: estimate the layer mask, decompose, train, evaluate), mask (estimate and
save the layer mask only), evaluate (from the workdir's checkpoint), robustness (every test set
clean and under each perturbation level of config.robustness), export (merged dense CLIP weights
+ head for PyTorch), predict (score image files, folders or videos given as arguments).
"""

from __future__ import annotations

import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/clip_b16.py or configs/clip_b16.py:runlocal",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "mask", "evaluate", "robustness", "export",
                                              "predict"],
                          "What to do.")
_OUT = flags.DEFINE_string("out", None, "export: output directory (default WORKDIR/export); "
                           "predict: output JSON (default WORKDIR/predictions.json).")
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed(cfg) -> None:
    """One JAX process per host (or per GPU); the global batch is assembled from all of them."""
    import jax

    # CPU processes (tests, CPU-only clusters) need a collectives backend for cross-process
    # ops; the setting only concerns the CPU client, so GPU and TPU runs are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    d = cfg.distributed
    if d.coordinator_address:
        jax.distributed.initialize(d.coordinator_address, num_processes=d.num_processes,
                                   process_id=d.process_id)
    else:
        jax.distributed.initialize()  # auto-detects SLURM, Cloud TPU and Open MPI clusters


def main(argv: list[str]) -> None:
    from absl import logging as absl_logging

    # Our progress goes to stdout; library chatter (orbax, XLA) only from warnings up.
    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    ours = logging.getLogger("fmsd_jax")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    cfg = _CONFIG.value

    if cfg.multihost or os.environ.get("FMSD_MULTIHOST") == "1":
        init_distributed(cfg)
    from fmsd_jax import config_base

    with cfg.unlocked():
        config_base.apply_regime(cfg)
    mode, workdir = _MODE.value, _WORKDIR.value
    if mode != "predict" and len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]} (only --mode predict takes files)")
    if cfg.get("demo") is not None and mode != "train":
        from fmsd_jax import demo  # configs/demo.py: other modes act on one trained row

        cfg = demo.row_config(cfg, workdir)
    if mode == "train":
        from fmsd_jax import train

        try:
            if cfg.get("demo") is not None:  # configs/demo.py: data, backbone, 4 rows, report
                from fmsd_jax import demo

                demo.run(cfg, workdir)
            else:
                train.train(cfg, workdir)
        except train.Preempted as e:
            logging.getLogger("fmsd_jax").warning("%s; rerun the same command to resume", e)
    elif mode == "mask":
        from fmsd_jax import train

        train.mask_only(cfg, workdir)
    elif mode == "evaluate":
        from fmsd_jax import evaluate

        evaluate.evaluate(cfg, workdir)
    elif mode == "robustness":
        from fmsd_jax import robustness

        robustness.robustness(cfg, workdir)
    elif mode == "export":
        from fmsd_jax import export

        export.export(cfg, workdir, _OUT.value)
    else:
        from fmsd_jax import predict

        if len(argv) < 2:
            raise app.UsageError("--mode predict needs image files, folders or videos to score")
        predict.predict(cfg, workdir, argv[1:], _OUT.value)


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, with an unknown `--config.a.b` override named instead of a KeyError."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        text = str(e).replace("\\n", "\n").replace("\\", "")
        found = re.search(r"'([A-Za-z0-9_]+)'", text)
        key = found.group(1) if found else text
        hint = re.search(r"Did you mean \S+", text)
        bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a]
        sys.exit(f"error: {', '.join(bad) or key}: the config has no field {key!r}"
                 f"{'; ' + hint.group(0).replace(chr(34), '') if hint else ''}. Every field is "
                 "defined, with its default, in fmsd_jax/config_base.py.")
    except flags.Error as e:
        sys.exit(f"error: {e}\nPass --helpfull for the flags.")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
