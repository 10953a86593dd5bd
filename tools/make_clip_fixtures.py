"""Regenerate the golden CLIP fixtures in tests/fixtures/clip/ (needs torch + transformers).

The fixtures let the checkpoint tests prove parity with the reference implementation on a
machine without torch: each file is a tiny random CLIP written the way the real releases are
written, and `reference.npz` holds what transformers computes from those weights.

    python tools/make_clip_fixtures.py [--out tests/fixtures/clip]

What is written (all formats of one model share exactly the same weights, so one reference
serves them all):

  tiny/hf_clip/{model.safetensors,config.json}   HF CLIPModel (vision + text), float32
  tiny/hf_vision/{model.safetensors,config.json} HF CLIPVisionModel, bfloat16
  tiny/openai.pt                                  OpenAI-style TorchScript archive, float16
  tiny/open_clip/{open_clip_pytorch_model.bin,open_clip_config.json}
                                                  open_clip state dict (torch.save zip), float16
  l14/model.safetensors                           HF CLIPVisionModel (transformers-4 style
                                                  `vision_model.` keys) with L/14's patch (14)
                                                  and head width (64), no config.json: heads
                                                  are inferred (width // 64), float16
  reference.npz                                   inputs and transformers' outputs

Weights are rounded to values that bf16 and fp16 both represent exactly, so storing them in
any of the three dtypes is lossless and every format must reproduce the float32 reference.
The OpenAI-style module below uses OpenAI CLIP's module names and forward pass (model.py of
github.com/openai/CLIP); the script checks that it agrees with transformers before writing.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import warnings
from collections import OrderedDict

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from torch import nn

TINY_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=256, patch_size=8, image_size=32)
TINY_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, vocab_size=100, max_position_embeddings=8,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
L14_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                  intermediate_size=256, patch_size=14, image_size=42)
PROJ_DIM = 32
RESAMPLED_SIZE = 48  # tiny model evaluated at 48 px (6x6 grid from the 4x4 table)


# --- OpenAI CLIP's modules (names and forward as in openai/CLIP clip/model.py) -------------

class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.type(torch.float32)).type(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, mlp_dim: int, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, mlp_dim)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(mlp_dim, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask

    def attention(self, x):
        mask = self.attn_mask.to(dtype=x.dtype, device=x.device) if self.attn_mask is not None \
            else None
        return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_dim, attn_mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, mlp_dim, attn_mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, image_size, patch_size, width, layers, heads, mlp_dim, output_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn((image_size // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_dim)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(
            x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class OpenAICLIP(nn.Module):
    def __init__(self, v: dict, t: dict, embed_dim: int):
        super().__init__()
        self.visual = VisionTransformer(v["image_size"], v["patch_size"], v["hidden_size"],
                                        v["num_hidden_layers"], v["num_attention_heads"],
                                        v["intermediate_size"], embed_dim)
        ctx = t["max_position_embeddings"]
        mask = torch.full((ctx, ctx), float("-inf")).triu_(1)
        self.transformer = Transformer(t["hidden_size"], t["num_hidden_layers"],
                                       t["num_attention_heads"], t["intermediate_size"], mask)
        self.token_embedding = nn.Embedding(t["vocab_size"], t["hidden_size"])
        self.positional_embedding = nn.Parameter(torch.empty(ctx, t["hidden_size"]))
        self.ln_final = LayerNorm(t["hidden_size"])
        self.text_projection = nn.Parameter(torch.empty(t["hidden_size"], embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

    def encode_image(self, image):
        return self.visual(image)

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image, text):
        img = self.encode_image(image)
        txt = self.encode_text(text)
        img = img / img.norm(dim=1, keepdim=True)
        txt = txt / txt.norm(dim=1, keepdim=True)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()


# --- weights ----------------------------------------------------------------------------

def _round_to_common_grid(t: torch.Tensor) -> torch.Tensor:
    """bf16-round, then flush magnitudes fp16 would store as subnormals (lossless in both)."""
    t = t.to(torch.bfloat16).to(torch.float32)
    return torch.where(t.abs() < 2.0**-14, torch.zeros_like(t), t)


def _randomise(model: nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (HF init leaves LayerNorms at 1/0 and biases at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 0:  # logit_scale
                continue
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                p.copy_((1.0 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif "class_embedding" in name or "position_embedding" in name:
                p.copy_(0.5 * noise)
            else:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else p.shape[0]
                p.copy_(noise * fan_in**-0.5)
            p.copy_(_round_to_common_grid(p))


def _hf_to_openai_vision(sd: dict, layers: int) -> dict:
    """HF CLIP vision keys -> OpenAI `visual.*` keys (the inverse of HF's conversion script)."""
    out = {
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
    }
    if "visual_projection.weight" in sd:
        out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    for i in range(layers):
        out.update(_hf_to_openai_block(sd, f"vision_model.encoder.layers.{i}.",
                                       f"visual.transformer.resblocks.{i}."))
    return out


def _hf_to_openai_block(sd: dict, src: str, dst: str) -> dict:
    a = src + "self_attn."
    return {
        dst + "ln_1.weight": sd[src + "layer_norm1.weight"],
        dst + "ln_1.bias": sd[src + "layer_norm1.bias"],
        dst + "attn.in_proj_weight": torch.cat(
            [sd[a + f"{n}_proj.weight"] for n in "qkv"], 0),
        dst + "attn.in_proj_bias": torch.cat([sd[a + f"{n}_proj.bias"] for n in "qkv"], 0),
        dst + "attn.out_proj.weight": sd[a + "out_proj.weight"],
        dst + "attn.out_proj.bias": sd[a + "out_proj.bias"],
        dst + "ln_2.weight": sd[src + "layer_norm2.weight"],
        dst + "ln_2.bias": sd[src + "layer_norm2.bias"],
        dst + "mlp.c_fc.weight": sd[src + "mlp.fc1.weight"],
        dst + "mlp.c_fc.bias": sd[src + "mlp.fc1.bias"],
        dst + "mlp.c_proj.weight": sd[src + "mlp.fc2.weight"],
        dst + "mlp.c_proj.bias": sd[src + "mlp.fc2.bias"],
    }


def _hf_to_openai(sd: dict, v: dict, t: dict) -> dict:
    out = _hf_to_openai_vision(sd, v["num_hidden_layers"])
    out.update({
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T.contiguous(),
        "logit_scale": sd["logit_scale"],
    })
    for i in range(t["num_hidden_layers"]):
        out.update(_hf_to_openai_block(sd, f"text_model.encoder.layers.{i}.",
                                       f"transformer.resblocks.{i}."))
    return out


def _check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 2e-5) -> None:
    err = (got - want).abs().max().item()
    if err > tol:
        raise AssertionError(f"{name}: max abs err {err:.2e} > {tol}")
    print(f"  {name}: max abs err {err:.1e}")


def _images(seed: int, n: int, size: int) -> np.ndarray:
    """NHWC float32, roughly CLIP-normalised."""
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def make(out: pathlib.Path) -> None:
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    ref: dict[str, np.ndarray] = {}

    # ---- tiny CLIP in four formats ----
    cfg = transformers.CLIPConfig(
        text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=PROJ_DIM)
    clip = transformers.CLIPModel(cfg).eval()
    _randomise(clip, seed=1)
    sd = {k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()}

    x = _images(10, 2, TINY_VISION["image_size"])
    x48 = _images(11, 2, RESAMPLED_SIZE)
    with torch.no_grad():
        pooled = clip.vision_model(pixel_values=_nchw(x)).pooler_output
        embeds = clip.get_image_features(pixel_values=_nchw(x)).pooler_output
        pooled48 = clip.vision_model(pixel_values=_nchw(x48),
                                     interpolate_pos_encoding=True).pooler_output
    ref.update(tiny_images=x, tiny_pooled=pooled.numpy(), tiny_embeds=embeds.numpy(),
               tiny_images_48=x48, tiny_pooled_48=pooled48.numpy())

    d = out / "tiny" / "hf_clip"
    d.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(d, safe_serialization=True)  # config.json + model.safetensors
    for extra in d.iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()

    vision = transformers.CLIPVisionModel(cfg.vision_config).eval()
    # transformers 5 saves CLIPVisionModel without the `vision_model.` prefix that hub files
    # written by transformers 4 carry; the loader accepts both (l14/ below has the prefix).
    vision.load_state_dict({k.removeprefix("vision_model."): v for k, v in sd.items()
                            if k.startswith("vision_model.")}, strict=True)
    with torch.no_grad():
        _check("CLIPVisionModel == CLIPModel.vision_model",
               vision(pixel_values=_nchw(x)).pooler_output, pooled, 0.0)
    d = out / "tiny" / "hf_vision"
    d.mkdir(parents=True, exist_ok=True)
    vision.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
    for extra in d.iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()

    # OpenAI-style module with the same weights; must agree with transformers.
    oa = OpenAICLIP(TINY_VISION, TINY_TEXT, PROJ_DIM).eval()
    oa_sd = _hf_to_openai(sd, TINY_VISION, TINY_TEXT)
    oa.load_state_dict(oa_sd, strict=True)
    with torch.no_grad():
        _check("OpenAI-style module == transformers (projected)", oa.encode_image(_nchw(x)),
               embeds)
    # OpenAI ships fp16 TorchScript archives made with torch.jit.script/trace + save.
    text = torch.randint(0, TINY_TEXT["vocab_size"], (2, TINY_TEXT["max_position_embeddings"]))
    with warnings.catch_warnings():  # tracer chatter about MultiheadAttention's checks
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(oa, (_nchw(x), text)).half()
        torch.jit.save(traced, str(out / "tiny" / "openai.pt"))
    back = torch.jit.load(str(out / "tiny" / "openai.pt"))
    with torch.no_grad():
        _check("TorchScript fp16 archive round trip (weights)",
               back.visual.proj.float(), oa.visual.proj.float(), 0.0)
    assert back.visual.proj.dtype == torch.float16

    # open_clip: a plain state dict with OpenAI names, saved with torch.save (zip format).
    d = out / "tiny" / "open_clip"
    d.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in oa_sd.items()}, d / "open_clip_pytorch_model.bin")
    (d / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {
            "embed_dim": PROJ_DIM, "quick_gelu": True,
            "vision_cfg": {"image_size": TINY_VISION["image_size"],
                           "layers": TINY_VISION["num_hidden_layers"],
                           "width": TINY_VISION["hidden_size"],
                           "head_width": TINY_VISION["hidden_size"]
                           // TINY_VISION["num_attention_heads"],
                           "patch_size": TINY_VISION["patch_size"]},
            "text_cfg": {"context_length": TINY_TEXT["max_position_embeddings"],
                         "vocab_size": TINY_TEXT["vocab_size"],
                         "width": TINY_TEXT["hidden_size"],
                         "heads": TINY_TEXT["num_attention_heads"],
                         "layers": TINY_TEXT["num_hidden_layers"]},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]},
    }, indent=2) + "\n")

    # ---- L/14 geometry: patch 14, head width 64, 42 px, no config.json ----
    vcfg = transformers.CLIPVisionConfig(**L14_VISION)
    l14 = transformers.CLIPVisionModel(vcfg).eval()
    _randomise(l14, seed=2)
    x42 = _images(12, 2, L14_VISION["image_size"])
    with torch.no_grad():
        ref.update(l14_images=x42, l14_pooled=l14(pixel_values=_nchw(x42)).pooler_output.numpy())
    d = out / "l14"
    d.mkdir(parents=True, exist_ok=True)
    save_file({"vision_model." + k: v.detach().half().contiguous()
               for k, v in l14.state_dict().items()},
              str(d / "model.safetensors"), metadata={"format": "pt"})

    np.savez_compressed(out / "reference.npz", **ref)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path,
                    default=pathlib.Path(__file__).resolve().parents[1] / "tests/fixtures/clip")
    make(ap.parse_args().out)


if __name__ == "__main__":
    main()
