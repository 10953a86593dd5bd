"""CLIP weights in and out of our vision tower (run checkpoints, with their optimizer state,
are fmsd_jax/run/checkpoints.py): `containers` reads the files, `layouts` maps their keys,
`load` fills a tower, `export_hf` writes one out.

Reading (`read_clip_vision`, `load_clip_vision`): the container is recognised from the file's
bytes, never its name, because the same weights circulate as `model.safetensors`,
`pytorch_model.bin`, `open_clip_pytorch_model.bin`, `ViT-B-16.pt` and renamed copies:

  * safetensors (Hugging Face `CLIPModel` / `CLIPVisionModel[WithProjection]`, open_clip's
    `open_clip_model.safetensors`), read through a memory map so only the vision tower's
    bytes are touched;
  * PyTorch zip archives (`torch.save` state dicts such as open_clip's `.bin`, and OpenAI's
    TorchScript `.pt`), read by `torch_archive` without torch and without running code;
  * legacy (pre-1.6) PyTorch pickles, only through `torch.load(weights_only=True)`.

The key naming (Hugging Face `vision_model.*`, with or without that prefix, or OpenAI/open_clip
`visual.*`, optionally under a wrapper prefix such as `module.` or `state_dict.`) is recognised
from the keys. The geometry comes from the tensors themselves (width, depth, patch, MLP width,
position table, projection); the head count is the one thing a state dict cannot tell, so it
comes from the `config.json` (Hugging Face) or `open_clip_config.json` beside the file, else
from CLIP's convention (`layouts._default_heads`). The vision namespace is converted strictly: every
source tensor in it is used exactly once and every parameter of the tower is filled, or a
`CheckpointError` lists every offending key with its shape. Everything outside the vision
namespace (the text tower, `logit_scale`, `text_projection`, and buffers such as
`position_ids`, `input_resolution`, `context_length`, `vocab_size`) is ignored on purpose.

Writing (`save_hf_clip_vision`): a Hugging Face directory that `transformers` loads as
`CLIPVisionModel` or, when the tower has a projection, `CLIPVisionModelWithProjection`.
"""
