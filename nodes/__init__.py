"""ComfyUI V3 nodes of comfyui-glance: thin wrappers over ``glance_core``."""

from comfy_api.latest import ComfyExtension, io

from .arcflow import ArcFlowDistiller, ArcFlowLoader, ArcFlowSampler
from .guidance import QwenNormCFG
from .loader import PhaseAwareLoRALoader
from .official import GlanceOfficialSampler
from .reference import ReferenceLoader, ReferenceTextEncode
from .scheduler import SlowFastScheduler
from .trainer import OneShotTrainer


class GlanceExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            SlowFastScheduler,
            PhaseAwareLoRALoader,
            QwenNormCFG,
            GlanceOfficialSampler,
            OneShotTrainer,
            ArcFlowLoader,
            ArcFlowSampler,
            ArcFlowDistiller,
            ReferenceLoader,
            ReferenceTextEncode,
        ]


async def comfy_entrypoint() -> GlanceExtension:
    return GlanceExtension()
