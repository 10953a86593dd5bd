r"""Baseline: full fine-tuning of CLIP ViT-B/16 (every parameter trains), same data and protocol.

  python -m fmsd_jax.main --config configs/full_ft_b16.py --workdir runs/full_b16 \
    --config.model.init_from=/weights/clip-vit-base-patch16/model.safetensors \
    --config.data.dataset_root=/data/DeepfakeBench \
    --config.data.dataset_json_folder=/data/DeepfakeBench/dataset_json

lr 2e-5 (a 2e-4 full fine-tune of CLIP diverges from its pretrained features in a few hundred
steps). `:runlocal` is the CPU smoke variant. Expected result: not yet measured by us;
DeepfakeBench's CLIP full fine-tuning baselines sit well below Effort cross-dataset.
"""

from fmsd_jax import config_base


def get_config(arg: str | None = None):
    c, args = config_base.paper_protocol(arg, variant="B/16", regime="full")
    c.optim.lr = 2e-5
    return config_base.finish(c, args)
