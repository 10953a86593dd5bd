r"""FMSD on CLIP ViT-B/16, the paper setting: FF++ c23 → CDF-v1/v2, DFD, DFDC, DFDCP.

Command (DeepfakeBench-preprocessed data, HF `openai/clip-vit-base-patch16` weights):

  python -m fmsd_jax.main --config configs/clip_b16.py --workdir runs/fmsd_b16 \
    --config.model.init_from=/weights/clip-vit-base-patch16/model.safetensors \
    --config.data.dataset_root=/data/DeepfakeBench \
    --config.data.dataset_json_folder=/data/DeepfakeBench/dataset_json

Variants: `configs/clip_b16.py:runlocal` shrinks it to a CPU smoke run (geometry taken from
init_from, 32 px, 4 steps); `:bf16` computes in bfloat16 (accelerators).

Expected result: not yet measured by us on FF++ (no accelerator time so far). The numbers to
beat (REFERENCES.md, frame-level AUC, FF++ c23 → X): SeLop .924/.901/.853/.905/.926 on
CDF-v1/CDF-v2/DFDC/DFDCP/DFD; Effort video-level AUC CDF-v2 .956, DFD .965.
Cost: 10 epochs of FF++ c23 at 8 frames/video (~57k frames) at batch 32 is ~18k steps.
"""

from fmsd_jax import config_base


def get_config(arg: str | None = None):
    c, args = config_base.paper_protocol(arg, variant="B/16", regime="fmsd")
    return config_base.finish(c, args)
