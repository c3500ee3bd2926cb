"""The pack's reference teacher: a narrow FLUX (ComfyUI's own ``Flux`` class) that works in pixel space.

No FLUX or Qwen-Image weights can be shipped, so the pack ships its own small flow-matching model, trained
by ``python -m devtools.train_reference`` on scenes of coloured shapes drawn in code (``glance_core.scenes``).
Every Glance / ArcFlow code path runs on it unchanged, because it *is* a ComfyUI Flux model:

- the latent is the image itself (3 channels in [-1, 1]: ComfyUI's ``pixel_space`` VAE and the
  ChromaRadiance latent format), so no VAE weights are needed;
- the text encoder is a tiny learnt word embedding stored in the same file: a caption is a few words from
  the file's vocabulary (e.g. ``"a red circle left of a blue square"``), grouped into phrases when the file says
  so (``"a red circle" | "left of" | "a blue square"``, each phrase the sum of its words' vectors: one token per
  object, so a colour is bound to its shape before the model sees it; older files: one token per word), plus a
  learnt vector for each token's slot, their mean the pooled vector. Files may also say that a relation's objects
  take the slot of their side (``relation_slots``) and that a counted phrase is one token per object
  (``count_tokens``).

The file: diffusion-model tensors under FLUX's names, the embedding under ``text_embedding.weight`` and the
slot vectors under ``text_embedding.position``, and in the metadata the model config (``glance.reference.config``;
ComfyUI's own detection fills the rest), the vocabulary (``glance.reference.vocab``; word 0 is the empty caption,
used for CFG's negative) and training facts (``glance.reference.info``, with the context length).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .experts import GlanceError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
REFERENCE_NAME = "glance_reference_scenes.safetensors"
#: The guidance the reference teacher is sampled with (empty caption as negative). A trade: lower CFG follows the
#: prompt better (50-step score 0.73 / 0.72 seen / held-out at 5, 0.74 / 0.63 at 7, 0.70 / 0.55 at 8), higher CFG
#: bends the trajectories so that plain 10-step Euler lands clearly off the 50-step output (28.9, 26.6, 25.6 dB
#: held-out): 8 leaves few-step solvers room to be measured (``python -m bench.bench_teacher --cfg N --seeds 8``).
CFG = 8.0
META_CONFIG = "glance.reference.config"
META_VOCAB = "glance.reference.vocab"
META_INFO = "glance.reference.info"
TEXT_KEY = "text_embedding.weight"
POSITION_KEY = "text_embedding.position"
MAX_WORDS = 2

#: The shipped teacher's architecture: FLUX's double/single-stream blocks at width 128, 4×4-pixel patches.
CONFIG = dict(
    image_model="flux",
    in_channels=3,
    out_channels=3,
    vec_in_dim=32,
    context_in_dim=32,
    hidden_size=128,
    mlp_ratio=4.0,
    num_heads=4,
    depth=3,
    depth_single_blocks=3,
    axes_dim=[8, 12, 12],
    theta=10000,
    patch_size=4,
    qkv_bias=True,
    guidance_embed=False,
)


@functools.cache
def _model_config_class():
    import comfy.latent_formats
    import comfy.supported_models

    class Pixels(comfy.latent_formats.ChromaRadiance):
        """ComfyUI's pixel-space latent format, saying so: a latent pixel is an image pixel."""

        spacial_downscale_ratio = 1

    class PixelFlux(comfy.supported_models.Flux):
        """ComfyUI's FLUX config with the pixel-space (3-channel, identity) latent format."""

        latent_format = Pixels

    return PixelFlux


@dataclass
class Reference:
    """A loaded reference teacher: ComfyUI MODEL, the word embedding and its vocabulary."""

    model: object  # comfy.model_patcher.ModelPatcher
    embedding: torch.Tensor  # [V, context_in_dim]
    vocab: list[str]
    info: dict
    position: torch.Tensor | None = None  # [context_tokens, context_in_dim], added to the word vectors

    @property
    def context_tokens(self) -> int:
        if "context_tokens" in self.info or self.position is None:
            return int(self.info.get("context_tokens", MAX_WORDS))
        return len(self.position)

    @property
    def phrase_starts(self) -> tuple[str, ...] | None:
        starts = self.info.get("phrase_starts")
        return tuple(starts) if starts is not None else None

    @property
    def relation_slots(self) -> bool:
        return bool(self.info.get("relation_slots", False))

    @property
    def count_words(self) -> dict[str, int] | None:
        counts = self.info.get("count_tokens")
        return {str(w): int(n) for w, n in counts.items()} if counts else None

    @property
    def caption_format(self) -> CaptionFormat:
        return CaptionFormat(
            tuple(self.vocab), self.context_tokens, self.phrase_starts, self.relation_slots, self.count_words
        )

    def encode(self, caption: str) -> list:
        return self.caption_format.encode(self.embedding, self.position, caption)

    def example(self) -> str:
        return str(self.info.get("example_caption", " ".join(self.vocab[1:3])))


def tokens(vocab: Sequence[str], caption: str, example: str = "") -> list[int]:
    """Word indices of ``caption``; the empty caption is token 0. Unknown words are an error naming them."""
    words = caption.lower().replace(",", " ").split()
    index = {w: i for i, w in enumerate(vocab)}
    unknown = [w for w in words if w not in index]
    if unknown:
        raise GlanceError(
            f"The reference model does not know the word(s) {unknown}. Its captions are made of these words: "
            f"{', '.join(vocab[1:])}" + (f" (e.g. {example!r})." if example else ".")
        )
    return [index[w] for w in words] or [0]


def padded(vocab: Sequence[str], caption: str, length: int = MAX_WORDS) -> list[int]:
    """``tokens`` padded with the empty-caption token to the fixed context length the model was trained with."""
    ids = [i for i in tokens(vocab, caption) if i != 0]
    if len(ids) > length:
        raise GlanceError(
            f"Caption {caption!r} has {len(ids)} words; this reference model takes at most {length}. "
            "Shorten the caption."
        )
    return ids + [0] * (length - len(ids))


def groups(
    vocab: Sequence[str],
    caption: str,
    length: int = MAX_WORDS,
    phrase_starts: Sequence[str] | None = None,
    count_words: dict[str, int] | None = None,
) -> list[list[int]]:
    """The word indices of each context token of ``caption``, padded with the empty-caption token to the fixed
    context length the model was trained with: one word per token, or, with ``phrase_starts``, one phrase per token
    (a new phrase begins at each of those words, e.g. "a", "two", "and", "left"). With ``count_words``
    ({"two": 2, ...}) a counted phrase becomes that many one-object tokens: "three red circles" is read as three
    "a red circle" tokens, so the number of object tokens is the number of objects to draw."""
    if phrase_starts is None:
        return [[i] for i in padded(vocab, caption, length)]
    starts = set(phrase_starts)
    out: list[list[int]] = []
    for i in tokens(vocab, caption):
        if i == 0:
            continue
        if not out or vocab[i] in starts:
            out.append([i])
        else:
            out[-1].append(i)
    if count_words:
        out = [one for g in out for one in _counted(vocab, g, count_words)]
    if len(out) > length:
        raise GlanceError(
            f"Caption {caption!r} has {len(out)} phrases"
            + (" (a counted phrase is one per object)" if count_words else "")
            + f"; this reference model takes at most {length} (one or two objects and a relation, e.g. 'a red "
            "circle left of a blue square'). Shorten the caption."
        )
    return out + [[0]] * (length - len(out))


def _counted(vocab: Sequence[str], group: list[int], count_words: dict[str, int]) -> list[list[int]]:
    """``group`` as ``n`` one-object phrases when it starts with a count word ("two red circles" -> 2 × "a red
    circle": the number word becomes "a", a plural its singular), else unchanged."""
    n = count_words.get(vocab[group[0]])
    if n is None:
        return [group]
    index = {w: i for i, w in enumerate(vocab)}
    one = [index["a"]] + [index.get(vocab[i][:-1], i) if vocab[i].endswith("s") else i for i in group[1:]]
    return [list(one) for _ in range(n)]


#: Slot vectors after the positional ones, when the file has ``relation_slots``: an object in a relation takes the
#: slot of the side it is on ("a red circle left of a blue square": the circle "left", the square "right"), so the
#: model reads each object's place from its own token instead of combining three tokens.
RELATION_SLOTS = ("left", "right", "above", "below")
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def slots(vocab: Sequence[str], token_groups: list[list[int]], relation_slots: bool = False) -> list[int]:
    """The slot (row of the position vectors) of each context token: its place in the caption, or, with
    ``relation_slots``, for the two objects of a relation phrase, the side each one is on."""
    out = list(range(len(token_groups)))
    if relation_slots and len(token_groups) == 3:
        side = vocab[token_groups[1][0]]
        if side in _OPPOSITE:
            out[0] = len(token_groups) + RELATION_SLOTS.index(side)
            out[2] = len(token_groups) + RELATION_SLOTS.index(_OPPOSITE[side])
    return out


def context(embedding: torch.Tensor, token_groups: list[list[int]]) -> torch.Tensor:
    """[tokens, dim]: each token the sum of its words' vectors (differentiable: the training script uses it)."""
    return torch.stack([embedding[g].sum(0) for g in token_groups])


@dataclass(frozen=True)
class CaptionFormat:
    """How a file turns a caption into context tokens (``groups``, ``slots``). Every field is stored in the file
    (vocabulary and info), so the loader encodes a caption exactly as training did."""

    vocab: tuple[str, ...]
    length: int = MAX_WORDS
    phrase_starts: tuple[str, ...] | None = None
    relation_slots: bool = False
    count_words: dict[str, int] | None = None

    def context(self, embedding: torch.Tensor, position: torch.Tensor | None, caption: str) -> torch.Tensor:
        """[tokens, dim]: each token its words' vectors summed plus, when the file has them, its slot's vector
        (FLUX gives text tokens no position, and "a red circle left of a blue square" needs word order).
        Differentiable: the training script learns ``embedding`` and ``position`` through it."""
        token_groups = groups(self.vocab, caption, self.length, self.phrase_starts, self.count_words)
        ctx = context(embedding, token_groups)
        if position is not None:
            ctx = ctx + position[slots(self.vocab, token_groups, self.relation_slots)]
        return ctx

    def encode(self, embedding: torch.Tensor, position: torch.Tensor | None, caption: str) -> list:
        """ComfyUI CONDITIONING for ``caption`` (computed in float32), the tokens' mean as FLUX's pooled vector."""
        pos = None if position is None else position.to(torch.float32)
        ctx = self.context(embedding.to(torch.float32), pos, caption)
        return [[ctx.unsqueeze(0), {"pooled_output": ctx.mean(0, keepdim=True)}]]


def canonical_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The diffusion-model tensors under FLUX's file names (``*_norm.scale``), whichever names the running
    ComfyUI gives its RMSNorm parameters, so a file trained on one ComfyUI release loads on another."""
    return {(k[: -len(".weight")] + ".scale" if k.endswith("_norm.weight") else k): v for k, v in state_dict.items()}


def _skeleton(config: dict) -> dict[str, torch.Tensor]:
    """The few tensors ComfyUI's model detection reads to recognise a FLUX, as shape-only (meta) tensors."""
    h, p = config["hidden_size"], config["patch_size"]
    sd = {
        "img_in.weight": torch.empty(h, config["in_channels"] * p * p, device="meta"),
        "txt_in.weight": torch.empty(h, config["context_in_dim"], device="meta"),
        "vector_in.in_layer.weight": torch.empty(h, config["vec_in_dim"], device="meta"),
    }
    for i in range(config["depth"]):
        sd[f"double_blocks.{i}.img_attn.norm.key_norm.scale"] = torch.empty(1, device="meta")
    for i in range(config["depth_single_blocks"]):
        sd[f"single_blocks.{i}.norm.key_norm.scale"] = torch.empty(1, device="meta")
    return sd


def unet_config(config: dict, state_dict: dict[str, torch.Tensor] | None = None, name: str = "") -> dict:
    """The FLUX config for this ComfyUI: its own detection (which fills the fields each release requires, e.g.
    ``txt_ids_dims`` since 0.33) on the weights, with the file's stored fields on top (detection assumes FLUX.1's
    head layout, rope axes and output channels, which the reference model does not have)."""
    import comfy.model_detection

    detected = comfy.model_detection.detect_unet_config(state_dict or _skeleton(config), "")
    if not detected or detected.get("image_model") != "flux":
        raise GlanceError(
            f"{name or 'The reference model'}: ComfyUI does not recognise its weights as a FLUX model. "
            "Re-create the file with python -m devtools.train_reference."
        )
    return {**detected, **config}


def build_model(
    config: dict, state_dict: dict[str, torch.Tensor] | None = None, device: str | None = None, name: str = ""
):
    """A ComfyUI ModelPatcher of the pixel-space FLUX with ``config`` (and weights, when given)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    mc = _model_config_class()(unet_config(config, state_dict, name))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    if state_dict is not None:
        sd = mc.process_unet_state_dict(dict(state_dict))  # FLUX file names → this ComfyUI's parameter names
        redo = "Re-create the file with python -m devtools.train_reference."
        try:
            missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # shapes that disagree with the stored config
            detail = str(e).split("\n\t")[1:2] or [str(e)[:200]]
            raise GlanceError(
                f"{name or 'The reference model file'} does not fit its config: {detail[0]} {redo}"
            ) from None
        if missing or unexpected:
            raise GlanceError(
                f"{name or 'The reference model file'} does not fit its config: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}. {redo}"
            )
    load_device = torch.device(device) if device else mm.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def _json(meta: dict, key: str, name: str, default: str | None = None):
    try:
        return json.loads(meta[key] if default is None else meta.get(key, default))
    except json.JSONDecodeError as e:
        raise GlanceError(
            f"{name}: the '{key}' metadata is not valid JSON ({e.msg} at character {e.pos}). The file is damaged or "
            "was edited; re-create it with python -m devtools.train_reference."
        ) from None


def load(path: str | Path) -> Reference:
    """Load a reference-teacher file written by ``devtools.train_reference``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    name = path.name
    if path.suffix != ".safetensors":
        raise GlanceError(f"{name}: only .safetensors files are loaded.")
    redo = "Download or copy it again, or re-create it with python -m devtools.train_reference."
    if not path.is_file():
        raise GlanceError(f"{name}: no such file ({path}). {redo}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if META_CONFIG not in meta or META_VOCAB not in meta:
                raise GlanceError(
                    f"{name} is not a Glance reference model (no '{META_CONFIG}' / '{META_VOCAB}' metadata). "
                    "Pick a reference model file (e.g. the shipped one) in model_name."
                )
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise GlanceError(f"{name} is not a readable .safetensors file (truncated or damaged: {e}). {redo}") from None
    config = _json(meta, META_CONFIG, name)
    vocab = _json(meta, META_VOCAB, name)
    info = _json(meta, META_INFO, name, "{}")
    if not isinstance(config, dict) or not isinstance(vocab, list) or not isinstance(info, dict):
        raise GlanceError(
            f"{name}: the reference metadata has the wrong types (config and info: objects, vocab: a list). {redo}"
        )
    needed = ("in_channels", "context_in_dim", "hidden_size", "patch_size", "depth", "depth_single_blocks")
    absent = [k for k in (*needed, "vec_in_dim") if k not in config]
    if absent:
        raise GlanceError(f"{name}: the '{META_CONFIG}' metadata lacks {absent}. {redo}")
    if TEXT_KEY not in sd:
        raise GlanceError(f"{name}: no '{TEXT_KEY}' tensor (the caption encoder). {redo}")
    embedding = sd.pop(TEXT_KEY)
    position = sd.pop(POSITION_KEY, None)
    if embedding.shape != (len(vocab), config["context_in_dim"]):
        raise GlanceError(
            f"{name}: {TEXT_KEY} has shape {tuple(embedding.shape)}, expected "
            f"({len(vocab)}, {config['context_in_dim']}). {redo}"
        )
    if position is not None and (position.ndim != 2 or position.shape[1] != config["context_in_dim"]):
        raise GlanceError(
            f"{name}: {POSITION_KEY} has shape {tuple(position.shape)}, "
            f"expected (N, {config['context_in_dim']}). {redo}"
        )
    return Reference(build_model(config, sd, name=name), embedding, vocab, info, position)


@functools.lru_cache(maxsize=2)
def load_cached(path: str, mtime: float) -> Reference:
    return load(path)
