"""Write the shipped UI workflows (workflows/*.json) from compact descriptions.

    .venv/bin/python -m devtools.make_workflows

Uses a real headless ComfyUI's /object_info for widget order and output types, so the files
match what the frontend would save.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from glance_core import scenes
from glance_core.reference_model import CFG as REF_CFG

from . import comfy_env
from .server import ComfyServer
from .workflow import Graph, Node, build_ui

WORKFLOWS = comfy_env.REPO / "workflows"
PACK = ("comfyui-glance", "0.1.0")
PACK_NODES = (
    "SlowFastScheduler",
    "PhaseAwareLoRALoader",
    "GlanceQwenNormCFG",
    "GlanceOfficialSampler",
    "OneShotTrainer",
    "ArcFlowSampler",
    "ArcFlowLoader",
    "ArcFlowDistiller",
    "GlanceReferenceLoader",
    "GlanceReferenceTextEncode",
)
PROMPT = "a red fox sitting in fresh snow at golden hour, detailed fur, shallow depth of field"
#: Columns of the layout: read-me note, models, prompt, method (Glance / training / ArcFlow), sampling.
X = [-440, 0, 420, 840, 1280, 1720]
COLORS = {"models": "#3f789e", "prompt": "#8A8", "method": "#a1309b", "sampling": "#b58b2a", "image": "#88A"}


def _note(g: Graph, node_id: int, pos: tuple[int, int], width: int, text: str, title: str | None = None) -> Node:
    """A Note node tall enough for ``text`` (about 7 px per character, 16 px per line)."""
    per_line = max(20, (width - 30) // 7)
    lines = sum(max(1, -(-len(par) // per_line)) for par in text.split("\n"))
    return g.add(Node(node_id, "Note", pos, size=(width, 40 + 16 * lines), title=title, text=text))


def _section(g: Graph, title: str, members: list[Node], note_id: int, text: str, color: str) -> Node:
    """A titled group around ``members`` and a Note explaining it, under the section's first column."""
    x0 = min(n.pos[0] for n in members)
    column = [n for n in members if n.pos[0] == x0]
    bottom = max(n.pos[1] + n.size[1] for n in column)
    note = _note(g, note_id, (x0, bottom + 60), max(n.size[0] for n in column), text, title=f"About: {title}")
    boxed = [*members, note]
    left = x0 - 20
    top = min(n.pos[1] for n in boxed) - 30 - 60  # node title bar, then the group's own title
    right = max(n.pos[0] + n.size[0] for n in boxed) + 20
    low = max(n.pos[1] + n.size[1] for n in boxed) + 20
    g.groups.append(
        {
            "id": len(g.groups) + 1,
            "title": title,
            "bounding": [left, top, right - left, low - top],
            "color": color,
            "font_size": 24,
            "flags": {},
        }
    )
    return note


def _sampling_tail(
    g: Graph,
    guider: Node,
    sigmas: tuple[Node, int],
    vae: Node,
    prefix: str,
    x: int,
    arcflow: bool = False,
    y: int = 0,
    extra: tuple[Node, ...] = (),
    official: bool = False,
) -> None:
    noise = g.add(Node(20, "RandomNoise", (x, y), {"noise_seed": 42}, size=(300, 90)))
    if arcflow:
        sampler = g.add(Node(21, "ArcFlowSampler", (x, y + 140), size=(300, 40)))
    elif official:
        sampler = g.add(Node(21, "GlanceOfficialSampler", (x, y + 140), size=(300, 40)))
    else:
        sampler = g.add(Node(21, "KSamplerSelect", (x, y + 140), {"sampler_name": "euler"}, size=(300, 60)))
    latent = g.add(
        Node(
            22,
            "EmptySD3LatentImage",
            (x, y + 250),
            {"width": 1024, "height": 1024, "batch_size": 1},
            size=(300, 110),
        )
    )
    run = g.add(Node(23, "SamplerCustomAdvanced", (x + 340, y), size=(280, 110)))
    decode = g.add(Node(24, "VAEDecode", (x + 340, y + 160), size=(220, 50)))
    save = g.add(Node(25, "SaveImage", (x + 340, y + 260), {"filename_prefix": prefix}, size=(400, 420)))
    g.link(noise, 0, run, "noise")
    g.link(guider, 0, run, "guider")
    g.link(sampler, 0, run, "sampler")
    g.link(sigmas[0], sigmas[1], run, "sigmas")
    g.link(latent, 0, run, "latent_image")
    g.link(run, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    g.link(decode, 0, save, "images")
    if arcflow:
        text = (
            "ArcFlow Sampler moves each step by the closed-form integral of the adapter's momentum velocities: "
            "2 model evaluations per image. (KSamplerSelect 'euler' lands on the same image.)\n\n"
        )
    elif official:
        text = (
            "Glance Official Sampler calls the model at each sigma above and moves the latent with the released "
            "pipelines' own step sizes (they follow the image size, as in the pipeline). It takes only the "
            "glance_qwen_image_official sigmas (or SplitSigmas parts of them).\n\n"
        )
    else:
        text = (
            "SamplerCustomAdvanced runs the sigmas above with euler; any sampler works (multistep samplers keep "
            "their history across the Slow/Fast switch). Do not put the sigmas through another scheduler.\n\n"
        )
    text += (
        "RandomNoise: the seed. EmptySD3LatentImage: the image size (the presets are made for 1024 x 1024). "
        f"Save Image writes output/{prefix}_*.png."
    )
    _section(g, "Sample and save", [*extra, noise, sampler, latent, run, decode, save], 44, text, COLORS["sampling"])


def _readme(g: Graph, text: str) -> None:
    _note(g, 30, (X[0], 0), 380, text, title="Read me")


def _flux_loaders(g: Graph, image: bool = False) -> tuple[Node, Node, Node]:
    unet = g.add(
        Node(
            1,
            "UNETLoader",
            (X[1], 0),
            {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"},
            size=(340, 90),
        )
    )
    clip = g.add(
        Node(
            2,
            "DualCLIPLoader",
            (X[1], 140),
            {
                "clip_name1": "clip_l.safetensors",
                "clip_name2": "t5xxl_fp16.safetensors",
                "type": "flux",
                "device": "default",
            },
            size=(340, 130),
        )
    )
    vae = g.add(Node(3, "VAELoader", (X[1], 320), {"vae_name": "ae.safetensors"}, size=(340, 60)))
    loaders_note = _section(
        g,
        "Models",
        [unet, clip, vae],
        40,
        "FLUX.1-dev: the diffusion model from models/diffusion_models, the CLIP-L and T5-XXL text encoders from "
        "models/text_encoders, the VAE (ae.safetensors) from models/vae. Pick your own file names in the lists.",
        COLORS["models"],
    )
    text = g.add(Node(4, "CLIPTextEncode", (X[2], 0), {"text": PROMPT}, title="Prompt", size=(360, 140)))
    g.link(clip, 0, text, "clip")
    flux_g = g.add(Node(5, "FluxGuidance", (X[2], 190), {"guidance": 3.5}, size=(360, 60)))
    g.link(text, 0, flux_g, "conditioning")
    _section(
        g,
        "Prompt",
        [text, flux_g],
        41,
        "Describe the image. FluxGuidance 3.5 is FLUX.1-dev's built-in (distilled) guidance: FLUX.1-dev takes no "
        "negative prompt and no CFG, so each step is ONE model evaluation.",
        COLORS["prompt"],
    )
    if image:
        _image_section(g, loaders_note)
    return unet, vae, flux_g


def _image_section(g: Graph, above: Node) -> None:
    y = above.pos[1] + above.size[1] + 140
    image = g.add(Node(9, "LoadImage", (X[1], y), {"image": "example.png"}, size=(340, 360)))
    _section(
        g,
        "Training image",
        [image],
        45,
        "The ONE image the experts learn from (RGB, at least 64 px a side, at most 4:1). The trainer resizes its "
        "longer side to 'resolution' (1024) and floors both sides to a multiple of 32. Describe it in the prompt.",
        COLORS["image"],
    )


def _glance_nodes(g: Graph, unet: Node, preset: str, shift_terminal: float, lora_prefix: str) -> tuple[Node, Node]:
    """The Slow/Fast Scheduler and the Phase-Aware LoRA Loader of a Glance graph, wired to ``unet``."""
    sched = _scheduler(g, preset, shift_terminal)
    lora = g.add(
        Node(
            7,
            "PhaseAwareLoRALoader",
            (X[3], 280),
            {
                "slow_lora": f"{lora_prefix}_slow.safetensors",
                "fast_lora": f"{lora_prefix}_fast.safetensors",
                "slow_strength": 1.0,
                "fast_strength": 1.0,
                "boundary_sigma": -1.0,
            },
            size=(380, 200),
        )
    )
    g.link(unet, 0, sched, "model")
    g.link(unet, 0, lora, "model")
    g.link(sched, 1, lora, "boundary_sigma")
    return sched, lora


def _scheduler(g: Graph, preset: str, shift_terminal: float) -> Node:
    return g.add(
        Node(
            6,
            "SlowFastScheduler",
            (X[3], 0),
            {
                "preset": preset,
                "base_steps": 50,
                "slow_steps": 5,
                "slow_stride": 2,
                "fast_steps": 5,
                "shift_terminal": shift_terminal,
            },
            size=(380, 230),
        )
    )


GLANCE_TEXT = (
    "Slow/Fast Scheduler: preset {preset} gives the 10 official Glance sigmas (5 Slow + 5 Fast) and the boundary "
    "sigma between the phases, wired into the loader (the other widgets only apply with preset 'custom').\n\n"
    "Phase-Aware LoRA Loader: the Slow LoRA runs while sigma >= boundary, the Fast LoRA below it, inside ONE "
    "sampling run. Strength 1.0 = as trained, 0 = expert off. The LoRA files go in models/loras."
)


OFFICIAL_TEXT = (
    "Slow/Fast Scheduler: preset glance_qwen_image_official gives the timesteps the released pipeline conditions "
    "the model at (1.0, 0.98, 0.956, 0.936, 0.912 | 0.888, 0.744, 0.564, 0.32, 0.02) and the boundary 0.9 between "
    "the phases (the other widgets only apply with preset 'custom').\n\n"
    "Phase-Aware LoRA Loader: the Slow LoRA for the calls at sigma >= boundary, the Fast LoRA below, inside ONE "
    "sampling run: each expert gets the timesteps it has in the released pipeline. The LoRA files go in models/loras."
)


def glance_flux() -> Graph:
    g = Graph()
    unet, vae, cond = _flux_loaders(g)
    sched, lora = _glance_nodes(g, unet, "glance_flux", 0.0, "glance_flux")
    guider = g.add(Node(8, "BasicGuider", (X[3], 530), size=(380, 50)))
    g.link(lora, 0, guider, "model")
    g.link(cond, 0, guider, "conditioning")
    _section(
        g,
        "Glance: Slow and Fast experts",
        [sched, lora, guider],
        42,
        GLANCE_TEXT.format(preset="glance_flux") + "\n\nBasicGuider: no CFG (FLUX.1-dev).",
        COLORS["method"],
    )
    _sampling_tail(g, guider, (sched, 0), vae, "glance_flux_10step", X[4])
    _readme(
        g,
        "Glance FLUX.1 in 10 model evaluations (5 Slow + 5 Fast).\n\n"
        "Slow/Fast Scheduler gives the official Glance FLUX sigmas and the boundary between the phases; the "
        "Phase-Aware LoRA Loader runs the Slow LoRA above that sigma and the Fast LoRA below it, in ONE sampling "
        "run.\n\n"
        "Put the two LoRAs in models/loras (train them with the One-Shot Trainer: glance_flux_train_one_image). "
        "Compare with flux_base_50step (same prompt, seed and size, 50 evaluations).",
    )
    return g


def flux_base() -> Graph:
    g = Graph()
    unet, vae, cond = _flux_loaders(g)
    sched = g.add(
        Node(6, "BasicScheduler", (X[3], 0), {"scheduler": "simple", "steps": 50, "denoise": 1.0}, size=(380, 110))
    )
    g.link(unet, 0, sched, "model")
    guider = g.add(Node(8, "BasicGuider", (X[3], 160), size=(380, 50)))
    g.link(unet, 0, guider, "model")
    g.link(cond, 0, guider, "conditioning")
    _section(
        g,
        "Base model: 50 steps",
        [sched, guider],
        42,
        "BasicScheduler 'simple' with 50 steps: the base model's own schedule, 50 model evaluations. This is the "
        "reference that the Glance and ArcFlow workflows approximate with 10 and 2 evaluations.",
        COLORS["method"],
    )
    _sampling_tail(g, guider, (sched, 0), vae, "flux_base_50step", X[4])
    _readme(
        g,
        "The base model with 50 Euler steps: the reference Glance accelerates. Same prompt, seed and size as "
        "glance_flux_10step, so the two images can be compared directly.",
    )
    return g


def _qwen_loaders(g: Graph) -> tuple[Node, Node, Node]:
    unet = g.add(
        Node(
            1,
            "UNETLoader",
            (X[1], 0),
            {"unet_name": "qwen_image_bf16.safetensors", "weight_dtype": "default"},
            size=(340, 90),
        )
    )
    clip = g.add(
        Node(
            2,
            "CLIPLoader",
            (X[1], 140),
            {"clip_name": "qwen_2.5_vl_7b.safetensors", "type": "qwen_image", "device": "default"},
            size=(340, 110),
        )
    )
    vae = g.add(Node(3, "VAELoader", (X[1], 300), {"vae_name": "qwen_image_vae.safetensors"}, size=(340, 60)))
    _section(
        g,
        "Models",
        [unet, clip, vae],
        40,
        "Qwen-Image: the diffusion model from models/diffusion_models, the Qwen2.5-VL 7B text encoder from "
        "models/text_encoders (type qwen_image), the Qwen-Image VAE from models/vae.",
        COLORS["models"],
    )
    return unet, clip, vae


def glance_qwen(official: bool = False) -> Graph:
    """The Glance Qwen-Image graph; ``official``: the released pipeline's stepping (preset + sampler)."""
    g = Graph()
    unet, clip, vae = _qwen_loaders(g)
    pos = g.add(Node(4, "CLIPTextEncode", (X[2], 0), {"text": PROMPT}, title="Prompt", size=(360, 140)))
    neg = g.add(
        Node(5, "CLIPTextEncode", (X[2], 190), {"text": " "}, title="Negative prompt (official: ' ')", size=(360, 100))
    )
    g.link(clip, 0, pos, "clip")
    g.link(clip, 0, neg, "clip")
    _section(
        g,
        "Prompt",
        [pos, neg],
        41,
        "The prompt, and the negative prompt ' ' (one space) as in the official Glance Qwen-Image pipeline. With "
        "CFG each step evaluates the model twice (positive and negative).",
        COLORS["prompt"],
    )
    preset = "glance_qwen_image_official" if official else "glance_qwen_image"
    sched, lora = _glance_nodes(g, unet, preset, 0.02, "glance_qwen")
    norm = g.add(Node(9, "GlanceQwenNormCFG", (X[3], 530), size=(380, 50)))
    g.link(lora, 0, norm, "model")
    guider = g.add(Node(8, "CFGGuider", (X[3], 630), {"cfg": 5.0}, size=(380, 100)))
    g.link(norm, 0, guider, "model")
    g.link(pos, 0, guider, "positive")
    g.link(neg, 0, guider, "negative")
    _section(
        g,
        "Glance: Slow and Fast experts",
        [sched, lora, norm, guider],
        42,
        (OFFICIAL_TEXT if official else GLANCE_TEXT.format(preset="glance_qwen_image"))
        + "\n\nQwen Norm-Rescaled CFG + CFGGuider cfg 5: the official 'true CFG' (each 2x2 latent patch rescaled "
        "to the conditional prediction's norm).",
        COLORS["method"],
    )
    if official:
        _sampling_tail(g, guider, (sched, 0), vae, "glance_qwen_image_official", X[4], official=True)
        _readme(
            g,
            "The released Glance Qwen-Image pipeline's sampling, reproduced exactly: 10 steps with true CFG 5 (20 "
            "model evaluations), Slow LoRA then Fast LoRA, negative prompt ' ', Qwen's norm-rescaled CFG. (The noise "
            "comes from ComfyUI's seed, so seed 0 here is not the demo's seed 0.)\n\n"
            "As in the released code, the model is told the hard-coded timesteps 1000, 980, 956, 936, 912 | 888, "
            "744, 564, 320, 20 (/1000) while each Euler update uses other sigmas: the first 5 intervals of the Slow "
            "pipeline's 50-step schedule (1.0 to 0.946), then the Fast pipeline's own 5-step schedule from 1.0 "
            "again (total 1.054 instead of 1).\n\nUse it to get the official demo's images from the official "
            "files glance_qwen_slow/fast.safetensors (CSU-JPG/Glance, strength 1.0). glance_qwen_image_10step is "
            "the consistent variant: it steps along the sigmas the model is told.",
        )
        return g
    _sampling_tail(g, guider, (sched, 0), vae, "glance_qwen_image_10step", X[4])
    _readme(
        g,
        "Glance Qwen-Image in 10 steps with true CFG 5 (20 model evaluations instead of 100), as the official "
        "pipeline: Slow LoRA on the first 5 sigmas, Fast LoRA on the last 5, negative prompt ' ', and Qwen's "
        "norm-rescaled CFG.\n\nThe official files glance_qwen_slow/fast.safetensors (CSU-JPG/Glance) carry no "
        "alpha: strength 1.0 reproduces the official inference.",
    )
    return g


def _trainer(
    g: Graph,
    model: tuple[Node, int],
    positive: tuple[Node, int],
    image: Node | None,
    vae: tuple[Node, int] | None,
    sched: Node,
    resolution: int,
    cfg: float,
    negative: tuple[Node, int] | None = None,
    **widgets,
) -> tuple[Node, Node]:
    """The One-Shot Trainer (official objective and node defaults unless ``widgets`` say otherwise), wired, and
    its loss-curve preview."""
    trainer = g.add(
        Node(
            10,
            "OneShotTrainer",
            (X[3], 280),
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
                "resolution": resolution,
                "boundary_sigma": -1.0,
                "cfg": cfg,
                "noises": 8,
                "teacher_steps": 50,
                "student_mix": 0.0,
                "unroll": False,
                "captions": "",
                "save_name": "",
                "overwrite": False,
            }
            | widgets,
            size=(380, 620),
        )
    )
    g.link(*model, trainer, "model")
    g.link(*positive, trainer, "positive")
    if image is not None:
        g.link(image, 0, trainer, "image")
    if vae is not None:
        g.link(*vae, trainer, "vae")
    g.link(sched, 0, trainer, "sigmas")
    g.link(sched, 1, trainer, "boundary_sigma")
    if negative is not None:
        g.link(*negative, trainer, "negative")
    curve = g.add(Node(11, "PreviewImage", (X[4], 0), size=(380, 340), title="Loss curve"))
    g.link(trainer, 3, curve, "images")
    return trainer, curve


def glance_train_flux() -> Graph:
    g = Graph()
    unet, vae, cond = _flux_loaders(g, image=True)
    image = next(n for n in g.nodes if n.type == "LoadImage")
    sched = _scheduler(g, "glance_flux", 0.0)
    g.link(unet, 0, sched, "model")
    trainer, curve = _trainer(g, (unet, 0), (cond, 0), image, (vae, 0), sched, 1024, 1.0)
    _section(
        g,
        "Train the Slow and Fast experts",
        [sched, trainer, curve],
        42,
        "Slow/Fast Scheduler: the Glance sigmas and boundary the experts are trained for.\n\n"
        "One-Shot Trainer, objective 'official': 60 steps per expert on the image (encoded with the VAE) and its "
        "caption; rank, alpha and learning_rate 0 = the official values for the model. It outputs the two LoRAs, "
        "the model with them applied (to the guider), and the loss curve (Loss curve preview). The base model is "
        "not changed. save_name keeps the LoRAs in models/loras. Stop (X next to Run) ends training at the next "
        "step and writes nothing.",
        COLORS["method"],
    )
    guider = g.add(Node(8, "BasicGuider", (X[5], 0), size=(300, 50)))
    g.link(trainer, 2, guider, "model")
    g.link(cond, 0, guider, "conditioning")
    _sampling_tail(g, guider, (sched, 0), vae, "glance_flux_oneshot", X[5], y=100, extra=(guider,))
    _readme(
        g,
        "Train the Glance Slow and Fast LoRAs from ONE image, then sample with them in 10 steps.\n\n"
        "Load your image, describe it in the prompt, queue. The One-Shot Trainer trains both experts on the "
        "model already loaded (official recipe: 60 steps each) and outputs the model with them applied; the "
        "loss curve shows in the preview. Set save_name to keep the LoRAs in models/loras.\n\n"
        "Try objective 'trajectory' (no image needed; add captions, one per line, with the clip input) "
        "for better few-step fidelity.",
    )
    return g


def arcflow_graph(arch: str) -> Graph:
    g = Graph()
    if arch == "flux":
        unet, vae, cond = _flux_loaders(g)
        adapter = "arcflow_flux_2steps.safetensors"
    else:
        unet, clip, vae = _qwen_loaders(g)
        cond = g.add(Node(4, "CLIPTextEncode", (X[2], 0), {"text": PROMPT}, title="Prompt", size=(360, 140)))
        g.link(clip, 0, cond, "clip")
        _section(
            g,
            "Prompt",
            [cond],
            41,
            "Describe the image. No negative prompt: the ArcFlow Qwen-Image adapter has the guidance distilled in.",
            COLORS["prompt"],
        )
        adapter = "arcflow_qwen_2steps.safetensors"
    loader = g.add(
        Node(7, "ArcFlowLoader", (X[3], 0), {"adapter": adapter, "strength": 1.0, "shift": 3.2}, size=(380, 130))
    )
    g.link(unet, 0, loader, "model")
    sched = g.add(
        Node(
            6,
            "BasicScheduler",
            (X[3], 180),
            {"scheduler": "simple", "steps": 2, "denoise": 1.0},
            size=(380, 110),
            title="2 steps: sigmas 1.0, 0.7619, 0",
        )
    )
    g.link(loader, 0, sched, "model")
    guider = g.add(Node(8, "BasicGuider", (X[3], 340), size=(380, 50), title="BasicGuider (cfg 1)"))
    g.link(loader, 0, guider, "model")
    g.link(cond, 0, guider, "conditioning")
    guidance = "FluxGuidance 3.5 (the adapters only work with it)" if arch == "flux" else "no CFG (distilled in)"
    _section(
        g,
        "ArcFlow: 2 steps",
        [loader, sched, guider],
        42,
        "ArcFlow Adapter Loader attaches the adapter (LoRA + momentum heads) to the base model; the base weights are "
        "not changed. Its file goes in models/loras.\n\n"
        "BasicScheduler 'simple', 2 steps, on the ArcFlow model: the official sigmas 1.0, 0.7619, 0 (shift 3.2).\n\n"
        f"BasicGuider: cfg 1, the guidance is distilled into the adapter. Guidance: {guidance}.",
        COLORS["method"],
    )
    _sampling_tail(g, guider, (sched, 0), vae, f"arcflow_{arch}_2step", X[4], arcflow=True)
    _readme(
        g,
        f"ArcFlow {'FLUX.1' if arch == 'flux' else 'Qwen-Image'} in 2 model evaluations.\n\n"
        "ArcFlow Adapter Loader attaches the released adapter (LoRA + momentum heads) to the base model. "
        "BasicScheduler 'simple' with 2 steps on that model gives the official sigmas "
        "1.0, 0.7619, 0 (shift 3.2). "
        f"ArcFlow Sampler integrates each step in closed form. Guidance: {guidance}.\n\n"
        "Put the adapter (diffusion_pytorch_model.safetensors of ymyy307/ArcFlow, renamed) in models/loras, or "
        "distil your own with ArcFlow Distiller.",
    )
    return g


#: The trajectory recipe of the demo's One-Shot Trainer, sized for the demo's time (what it gives: README, Benchmarks).
REFERENCE_TRAINER = {"steps": 100, "rank": 8, "alpha": 8.0, "learning_rate": 1e-3, "batch": 8, "noises": 4}
#: The demo's ArcFlow Distiller, sized for the demo's time (what it gives: README, Benchmarks).
REFERENCE_ARCFLOW = {"iterations": 150, "components": 8, "rank": 16, "learning_rate": 1e-3, "batch": 4}


def glance_reference_demo() -> Graph:
    """The main job's graph: the One-Shot Trainer learns the Slow/Fast experts from the shipped reference teacher's
    own rollouts for a handful of captions, then a held-out caption is sampled with Glance (10 steps) and with the
    teacher (50 steps), same noise."""
    name = "glance_reference_scenes.safetensors"
    g = Graph()
    ref = g.add(
        Node(
            1,
            "GlanceReferenceLoader",
            (X[1], 0),
            {"model_name": name, "prompt": scenes.HANDFUL[0], "negative_prompt": ""},
            size=(380, 170),
            title="Reference teacher",
        )
    )
    train_caps = g.add(
        Node(
            5,
            "GlanceReferenceTextEncode",
            (X[1], 230),
            {"model_name": name, "text": "\n".join(scenes.HANDFUL)},
            size=(380, 220),
            title="Training captions (one per line)",
        )
    )
    _section(
        g,
        "Reference model and the training captions",
        [ref, train_caps],
        40,
        "Glance Reference Model Loader: the pack's own small FLUX, trained on scenes of coloured shapes drawn in "
        "code (pixel space, 32 x 32; its VAE is ComfyUI's pixel-space VAE). Its negative (empty) is the CFG "
        "negative.\n\nGlance Reference Caption: the captions the experts learn from, one per line (no images: "
        "the teacher's own 50-step rollouts are the targets).",
        COLORS["models"],
    )
    held = g.add(
        Node(
            4,
            "GlanceReferenceTextEncode",
            (X[2], 0),
            {"model_name": name, "text": "a green triangle left of a blue square"},
            size=(360, 110),
            title="Held-out caption to sample",
        )
    )
    _section(
        g,
        "Caption to sample",
        [held],
        41,
        "A caption the experts were NOT trained on, and a composition the teacher never saw (no green triangle in "
        "its data): Glance must generalise to it. Try 'three purple squares', 'a yellow circle and a cyan "
        "triangle' …",
        COLORS["prompt"],
    )
    sched = _scheduler(g, "glance_flux", 0.0)
    g.link(ref, 0, sched, "model")
    trainer, curve = _trainer(
        g,
        (ref, 0),
        (train_caps, 0),
        None,
        None,
        sched,
        32,
        REF_CFG,
        negative=(ref, 2),
        objective="trajectory",
        target_layers="all_linear",
        **{k: REFERENCE_TRAINER[k] for k in ("steps", "rank", "alpha", "learning_rate", "batch", "noises")},
    )
    _section(
        g,
        "Train the Slow and Fast experts from the teacher's rollouts",
        [sched, trainer, curve],
        42,
        "Slow/Fast Scheduler 'glance_flux': the 10 Glance sigmas of the model's own 50-step schedule.\n\n"
        f"One-Shot Trainer, 'trajectory': {REFERENCE_TRAINER['noises']} rollouts of the teacher per caption "
        f"(cfg {REF_CFG:g}, 50 steps), then {REFERENCE_TRAINER['steps']} steps per expert so that one Glance step "
        "lands where the teacher's small steps do (rank 8 on every Linear). The released recipe, 'official' (plain "
        "loss on ONE image and its caption: connect a Load Image and the loader's VAE), does not accelerate this "
        "teacher: the demo reports it.",
        COLORS["method"],
    )
    guider = g.add(
        Node(8, "CFGGuider", (X[5], 0), {"cfg": REF_CFG}, size=(300, 100), title=f"Glance: CFGGuider (cfg {REF_CFG:g})")
    )
    g.link(trainer, 2, guider, "model")
    g.link(held, 0, guider, "positive")
    g.link(ref, 2, guider, "negative")
    _sampling_tail(g, guider, (sched, 0), ref, "glance_reference_10step", X[5], y=150, extra=(guider,))
    latent = next(n for n in g.nodes if n.type == "EmptySD3LatentImage")
    latent.type = "EmptyChromaRadianceLatentImage"
    latent.widgets = {"width": 32, "height": 32, "batch_size": 4}
    decode = next(n for n in g.nodes if n.type == "VAEDecode")
    g.edges = [e for e in g.edges if not (e[2] == decode.id and e[3] == "vae")]  # the tail wired slot 0
    g.link(ref, 3, decode, "vae")
    noise = next(n for n in g.nodes if n.type == "RandomNoise")
    sampler = next(n for n in g.nodes if n.type == "KSamplerSelect")
    x = X[5] + 720
    t_guider = g.add(
        Node(12, "CFGGuider", (x, 0), {"cfg": REF_CFG}, size=(300, 100), title=f"Teacher: CFGGuider (cfg {REF_CFG:g})")
    )
    g.link(ref, 0, t_guider, "model")
    g.link(held, 0, t_guider, "positive")
    g.link(ref, 2, t_guider, "negative")
    t_sched = g.add(
        Node(13, "BasicScheduler", (x, 150), {"scheduler": "simple", "steps": 50, "denoise": 1.0}, size=(300, 110))
    )
    g.link(ref, 0, t_sched, "model")
    chain = _pixel_chain(
        g,
        (26, 27, 28),
        (x + 340, 0),
        (noise, t_guider, sampler, t_sched, latent),
        ref,
        "glance_reference_teacher_50step",
    )
    _section(
        g,
        "Teacher, 50 steps (to compare)",
        [t_guider, t_sched, *chain],
        45,
        "The same noise and caption through the reference teacher's own 50-step schedule (100 evaluations with "
        "CFG): what Glance's 10 steps try to reproduce.",
        COLORS["sampling"],
    )
    _reference_arcflow(g, ref, train_caps, held, noise, latent)
    _readme(
        g,
        "Glance on the pack's own reference model: no download needed.\n\n"
        "Queue: the One-Shot Trainer learns the Slow and Fast experts from the teacher's own rollouts for six "
        "captions (about a minute on a CPU), then a caption it never saw ('a green triangle left of a blue square') "
        "is sampled in 10 steps with the experts and in 50 steps with the teacher, from the same noise; the ArcFlow "
        "Distiller learns a 2-step student from the same captions, sampled from the same noise too. Compare the "
        "three Save Image outputs. `bash scripts/demo.sh` runs this graph headless for many held-out captions and "
        "writes a sheet and a report.",
    )
    return g


def _pixel_chain(
    g: Graph, ids: tuple[int, int, int], pos: tuple[int, int], inputs: tuple[Node, ...], ref: Node, prefix: str
) -> list[Node]:
    """SamplerCustomAdvanced (noise, guider, sampler, sigmas, latent) → VAEDecode with the reference loader's
    pixel-space VAE → SaveImage, in a column at ``pos``."""
    (x, y), (run_id, decode_id, save_id) = pos, ids
    run = g.add(Node(run_id, "SamplerCustomAdvanced", (x, y), size=(280, 110)))
    decode = g.add(Node(decode_id, "VAEDecode", (x, y + 160), size=(220, 50)))
    save = g.add(Node(save_id, "SaveImage", (x, y + 260), {"filename_prefix": prefix}, size=(400, 420)))
    for node, slot in zip(inputs, ("noise", "guider", "sampler", "sigmas", "latent_image")):
        g.link(node, 0, run, slot)
    g.link(run, 0, decode, "samples")
    g.link(ref, 3, decode, "vae")
    g.link(decode, 0, save, "images")
    return [run, decode, save]


def _reference_arcflow(g: Graph, ref: Node, captions: Node, held: Node, noise: Node, latent: Node) -> None:
    """The reference demo's ArcFlow branch: distil a 2-step student from the teacher on the training captions,
    then sample the held-out caption from the demo's noise and latent."""
    y = 1100
    distiller = g.add(
        Node(
            50,
            "ArcFlowDistiller",
            (X[3], y),
            {
                **REFERENCE_ARCFLOW,
                "steps": 2,
                "resolution": 32,
                "seed": 0,
                "shift": 3.2,
                "cfg": REF_CFG,
                "captions": "",
                "save_name": "",
                "overwrite": False,
            },
            size=(380, 460),
        )
    )
    g.link(ref, 0, distiller, "model")
    g.link(captions, 0, distiller, "positive")
    g.link(ref, 2, distiller, "negative")
    curve = g.add(Node(51, "PreviewImage", (X[4], y), size=(380, 340), title="Distillation loss"))
    g.link(distiller, 2, curve, "images")
    sched = g.add(
        Node(
            52,
            "BasicScheduler",
            (X[5], y),
            {"scheduler": "simple", "steps": 2, "denoise": 1.0},
            size=(300, 110),
            title="2 steps: sigmas 1.0, 0.7619, 0",
        )
    )
    g.link(distiller, 0, sched, "model")
    guider = g.add(Node(53, "BasicGuider", (X[5], y + 160), size=(300, 50), title="BasicGuider (cfg 1)"))
    g.link(distiller, 0, guider, "model")
    g.link(held, 0, guider, "conditioning")
    sampler = g.add(Node(54, "ArcFlowSampler", (X[5], y + 260), size=(300, 40)))
    chain = _pixel_chain(
        g, (55, 56, 57), (X[5] + 340, y), (noise, guider, sampler, sched, latent), ref, "glance_reference_arcflow_2step"
    )
    _section(
        g,
        "ArcFlow: distil a 2-step student, then sample it",
        [distiller, curve, sched, guider, sampler, *chain],
        46,
        f"ArcFlow Distiller: {REFERENCE_ARCFLOW['iterations']} iterations on the training captions (K = "
        f"{REFERENCE_ARCFLOW['components']} momentum components, rank {REFERENCE_ARCFLOW['rank']}), data-free: the "
        f"teacher's own guided velocities (cfg {REF_CFG:g}) are the targets; the guidance is distilled in.\n\n"
        "BasicScheduler 'simple', 2 steps on the distilled model (shift 3.2): sigmas 1.0, 0.7619, 0. BasicGuider: "
        "cfg 1. ArcFlow Sampler integrates each step in closed form: 2 evaluations per image.",
        COLORS["method"],
    )


WORKFLOW_BUILDERS = {
    "glance_reference_demo": glance_reference_demo,
    "arcflow_flux_2step": lambda: arcflow_graph("flux"),
    "arcflow_qwen_image_2step": lambda: arcflow_graph("qwen_image"),
    "glance_flux_train_one_image": glance_train_flux,
    "glance_flux_10step": glance_flux,
    "glance_qwen_image_10step": glance_qwen,
    "glance_qwen_image_official": lambda: glance_qwen(official=True),
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
