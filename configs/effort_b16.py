r"""Baseline: Effort (Yan et al., ICML 2025) through our code: K=1, d=1 on every q/k/v/out, no mask.

  python -m fmsd_jax.main --config configs/effort_b16.py --workdir runs/effort_b16 \
    --config.model.init_from=/weights/clip-vit-base-patch16/model.safetensors \
    --config.data.dataset_root=/data/DeepfakeBench \
    --config.data.dataset_json_folder=/data/DeepfakeBench/dataset_json

Plain cross-entropy as in Effort's released code (both regularisers off). `:l14` switches to
Effort's own ViT-L/14 backbone; `:runlocal` is the CPU smoke variant.
Expected result: not yet measured by us; Effort reports (L/14) video-level AUC CDF-v2 .956.
"""

from fmsd_jax import config_base


def get_config(arg: str | None = None):
    c, args = config_base.paper_protocol(arg, variant="B/16", regime="effort", l14=False)
    if args.l14:
        c.model.variant = "L/14"
    return config_base.finish(c, args)
