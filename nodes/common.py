"""Small helpers shared by the node wrappers."""

from __future__ import annotations

import math

import comfy.model_sampling
from comfy_api.latest import io

from ..glance_core import GlanceError

CATEGORY = "Glance"


def require_flow_model(model, node: str):
    """The model's sampling object, or a clear error when the model is not a flow model."""
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, comfy.model_sampling.CONST):
        raise GlanceError(
            f"{node} needs a flow-matching model (FLUX.1, Qwen-Image, SD3, Wan…); the connected "
            f"{type(model.model).__name__} model is not one (its sampling is "
            f"{' + '.join(b.__name__ for b in type(ms).__bases__)}). Connect a flow model."
        )
    return ms


def guidance_inputs(negative_tip: str, cfg_tip: str) -> list:
    """Optional negative conditioning + CFG scale (teacher guidance for the trainers)."""
    return [
        io.Conditioning.Input("negative", optional=True, tooltip=negative_tip),
        io.Float.Input("cfg", default=1.0, min=1.0, max=30.0, step=0.1, optional=True, tooltip=cfg_tip),
    ]


def caption_inputs(prefix: str = "") -> list:
    """Optional text encoder + extra captions, one per line."""
    return [
        io.Clip.Input("clip", optional=True, tooltip=f"{prefix}text encoder for the extra captions."),
        io.String.Input(
            "captions",
            default="",
            multiline=True,
            optional=True,
            tooltip=f"{prefix}more captions, one per line (needs clip). More captions transfer better "
            "to unseen prompts.",
        ),
    ]


def save_inputs(files: str) -> list:
    """Optional file name in models/loras + overwrite switch."""
    return [
        io.String.Input(
            "save_name", default="", optional=True, tooltip=f"If set, saves {files} in models/loras (atomic write)."
        ),
        io.Boolean.Input(
            "overwrite",
            default=False,
            optional=True,
            tooltip="Allow replacing existing files of the same name (otherwise an error).",
        ),
    ]


def progress_text(text: str, node_id: str | None) -> None:
    try:
        from server import PromptServer

        if PromptServer.instance is not None and node_id is not None:
            PromptServer.instance.sendprogress_text(text, node_id)
    except (ImportError, AttributeError):
        pass


def check_choice(name: str, value, options: list[str]) -> None:
    """ComfyUI 0.3.75 does not check combo values against their lists; the node does."""
    if value not in options:
        raise GlanceError(f"{name} {value!r} is not one of {', '.join(map(repr, options))}: pick one of these.")


def check_at_least(**values: tuple[int, int]) -> None:
    """Integer inputs below their minimum (ComfyUI's server refuses them; a script or an older front end may not)."""
    for name, (v, low) in values.items():
        if v < low:
            raise GlanceError(f"{name} is {v}: it must be at least {low}.")


def check_finite(**values: float) -> None:
    """NaN passes ComfyUI's min/max check (every comparison with NaN is False); refuse it and ±inf by name."""
    for name, v in values.items():
        if v is not None and not math.isfinite(float(v)):
            raise GlanceError(f"{name} must be a finite number (got {v}): set a value in its range.")
