"""The supported architectures, one entry each: everything the pack needs to know about a model family.

Looked up once per node call with :func:`of`; nothing else in the pack tests a model's class. Target layers are
diffusers names (the names the released recipes and LoRA files use); ComfyUI's own key maps turn them into its
modules. The official hyper-parameters are the released Glance training scripts' (PEFT rank/alpha, AdamW lr and
weight decay); FLUX's official script feeds guidance 1.0 while training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import GlanceError, schedules


@dataclass(frozen=True)
class Architecture:
    name: str  # "flux" / "qwen_image": the key in files' metadata and in this table
    label: str  # what users read
    model_class: str  # the comfy.model_base class
    preset: str  # the Slow/Fast Scheduler preset of the official Glance experts (its boundary is the loader's auto)
    presets: tuple[str, ...]  # every Slow/Fast Scheduler preset made for this family
    rank: int
    alpha: float
    learning_rate: float
    weight_decay: float
    train_guidance: float | None  # guidance fed while training (FLUX is guidance-distilled), None = no guidance input
    targets: dict[str, str] = field(default_factory=dict)  # preset → regex over diffusers Linear names
    norm_path: str = ""  # final adaptive norm's Linear (ArcFlow replaces it)
    proj_path: str = ""  # output projection (ArcFlow's heads replace it)
    # diffusers' AdaLayerNormContinuous emits (scale, shift); ComfyUI's FLUX LastLayer chunks (shift, scale).
    swap_scale_shift: bool = False

    def to_comfy_norm(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A final-norm weight/bias in diffusers order → this model's order (an involution: also the way back)."""
        if t is None or not self.swap_scale_shift:
            return t
        return torch.cat(t.chunk(2, 0)[::-1], 0)


ARCHITECTURES: dict[str, Architecture] = {
    "qwen_image": Architecture(
        name="qwen_image",
        label="Qwen-Image",
        model_class="QwenImage",
        preset="glance_qwen_image",
        presets=("glance_qwen_image", schedules.OFFICIAL_PRESET),
        rank=32,
        alpha=128.0,
        learning_rate=3e-4,
        weight_decay=0.0,
        train_guidance=None,
        targets={
            "official": r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0"
            r"|to_add_out)|img_mlp\.net\.2|txt_mlp\.net\.2|img_mod\.1|txt_mod\.1)",
            "attention": r"transformer_blocks\.\d+\.attn\..*",
            "all_linear": r"transformer_blocks\..*",
            "arcflow": r"transformer_blocks\.\d+\.(img_mlp|txt_mlp)\.net\.(0\.proj|2)"
            r"|time_text_embed\.timestep_embedder\.linear_[12]",
        },
        norm_path="diffusion_model.norm_out.linear",
        proj_path="diffusion_model.proj_out",
    ),
    "flux": Architecture(
        name="flux",
        label="FLUX",
        model_class="Flux",
        preset="glance_flux",
        presets=("glance_flux",),
        rank=16,
        alpha=64.0,
        learning_rate=5e-4,
        weight_decay=0.01,
        train_guidance=1.0,
        targets={
            "official": r"(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"
            r"|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v))",
            "attention": r"(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj"
            r"|add_v_proj|to_add_out)|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v))",
            "all_linear": r"(single_)?transformer_blocks\..*",
            "arcflow": r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
            r"|single_transformer_blocks\.\d+\.(proj_mlp|proj_out)|time_text_embed\.timestep_embedder\.linear_[12]",
        },
        norm_path="diffusion_model.final_layer.adaLN_modulation.1",
        proj_path="diffusion_model.final_layer.linear",
        swap_scale_shift=True,
    ),
}


def find(model) -> Architecture | None:
    """The entry of a ComfyUI ModelPatcher or BaseModel, or None. Qwen-Image is tested first: a class of
    another family may derive from Flux, never the other way round."""
    import comfy.model_base

    m = getattr(model, "model", model)
    for arch in ARCHITECTURES.values():
        cls = getattr(comfy.model_base, arch.model_class, None)
        if cls is not None and isinstance(m, cls):
            return arch
    return None


def for_preset(preset: str) -> Architecture | None:
    """The family a Slow/Fast Scheduler preset was made for (None for ``custom``)."""
    return next((a for a in ARCHITECTURES.values() if preset in a.presets), None)


def of(model, what: str) -> Architecture:
    """The entry of ``model``, or a GlanceError saying that ``what`` supports FLUX and Qwen-Image only."""
    arch = find(model)
    if arch is None:
        m = getattr(model, "model", model)
        raise GlanceError(
            f"{what} supports FLUX and Qwen-Image models; the connected model is {type(m).__name__}. "
            "Load FLUX.1 or Qwen-Image (e.g. with Load Diffusion Model)."
        )
    return arch
