r"""FMSD on CLIP ViT-L/14 (Effort's backbone): FF++ c23 → CDF-v1/v2, DFD, DFDC, DFDCP.

Command (HF `openai/clip-vit-large-patch14` weights):

  python -m fmsd_jax.main --config configs/clip_l14.py:bf16 --workdir runs/fmsd_l14 \
    --config.model.init_from=/weights/clip-vit-large-patch14/model.safetensors \
    --config.data.dataset_root=/data/DeepfakeBench \
    --config.data.dataset_json_folder=/data/DeepfakeBench/dataset_json

`:runlocal` is the CPU smoke variant. On multi-chip hosts add `--config.mesh.fsdp=N` to shard
the frozen weights. Expected result: not yet measured by us; Effort (L/14, K=1, d=1) reports
video-level AUC CDF-v2 .956, DFDC .843, DFDCP .909, DFD .965 (REFERENCES.md).
"""

from fmsd_jax import config_base


def get_config(arg: str | None = None):
    c, args = config_base.paper_protocol(arg, variant="L/14", regime="fmsd")
    c.method.mask.top_k = 48  # half of L/14's 96 attention projections
    return config_base.finish(c, args)
