"""Write the shipped UI workflows (workflows/*.json) from compact descriptions.

    .venv/bin/python -m devtools.make_workflows

Uses a real headless ComfyUI's /object_info for widget order and output types, so the files
match what the frontend would save.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from . import comfy_env
from .server import ComfyServer
from .workflow import Graph, Node, build_ui

WORKFLOWS = comfy_env.REPO / "workflows"
PACK = ("comfyui-glance", "0.1.0")
PACK_NODES = (
    "SlowFastScheduler",
    "PhaseAwareLoRALoader",
    "GlanceQwenNormCFG",
    "OneShotTrainer",
    "ArcFlowSampler",
    "ArcFlowLoader",
    "ArcFlowDistiller",
)
PROMPT = "a red fox sitting in fresh snow at golden hour, detailed fur, shallow depth of field"
X = [0, 400, 800, 1200, 1600]


def _sampling_tail(
    g: Graph, guider: Node, sigmas: tuple[Node, int], vae: Node, prefix: str, x: int, arcflow: bool = False
) -> None:
    noise = g.add(Node(20, "RandomNoise", (x, 0), {"noise_seed": 42}, size=(300, 90)))
    if arcflow:
        sampler = g.add(Node(21, "ArcFlowSampler", (x, 130), size=(300, 40)))
    else:
        sampler = g.add(Node(21, "KSamplerSelect", (x, 130), {"sampler_name": "euler"}, size=(300, 60)))
    latent = g.add(
        Node(22, "EmptySD3LatentImage", (x, 230), {"width": 1024, "height": 1024, "batch_size": 1}, size=(300, 110))
    )
    run = g.add(Node(23, "SamplerCustomAdvanced", (x + 340, 0), size=(280, 110)))
    decode = g.add(Node(24, "VAEDecode", (x + 340, 200), size=(220, 50)))
    save = g.add(Node(25, "SaveImage", (x + 340, 300), {"filename_prefix": prefix}, size=(400, 420)))
    g.link(noise, 0, run, "noise")
    g.link(guider, 0, run, "guider")
    g.link(sampler, 0, run, "sampler")
    g.link(sigmas[0], sigmas[1], run, "sigmas")
    g.link(latent, 0, run, "latent_image")
    g.link(run, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    g.link(decode, 0, save, "images")


def _flux_loaders(g: Graph) -> tuple[Node, Node, Node]:
    unet = g.add(
        Node(
            1,
            "UNETLoader",
            (X[0], 0),
            {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"},
            size=(340, 90),
        )
    )
    clip = g.add(
        Node(
            2,
            "DualCLIPLoader",
            (X[0], 140),
            {
                "clip_name1": "clip_l.safetensors",
                "clip_name2": "t5xxl_fp16.safetensors",
                "type": "flux",
                "device": "default",
            },
            size=(340, 130),
        )
    )
    vae = g.add(Node(3, "VAELoader", (X[0], 320), {"vae_name": "ae.safetensors"}, size=(340, 60)))
    text = g.add(Node(4, "CLIPTextEncode", (X[1], 300), {"text": PROMPT}, title="Prompt", size=(360, 140)))
    g.link(clip, 0, text, "clip")
    flux_g = g.add(Node(5, "FluxGuidance", (X[1], 480), {"guidance": 3.5}, size=(300, 60)))
    g.link(text, 0, flux_g, "conditioning")
    return unet, vae, flux_g


def _glance_nodes(g: Graph, unet: Node, preset: str, shift_terminal: float, lora_prefix: str) -> tuple[Node, Node]:
    """The Slow/Fast Scheduler and the Phase-Aware LoRA Loader of a Glance graph, wired to ``unet``."""
    sched = g.add(
        Node(
            6,
            "SlowFastScheduler",
            (X[1], 0),
            {
                "preset": preset,
                "base_steps": 50,
                "slow_steps": 5,
                "slow_stride": 2,
                "fast_steps": 5,
                "shift_terminal": shift_terminal,
            },
            size=(340, 230),
        )
    )
    lora = g.add(
        Node(
            7,
            "PhaseAwareLoRALoader",
            (X[2], 0),
            {
                "slow_lora": f"{lora_prefix}_slow.safetensors",
                "fast_lora": f"{lora_prefix}_fast.safetensors",
                "slow_strength": 1.0,
                "fast_strength": 1.0,
                "boundary_sigma": 0.9,
            },
            size=(360, 200),
        )
    )
    g.link(unet, 0, sched, "model")
    g.link(unet, 0, lora, "model")
    g.link(sched, 1, lora, "boundary_sigma")
    return sched, lora


def glance_flux() -> Graph:
    g = Graph()
    unet, vae, cond = _flux_loaders(g)
    sched, lora = _glance_nodes(g, unet, "glance_flux", 0.0, "glance_flux")
    guider = g.add(Node(8, "BasicGuider", (X[2], 260), size=(240, 50)))
    g.link(lora, 0, guider, "model")
    g.link(cond, 0, guider, "conditioning")
    _sampling_tail(g, guider, (sched, 0), vae, "glance_flux_10step", X[3])
    g.add(
        Node(
            30,
            "Note",
            (X[0], 440),
            size=(340, 260),
            text=(
                "Glance FLUX.1 in 10 model evaluations (5 Slow + 5 Fast).\n\n"
                "Slow/Fast Scheduler gives the official Glance FLUX sigmas and the boundary between the phases; the "
                "Phase-Aware LoRA Loader runs the Slow LoRA above that sigma and the Fast LoRA below it, "
                "in ONE sampling run.\n\n"
                "Put the two LoRAs in models/loras (train them with OneShotTrainer). "
                "Compare with flux_base_50step.json "
                "(same seed, 50 evaluations)."
            ),
        )
    )
    return g


def flux_base() -> Graph:
    g = Graph()
    unet, vae, cond = _flux_loaders(g)
    sched = g.add(
        Node(6, "BasicScheduler", (X[1], 0), {"scheduler": "simple", "steps": 50, "denoise": 1.0}, size=(300, 110))
    )
    g.link(unet, 0, sched, "model")
    guider = g.add(Node(8, "BasicGuider", (X[2], 260), size=(240, 50)))
    g.link(unet, 0, guider, "model")
    g.link(cond, 0, guider, "conditioning")
    _sampling_tail(g, guider, (sched, 0), vae, "flux_base_50step", X[3])
    g.add(
        Node(
            30,
            "Note",
            (X[0], 440),
            size=(340, 200),
            text=(
                "The base model with 50 Euler steps: the reference Glance accelerates. Same prompt, seed and size as "
                "glance_flux_10step.json, so the two images can be compared directly."
            ),
        )
    )
    return g


def _qwen_loaders(g: Graph) -> tuple[Node, Node, Node]:
    unet = g.add(
        Node(
            1,
            "UNETLoader",
            (X[0], 0),
            {"unet_name": "qwen_image_bf16.safetensors", "weight_dtype": "default"},
            size=(340, 90),
        )
    )
    clip = g.add(
        Node(
            2,
            "CLIPLoader",
            (X[0], 140),
            {"clip_name": "qwen_2.5_vl_7b.safetensors", "type": "qwen_image", "device": "default"},
            size=(340, 110),
        )
    )
    vae = g.add(Node(3, "VAELoader", (X[0], 300), {"vae_name": "qwen_image_vae.safetensors"}, size=(340, 60)))
    return unet, clip, vae


def glance_qwen() -> Graph:
    g = Graph()
    unet, clip, vae = _qwen_loaders(g)
    pos = g.add(Node(4, "CLIPTextEncode", (X[1], 300), {"text": PROMPT}, title="Prompt", size=(360, 140)))
    neg = g.add(
        Node(5, "CLIPTextEncode", (X[1], 480), {"text": " "}, title="Negative prompt (official: ' ')", size=(360, 100))
    )
    g.link(clip, 0, pos, "clip")
    g.link(clip, 0, neg, "clip")
    sched, lora = _glance_nodes(g, unet, "glance_qwen_image", 0.02, "glance_qwen")
    norm = g.add(Node(9, "GlanceQwenNormCFG", (X[2], 250), size=(300, 50)))
    g.link(lora, 0, norm, "model")
    guider = g.add(Node(8, "CFGGuider", (X[2], 340), {"cfg": 5.0}, size=(300, 100)))
    g.link(norm, 0, guider, "model")
    g.link(pos, 0, guider, "positive")
    g.link(neg, 0, guider, "negative")
    _sampling_tail(g, guider, (sched, 0), vae, "glance_qwen_image_10step", X[3])
    g.add(
        Node(
            30,
            "Note",
            (X[0], 420),
            size=(340, 280),
            text=(
                "Glance Qwen-Image in 10 steps with true CFG 5 (20 model evaluations instead of 100), as the official "
                "pipeline: Slow LoRA on the first 5 sigmas, Fast LoRA on the last 5, negative prompt ' ', and Qwen's "
                "norm-rescaled CFG.\n\nThe official files glance_qwen_slow/fast.safetensors carry no alpha: "
                "strength 1.0 "
                "reproduces the official inference."
            ),
        )
    )
    return g


def glance_train_flux() -> Graph:
    g = Graph()
    unet, vae, cond = _flux_loaders(g)
    image = g.add(Node(9, "LoadImage", (X[0], 760), {"image": "example.png"}, size=(340, 360)))
    sched = g.add(
        Node(
            6,
            "SlowFastScheduler",
            (X[1], 0),
            {
                "preset": "glance_flux",
                "base_steps": 50,
                "slow_steps": 5,
                "slow_stride": 2,
                "fast_steps": 5,
                "shift_terminal": 0.0,
            },
            size=(340, 230),
        )
    )
    g.link(unet, 0, sched, "model")
    trainer = g.add(
        Node(
            10,
            "OneShotTrainer",
            (X[2], 0),
            {
                "objective": "official",
                "expert": "both",
                "steps": 60,
                "rank": 0,
                "alpha": 0.0,
                "learning_rate": 0.0,
                "seed": 0,
                "target_layers": "official",
                "batch": 1,
                "resolution": 1024,
                "boundary_sigma": 0.9,
                "cfg": 1.0,
                "noises": 8,
                "teacher_steps": 50,
                "student_mix": 0.0,
                "captions": "",
                "save_name": "",
                "overwrite": False,
            },
            size=(380, 620),
        )
    )
    g.link(unet, 0, trainer, "model")
    g.link(cond, 0, trainer, "positive")
    g.link(image, 0, trainer, "image")
    g.link(vae, 0, trainer, "vae")
    g.link(sched, 0, trainer, "sigmas")
    g.link(sched, 1, trainer, "boundary_sigma")
    curve = g.add(Node(11, "PreviewImage", (X[2], 680), size=(380, 300), title="Loss curve"))
    g.link(trainer, 3, curve, "images")
    guider = g.add(Node(8, "BasicGuider", (X[3] - 180, 680), size=(240, 50)))
    g.link(trainer, 2, guider, "model")
    g.link(cond, 0, guider, "conditioning")
    _sampling_tail(g, guider, (sched, 0), vae, "glance_flux_oneshot", X[3])
    g.add(
        Node(
            30,
            "Note",
            (X[0], 1160),
            size=(340, 300),
            text=(
                "Train the Glance Slow and Fast LoRAs from ONE image, then sample with them in 10 steps.\n\n"
                "Load your image, describe it in the prompt, queue. The One-Shot Trainer trains both experts on the "
                "model already loaded (official recipe: 60 steps each) and outputs the model with them applied; the "
                "loss curve shows in the preview. Set save_name to keep the LoRAs in models/loras. "
                "Try objective 'trajectory' (no image needed; add captions, one per line, with the clip input) "
                "for better few-step fidelity."
            ),
        )
    )
    return g


def arcflow_graph(arch: str) -> Graph:
    g = Graph()
    if arch == "flux":
        unet, vae, cond = _flux_loaders(g)
        adapter = "arcflow_flux_2steps.safetensors"
    else:
        unet, clip, vae = _qwen_loaders(g)
        cond = g.add(Node(4, "CLIPTextEncode", (X[1], 300), {"text": PROMPT}, title="Prompt", size=(360, 140)))
        g.link(clip, 0, cond, "clip")
        adapter = "arcflow_qwen_2steps.safetensors"
    loader = g.add(
        Node(7, "ArcFlowLoader", (X[1], 0), {"adapter": adapter, "strength": 1.0, "shift": 3.2}, size=(340, 130))
    )
    g.link(unet, 0, loader, "model")
    sched = g.add(
        Node(
            6,
            "BasicScheduler",
            (X[2], 0),
            {"scheduler": "simple", "steps": 2, "denoise": 1.0},
            size=(300, 110),
            title="2 steps: sigmas 1.0, 0.7619, 0",
        )
    )
    g.link(loader, 0, sched, "model")
    guider = g.add(Node(8, "BasicGuider", (X[2], 160), size=(240, 50), title="BasicGuider (cfg 1)"))
    g.link(loader, 0, guider, "model")
    g.link(cond, 0, guider, "conditioning")
    _sampling_tail(g, guider, (sched, 0), vae, f"arcflow_{arch}_2step", X[3], arcflow=True)
    guidance = "FluxGuidance 3.5 (the adapters only work with it)" if arch == "flux" else "no CFG (distilled in)"
    g.add(
        Node(
            30,
            "Note",
            (X[0], 440),
            size=(340, 260),
            text=(
                f"ArcFlow {'FLUX.1' if arch == 'flux' else 'Qwen-Image'} in 2 model evaluations.\n\n"
                "ArcFlow Adapter Loader attaches the released adapter (LoRA + momentum heads) to the base model. "
                "BasicScheduler 'simple' with 2 steps on that model gives the official sigmas "
                "1.0, 0.7619, 0 (shift 3.2). "
                f"ArcFlow Sampler integrates each step in closed form. Guidance: {guidance}.\n\n"
                "Put the adapter (diffusion_pytorch_model.safetensors of ymyy307/ArcFlow, renamed) in models/loras, or "
                "distil your own with ArcFlow Distiller."
            ),
        )
    )
    return g


WORKFLOW_BUILDERS = {
    "arcflow_flux_2step": lambda: arcflow_graph("flux"),
    "arcflow_qwen_image_2step": lambda: arcflow_graph("qwen_image"),
    "glance_flux_train_one_image": glance_train_flux,
    "glance_flux_10step": glance_flux,
    "glance_qwen_image_10step": glance_qwen,
    "flux_base_50step": flux_base,
}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp), testkit=False) as srv:
        info = srv.object_info()
    cnr = {t: PACK for t in PACK_NODES}
    WORKFLOWS.mkdir(exist_ok=True)
    for name, builder in WORKFLOW_BUILDERS.items():
        ui = build_ui(builder(), info, cnr)
        (WORKFLOWS / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
        print("wrote", WORKFLOWS / f"{name}.json")


if __name__ == "__main__":
    main()
