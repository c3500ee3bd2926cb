"""Small helpers shared by the node wrappers."""

from __future__ import annotations

import comfy.model_sampling

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
