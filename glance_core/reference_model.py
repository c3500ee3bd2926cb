"""The pack's reference teacher: a narrow FLUX (ComfyUI's own ``Flux`` class) that works in pixel space.

No FLUX or Qwen-Image weights can be shipped, so the pack ships its own small flow-matching model, trained
by ``python -m devtools.train_reference`` on photographs bundled with scikit-image. Every Glance / ArcFlow code
path runs on it unchanged, because it *is* a ComfyUI Flux model:

- the latent is the image itself (3 channels in [-1, 1]: ComfyUI's ``pixel_space`` VAE and the
  ChromaRadiance latent format), so no VAE weights are needed;
- the text encoder is a tiny learnt word embedding stored in the same file: a caption is a few words from
  the file's vocabulary (e.g. ``"coffee close"``), each word one context token, their mean the pooled vector.

The file: diffusion-model tensors under their ComfyUI names, the embedding under ``text_embedding.weight``,
and in the metadata the model config (``glance.reference.config``) and the vocabulary
(``glance.reference.vocab``; word 0 is the empty caption, used for CFG's negative).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .experts import GlanceError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
REFERENCE_NAME = "glance_reference_photos.safetensors"
META_CONFIG = "glance.reference.config"
META_VOCAB = "glance.reference.vocab"
META_INFO = "glance.reference.info"
TEXT_KEY = "text_embedding.weight"
MAX_WORDS = 2

#: The shipped teacher's architecture: FLUX's double/single-stream blocks at width 96, 4×4-pixel patches.
CONFIG = dict(
    image_model="flux",
    in_channels=3,
    out_channels=3,
    vec_in_dim=32,
    context_in_dim=32,
    hidden_size=96,
    mlp_ratio=4.0,
    num_heads=4,
    depth=2,
    depth_single_blocks=2,
    axes_dim=[4, 10, 10],
    theta=10000,
    patch_size=4,
    qkv_bias=True,
    guidance_embed=False,
)


@functools.cache
def _model_config_class():
    import comfy.latent_formats
    import comfy.supported_models

    class PixelFlux(comfy.supported_models.Flux):
        """ComfyUI's FLUX config with the pixel-space (3-channel, identity) latent format."""

        latent_format = comfy.latent_formats.ChromaRadiance

    return PixelFlux


@dataclass
class Reference:
    """A loaded reference teacher: ComfyUI MODEL, the word embedding and its vocabulary."""

    model: object  # comfy.model_patcher.ModelPatcher
    embedding: torch.Tensor  # [V, context_in_dim]
    vocab: list[str]
    info: dict

    def encode(self, caption: str) -> list:
        return encode(self.embedding, self.vocab, caption)


def tokens(vocab: list[str], caption: str) -> list[int]:
    """Word indices of ``caption``; the empty caption is token 0. Unknown words are an error naming them."""
    words = caption.lower().replace(",", " ").split()
    index = {w: i for i, w in enumerate(vocab)}
    unknown = [w for w in words if w not in index]
    if unknown:
        raise GlanceError(
            f"The reference model does not know the word(s) {unknown}. Its captions are made of these words: "
            f"{', '.join(vocab[1:])} (e.g. 'coffee close')."
        )
    return [index[w] for w in words] or [0]


def padded(vocab: list[str], caption: str, length: int = MAX_WORDS) -> list[int]:
    """``tokens`` padded with the empty-caption token to the fixed context length the model was trained with."""
    ids = [i for i in tokens(vocab, caption) if i != 0]
    if len(ids) > length:
        raise GlanceError(
            f"Caption {caption!r} has {len(ids)} words; the reference model takes at most {length} "
            f"(a subject and a framing word, e.g. 'coffee close')."
        )
    return ids + [0] * (length - len(ids))


def encode(embedding: torch.Tensor, vocab: list[str], caption: str) -> list:
    """ComfyUI CONDITIONING for ``caption``: one context token per word (padded with the empty-caption token),
    their mean as FLUX's pooled vector."""
    ctx = embedding[padded(vocab, caption)].to(torch.float32)
    return [[ctx.unsqueeze(0), {"pooled_output": ctx.mean(0, keepdim=True)}]]


def build_model(config: dict, state_dict: dict[str, torch.Tensor] | None = None, device: str | None = None):
    """A ComfyUI ModelPatcher of the pixel-space FLUX with ``config`` (and weights, when given)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    mc = _model_config_class()(dict(config))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    if state_dict is not None:
        missing, unexpected = model.diffusion_model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise GlanceError(
                f"The reference model file does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}."
            )
    load_device = torch.device(device) if device else mm.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def load(path: str | Path) -> Reference:
    """Load a reference-teacher file written by ``devtools.train_reference``."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise GlanceError(f"{path.name}: only .safetensors files are loaded.")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if META_CONFIG not in meta or META_VOCAB not in meta:
            raise GlanceError(
                f"{path.name} is not a Glance reference model (no '{META_CONFIG}' / '{META_VOCAB}' metadata)."
            )
        sd = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta[META_CONFIG])
    vocab = json.loads(meta[META_VOCAB])
    embedding = sd.pop(TEXT_KEY)
    if embedding.shape != (len(vocab), config["context_in_dim"]):
        raise GlanceError(
            f"{path.name}: {TEXT_KEY} has shape {tuple(embedding.shape)}, expected "
            f"({len(vocab)}, {config['context_in_dim']})."
        )
    return Reference(build_model(config, sd), embedding, vocab, json.loads(meta.get(META_INFO, "{}")))


@functools.lru_cache(maxsize=2)
def load_cached(path: str, mtime: float) -> Reference:
    return load(path)
