"""OneShotTrainer: train the Glance Slow and Fast LoRAs in the canvas, on the model already loaded."""

from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..glance_core import GlanceError, experts, schedules, training
from ..glance_core.plots import loss_curve
from .common import CATEGORY, caption_inputs, guidance_inputs, require_flow_model, save_inputs

log = logging.getLogger("comfyui-glance")
PRESET_FOR = {"flux": "glance_flux", "qwen_image": "glance_qwen_image"}


def progress_text(text: str, node_id: str | None) -> None:
    try:
        from server import PromptServer

        if PromptServer.instance is not None and node_id is not None:
            PromptServer.instance.sendprogress_text(text, node_id)
    except (ImportError, AttributeError):
        pass


def save_paths(save_name: str, experts_: list[str], overwrite: bool) -> dict[str, str]:
    if not save_name.strip():
        return {}
    name = save_name.strip().removesuffix(".safetensors")
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm.startswith(".."):
        raise GlanceError(
            f"save_name {save_name!r} must be a name inside models/loras/, without '..' or a leading '/'."
        )
    root = folder_paths.get_folder_paths("loras")[0]
    paths = {e: os.path.join(root, f"{norm}{'_' + e if e else ''}.safetensors") for e in experts_}
    taken = [p for p in paths.values() if os.path.exists(p)]
    if taken and not overwrite:
        raise GlanceError(
            f"{taken[0]} already exists: choose another save_name or turn on overwrite. Nothing was trained."
        )
    return paths


def caption_list(positive, clip, captions: str) -> list:
    """One CONDITIONING per caption: each entry of ``positive`` (a combined conditioning holds several), then
    each non-empty line of ``captions`` encoded with ``clip`` (FLUX guidance copied from ``positive``).
    Tensors are cloned outside inference mode, ready for autograd."""
    out = [[c] for c in training.clone_conditioning(positive)]
    extra = [line.strip() for line in (captions or "").splitlines() if line.strip()]
    if extra and clip is None:
        raise GlanceError("Extra captions need the text encoder: connect 'clip'.")
    guidance = positive[0][1].get("guidance")
    for line in extra:
        c = clip.encode_from_tokens_scheduled(clip.tokenize(line))
        if guidance is not None:
            c = [[t, {**d, "guidance": guidance}] for t, d in c]
        out.append(training.clone_conditioning(c))
    return out


def _prepare_image(image: torch.Tensor, resolution: int) -> tuple[torch.Tensor, str]:
    """One RGB image, longer side → ``resolution``, sides floored to a multiple of 32 (official recipe)."""
    if image.ndim != 4:
        raise GlanceError(f"Expected an IMAGE [batch, height, width, channels]; got shape {list(image.shape)}.")
    if image.shape[0] != 1:
        raise GlanceError(
            f"OneShotTrainer trains on ONE image; got a batch of {image.shape[0]}. Pick one (e.g. with ImageFromBatch)."
        )
    channels = image.shape[-1]
    if channels == 4:
        raise GlanceError(
            "The image has an alpha channel. Remove it first (e.g. load it with LoadImage, which "
            "splits RGB and MASK) so the trainer sees the picture you expect."
        )
    if channels != 3:
        raise GlanceError(
            f"The image has {channels} channel(s); the trainer needs RGB. Convert the greyscale image "
            f"to RGB first (LoadImage does)."
        )
    h, w = image.shape[1], image.shape[2]
    if min(h, w) < 64:
        raise GlanceError(f"The image is {w}×{h} px: too small to learn from (at least 64 px per side).")
    if max(h, w) > 8192:
        raise GlanceError(f"The image is {w}×{h} px: larger than 8192 px; downscale it first.")
    scale = resolution / max(h, w)
    nh, nw = max(32, int(h * scale) // 32 * 32), max(32, int(w * scale) // 32 * 32)
    if nh / nw > 4 or nw / nh > 4:
        raise GlanceError(f"The image is {w}×{h} px: aspect ratios beyond 4:1 are not supported; crop it.")
    note = (
        f"image {w}×{h} → {nw}×{nh} (longer side to {resolution}, sides floored to a multiple of 32, as the "
        f"official recipe)"
    )
    if (nh, nw) != (h, w):
        image = comfy.utils.common_upscale(image.movedim(-1, 1), nw, nh, "lanczos", "disabled").movedim(1, -1)
    return image.clamp(0, 1), note


class OneShotTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OneShotTrainer",
            display_name="Glance One-Shot Trainer",
            category=CATEGORY,
            description=(
                "Trains the Glance Slow and/or Fast LoRA on the connected model. 'official': the released recipe, "
                "plain flow-matching loss on ONE image at the expert's timesteps. 'trajectory': the model's own "
                "fine-step rollouts from your caption(s) as targets, so that one big step lands where 50 small ones "
                "do (no image needed; several captions generalise better). Outputs the LoRAs, the model with them "
                "applied phase-aware, and the loss curve; optionally saves to models/loras."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base FLUX or Qwen-Image model to accelerate (stays unchanged)."),
                io.Conditioning.Input(
                    "positive",
                    tooltip="The caption, from the graph's text encoder. A combined "
                    "conditioning (Conditioning Combine) counts as one caption per entry.",
                ),
                io.Combo.Input(
                    "objective",
                    options=["official", "trajectory"],
                    default="official",
                    tooltip="official: plain flow-matching loss on the image (the paper's recipe). "
                    "trajectory: targets from the model's own 50-step rollouts (measurably better at "
                    "few steps; data-free).",
                ),
                io.Combo.Input(
                    "expert",
                    options=["both", "slow", "fast"],
                    default="both",
                    tooltip="Which expert(s) to train: Slow = the high-noise steps, Fast = the rest.",
                ),
                io.Int.Input(
                    "steps",
                    default=60,
                    min=1,
                    max=100000,
                    tooltip="Optimisation steps per expert (count; official 60, usually 30-500).",
                ),
                io.Int.Input(
                    "rank",
                    default=0,
                    min=0,
                    max=512,
                    tooltip="LoRA rank (dimensions; 0 = official for the model: FLUX 16, Qwen-Image 32; usually 4-64).",
                ),
                io.Float.Input(
                    "alpha",
                    default=0.0,
                    min=0.0,
                    max=4096.0,
                    step=1.0,
                    tooltip="LoRA alpha (scale = alpha/rank; 0 = 4 × rank, the official value; usually 1-4 × rank). "
                    "The saved file has alpha/rank folded in, so it loads at strength 1.0.",
                ),
                io.Float.Input(
                    "learning_rate",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=1e-5,
                    round=1e-6,
                    tooltip="AdamW learning rate (per step; 0 = official: FLUX 5e-4, Qwen-Image 3e-4; usually 1e-4 to "
                    "1e-3).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFF,
                    control_after_generate=False,
                    tooltip="Seed for LoRA init, timestep draws and noise (0 to 2^32-1): same seed + inputs = same "
                    "LoRA.",
                ),
                io.Combo.Input(
                    "target_layers",
                    options=["official", "attention", "all_linear"],
                    default="official",
                    tooltip="Layers that get a LoRA. official: FLUX q/k/v/out of every block; Qwen-Image "
                    "attention, MLP-out and modulation (the released recipe).",
                ),
                io.Int.Input(
                    "batch",
                    default=1,
                    min=1,
                    max=256,
                    tooltip="Samples per step (count; official 1, usually 1-8). trajectory: teacher states per step.",
                ),
                io.Int.Input(
                    "resolution",
                    default=1024,
                    min=32,
                    max=4096,
                    step=32,
                    tooltip="Pixels. official: the image's longer side is resized to this (then floored to a multiple "
                    "of 32). trajectory: the square size of the teacher rollouts. 512-1024 for FLUX/Qwen "
                    "(1024 = official); 32 for the reference teacher.",
                ),
                io.Image.Input("image", optional=True, tooltip="official: the ONE training image (RGB)."),
                io.Vae.Input("vae", optional=True, tooltip="official: the VAE of the model, to encode the image."),
                io.Sigmas.Input(
                    "sigmas",
                    optional=True,
                    tooltip="The Glance schedule (from Glance Slow/Fast "
                    "Scheduler). Not connected: the official preset for the model.",
                ),
                io.Float.Input(
                    "boundary_sigma",
                    default=0.9,
                    min=0.0,
                    max=10.0,
                    step=0.001,
                    optional=True,
                    tooltip="Slow/Fast boundary of the connected sigmas (sigma, 0..1 for flow models; wire it from the "
                    "scheduler); ignored without sigmas.",
                ),
                *guidance_inputs(
                    "trajectory: negative caption for CFG (Qwen-Image official: ' ').",
                    "trajectory: CFG scale of the teacher rollouts and of the student (1 = no CFG, usually 1-7; "
                    "Qwen-Image official: 5 with negative ' '; FLUX: 1, guidance comes from FluxGuidance).",
                ),
                io.Int.Input(
                    "noises",
                    default=8,
                    min=1,
                    max=4096,
                    optional=True,
                    tooltip="trajectory: teacher rollouts per caption (count, different noise each; usually 4-32).",
                ),
                io.Int.Input(
                    "teacher_steps",
                    default=50,
                    min=4,
                    max=1000,
                    optional=True,
                    tooltip="trajectory: steps of the teacher's fine schedule (count; its own 50-step schedule, "
                    "usually 20-100; the Glance sigmas are added to it).",
                ),
                io.Float.Input(
                    "student_mix",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    optional=True,
                    tooltip="trajectory: in the second half of training, the share of steps on the student's own "
                    "rollout states (with the teacher's fine rollout from there as target). Fraction 0-1; 0 = teacher "
                    "states only.",
                ),
                *caption_inputs("trajectory: "),
                *save_inputs("<save_name>_slow/_fast.safetensors"),
            ],
            outputs=[
                io.LoraModel.Output(
                    "slow_lora",
                    display_name="slow_lora",
                    tooltip="The Slow LoRA (wire into the Phase-Aware LoRA Loader's slow_lora_model).",
                ),
                io.LoraModel.Output(
                    "fast_lora",
                    display_name="fast_lora",
                    tooltip="The Fast LoRA (wire into the Phase-Aware LoRA Loader's fast_lora_model).",
                ),
                io.Model.Output(
                    "trained_model", display_name="model", tooltip="The model with the trained experts, phase-aware."
                ),
                io.Image.Output("loss_curve", display_name="loss_curve", tooltip="Training loss per step."),
            ],
            hidden=[io.Hidden.unique_id],
            is_experimental=False,
        )

    @classmethod
    def execute(
        cls,
        model,
        positive,
        objective: str,
        expert: str,
        steps: int,
        rank: int,
        alpha: float,
        learning_rate: float,
        seed: int,
        target_layers: str,
        batch: int,
        resolution: int,
        image=None,
        vae=None,
        sigmas=None,
        boundary_sigma: float = 0.9,
        negative=None,
        cfg: float = 1.0,
        noises: int = 8,
        teacher_steps: int = 50,
        student_mix: float = 0.0,
        clip=None,
        captions: str = "",
        save_name: str = "",
        overwrite: bool = False,
    ) -> io.NodeOutput:
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        ms = require_flow_model(model, "Glance One-Shot Trainer")
        arch = training.architecture(model)
        r0, _, lr0 = training.OFFICIAL[arch]
        rank = rank or r0
        alpha = alpha or 4.0 * rank
        lr = learning_rate or lr0
        if sigmas is not None:
            sig = [float(s) for s in sigmas]
            schedules.validate_sigmas(sig)
            sched = schedules.SlowFastSchedule(tuple(sig), sum(1 for s in sig[:-1] if s >= boundary_sigma))
        else:
            sched = schedules.preset(PRESET_FOR[arch])
        k = sched.slow_steps
        s = list(sched.sigmas)
        jobs = {
            "slow": training.ExpertJob("slow", s[:k], s[1 : k + 1]),
            "fast": training.ExpertJob("fast", s[k:-1], s[k + 1 :]),
        }
        wanted = ["slow", "fast"] if expert == "both" else [expert]
        for e in wanted:
            if not jobs[e].sigmas:
                raise GlanceError(
                    f"The schedule has no {e} steps (boundary_sigma {boundary_sigma}); move the boundary "
                    f"or train the other expert."
                )
        paths = save_paths(save_name, wanted, overwrite)
        neg = training.clone_conditioning(negative) if negative is not None else None

        x0, note, img_hash = None, "", None
        if objective == "official":
            if image is None or vae is None:
                raise GlanceError("The official objective trains on an image: connect an IMAGE and its VAE.")
            want = model.model.latent_format.latent_channels
            if getattr(vae, "latent_channels", want) != want:
                raise GlanceError(
                    f"The VAE makes {vae.latent_channels}-channel latents but the model expects {want}: "
                    f"connect the VAE that belongs to this model."
                )
            img, note = _prepare_image(image, resolution)
            log.info("Glance trainer: %s", note)
            img_hash = training.image_hash(img)
            x0 = vae.encode(img[:, :, :, :3])
            cfg = 1.0
        pos_list = caption_list(positive, clip, captions)
        if objective == "official" and arch == "flux":  # the released FLUX script feeds guidance 1.0 in training
            pos_list = [[[t, {**d, "guidance": 1.0}] for t, d in c] for c in pos_list]

        total = len(wanted) * steps
        trajectories = None
        grid: list[float] = []
        if objective == "trajectory":
            grid = training.fine_grid(ms.percent_to_sigma, teacher_steps, s)
            total += len(pos_list) * (len(grid) - 1)
        pbar = comfy.utils.ProgressBar(total, node_id=node_id)
        done = [0]

        def tick(text: str | None = None) -> None:
            done[0] += 1
            pbar.update_absolute(done[0], total)
            if text:
                progress_text(text, node_id)

        if objective == "trajectory":
            shape = latent_shape(model, resolution, x0)
            trajectories = training.teacher_trajectories(
                model, [(p, neg) for p in pos_list], cfg, noises, seed, shape, grid, s, on_step=lambda: tick()
            )
        results = {}
        for e in wanted:

            def on_step(i: int, loss: float, _e=e) -> None:
                tick(f"{_e} expert: step {i + 1}/{steps}, loss {loss:.5f}")

            results[e] = training.train_expert(
                model,
                jobs[e],
                objective=objective,
                positive=pos_list[0],
                negative=neg,
                cfg=cfg,
                rank=rank,
                alpha=alpha,
                lr=lr,
                steps=steps,
                seed=seed + (1 if e == "fast" else 0),
                targets=target_layers,
                batch=batch,
                x0=x0,
                trajectories=trajectories,
                weight_decay=0.01 if arch == "flux" else 0.0,
                student_mix=student_mix if objective == "trajectory" else 0.0,
                on_step=on_step,
            )
        comfy.model_management.throw_exception_if_processing_interrupted()

        for e, path in paths.items():
            meta = training.metadata_for(
                arch, e, objective, rank, alpha, jobs[e].sigmas, steps, seed, lr, target_layers, img_hash, len(pos_list)
            )
            training.save_lora_atomic(path, results[e].state_dict, meta, overwrite=overwrite)
            log.info("Glance trainer: saved %s", path)
        built = {e: experts.build_expert(model, r.state_dict, 1.0, f"trained {e} expert") for e, r in results.items()}
        phase_model = experts.apply_phase_lora(model, built.get("slow"), built.get("fast"), sched.boundary)
        curve = loss_curve(
            {f"{e} expert": r.losses for e, r in results.items()},
            title=f"Glance {objective} training ({arch})" + (f" — {note}" if note else ""),
        )
        return io.NodeOutput(
            results["slow"].state_dict if "slow" in results else {},
            results["fast"].state_dict if "fast" in results else {},
            phase_model,
            curve,
        )


def latent_shape(model, resolution: int, x0) -> tuple[int, ...]:
    if x0 is not None:
        return tuple(x0.shape)
    fmt = model.model.latent_format
    side = max(1, resolution // getattr(fmt, "spacial_downscale_ratio", 8))  # 1 for pixel-space models
    if getattr(fmt, "latent_dimensions", 2) == 3:
        return (1, fmt.latent_channels, 1, side, side)
    return (1, fmt.latent_channels, side, side)
