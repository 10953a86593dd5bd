r"""Baseline: linear probe on frozen CLIP ViT-B/16 features (only the head trains).

  python -m fmsd_jax.main --config configs/linear_probe_b16.py --workdir runs/probe_b16 \
    --config.model.init_from=/weights/clip-vit-base-patch16/model.safetensors \
    --config.data.dataset_root=/data/DeepfakeBench \
    --config.data.dataset_json_folder=/data/DeepfakeBench/dataset_json

`:runlocal` is the CPU smoke variant. Expected result: not yet measured by us; it is the floor
that every adaptation method must clear.
"""

from fmsd_jax import config_base


def get_config(arg: str | None = None):
    c, args = config_base.paper_protocol(arg, variant="B/16", regime="linear_probe")
    c.optim.head_lr = 1e-3
    return config_base.finish(c, args)
