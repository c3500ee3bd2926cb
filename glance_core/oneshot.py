"""The One-Shot Trainer's job, from the node's inputs to its outputs: the official hyper-parameters of the
model's family, the Slow/Fast split of the schedule, captions, the image latent or the teacher rollouts, both
experts, the all-or-nothing save and the phase-aware model. Every check runs before the expensive work."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import GlanceError, architectures, experts, lora_save, rollouts, schedules, training
from .plots import loss_curve

log = logging.getLogger("comfyui-glance")


@dataclass
class OneShotResult:
    slow: dict[str, torch.Tensor]  # saved-format state dicts ({} for an expert not trained)
    fast: dict[str, torch.Tensor]
    model: object  # the model with the trained experts, phase-aware
    curve: torch.Tensor  # the loss curve IMAGE


def save_paths(save_name: str, experts_: list[str], overwrite: bool) -> dict[str, str]:
    """``{expert: path}`` in models/loras for ``<save_name>_<expert>.safetensors`` (``""``: no suffix), after
    every check that decides whether the files can be written (see ``lora_save.plan_save``)."""
    import folder_paths

    root = folder_paths.get_folder_paths("loras")[0]
    suffix = {e: f"_{e}" if e else "" for e in experts_}
    paths = lora_save.plan_save(root, save_name, list(suffix.values()), overwrite)
    return {e: paths[sfx] for e, sfx in suffix.items()} if paths else {}


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


def prepare_image(image: torch.Tensor, resolution: int) -> tuple[torch.Tensor, str]:
    """One RGB image, longer side → ``resolution``, sides floored to a multiple of 32 (official recipe)."""
    import comfy.utils

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
    if not torch.isfinite(image).all():
        raise GlanceError(
            "The image contains NaN or infinite pixel values (a broken upstream node or file): fix or replace it."
        )
    h, w = image.shape[1], image.shape[2]
    if min(h, w) < 64:
        raise GlanceError(f"The image is {w}×{h} px: too small to learn from (at least 64 px per side).")
    if max(h, w) > 8192:
        raise GlanceError(f"The image is {w}×{h} px: larger than 8192 px; downscale it first.")
    # The source's aspect, not the resized one: at small resolutions the floor to 32 px squashes 640×64 to 64×32.
    if h / w > 4 or w / h > 4:
        raise GlanceError(f"The image is {w}×{h} px: aspect ratios beyond 4:1 are not supported; crop it.")
    scale = resolution / max(h, w)
    nh, nw = max(32, int(h * scale) // 32 * 32), max(32, int(w * scale) // 32 * 32)
    note = (
        f"image {w}×{h} → {nw}×{nh} (longer side to {resolution}, sides floored to a multiple of 32, as the "
        f"official recipe)"
    )
    if (nh, nw) != (h, w):
        image = comfy.utils.common_upscale(image.movedim(-1, 1), nw, nh, "lanczos", "disabled").movedim(1, -1)
    return image.clamp(0, 1), note


def latent_shape(model, resolution: int, x0) -> tuple[int, ...]:
    if x0 is not None:
        return tuple(x0.shape)
    fmt = model.model.latent_format
    side = max(1, resolution // getattr(fmt, "spacial_downscale_ratio", 8))  # 1 for pixel-space models
    if getattr(fmt, "latent_dimensions", 2) == 3:
        return (1, fmt.latent_channels, 1, side, side)
    return (1, fmt.latent_channels, side, side)


def train(
    model,
    positive,
    *,
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
    boundary_sigma: float = experts.AUTO_BOUNDARY,
    negative=None,
    cfg: float = 1.0,
    noises: int = 8,
    teacher_steps: int = 50,
    student_mix: float = 0.0,
    unroll: bool = False,
    clip=None,
    captions: str = "",
    save_name: str = "",
    overwrite: bool = False,
    progress: Callable[[int, int, str | None], None] | None = None,
) -> OneShotResult:
    """Train the wanted expert(s) of ``model``; ``progress(done, total, text)`` after each unit of work. 0 for
    rank/alpha/learning_rate means the official value of the model's family."""
    import comfy.model_management as mm

    if learning_rate < 0 or alpha < 0:
        raise GlanceError("learning_rate and alpha cannot be negative (0 = the official value).")
    if not positive:
        raise GlanceError("positive is an empty conditioning: connect the caption's text encoder output.")
    ms = model.get_model_object("model_sampling")
    arch = architectures.of(model, "The Glance One-Shot Trainer")
    rank = rank or arch.rank
    alpha = alpha or 4.0 * rank
    lr = learning_rate or arch.learning_rate
    if sigmas is not None:
        sig = [float(s) for s in sigmas]
        schedules.validate_sigmas(sig)
        boundary_sigma = experts.resolve_boundary(model, boundary_sigma)
        slow = sum(1 for s in sig[:-1] if experts.expert_for(s, boundary_sigma) == "slow")
        sched = schedules.SlowFastSchedule(tuple(sig), slow)
    else:
        sched = schedules.preset(arch.preset)
    s = list(sched.sigmas)
    jobs = training.expert_jobs(sched)
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
        img, note = prepare_image(image, resolution)
        log.info("Glance trainer: %s", note)
        img_hash = lora_save.image_hash(img)
        # No autograd graph: a VAE whose weights require grad (built outside ComfyUI's inference mode) would
        # tie every step's loss to the same encoder graph ("backward through the graph a second time").
        with torch.no_grad():
            x0 = vae.encode(img[:, :, :, :3]).detach()
        cfg = 1.0
    pos_list = caption_list(positive, clip, captions)
    if objective == "official" and arch.train_guidance is not None:  # as the released training script feeds it
        pos_list = [[[t, {**d, "guidance": arch.train_guidance}] for t, d in c] for c in pos_list]

    total = len(wanted) * steps
    trajectories = None
    grid: list[float] = []
    if objective == "trajectory":
        grid = rollouts.fine_grid(ms.percent_to_sigma, teacher_steps, s)
        total += len(pos_list) * (len(grid) - 1)
    done = [0]
    if progress:
        progress(0, total, None)

    def tick(text: str | None = None) -> None:
        done[0] += 1
        if progress:
            progress(done[0], total, text)

    if objective == "trajectory":
        shape = latent_shape(model, resolution, x0)
        trajectories = rollouts.teacher_trajectories(
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
            rank=rank,
            alpha=alpha,
            lr=lr,
            steps=steps,
            seed=seed + (1 if e == "fast" else 0),
            targets=target_layers,
            batch=batch,
            x0=x0,
            trajectories=trajectories,
            weight_decay=arch.weight_decay,
            student_mix=student_mix if objective == "trajectory" else 0.0,
            unroll=unroll and objective == "trajectory",
            on_step=on_step,
        )
    mm.throw_exception_if_processing_interrupted()

    if paths:
        files = [
            (
                path,
                results[e].state_dict,
                lora_save.metadata_for(
                    arch.name,
                    e,
                    objective,
                    rank,
                    alpha,
                    jobs[e].sigmas,
                    steps,
                    seed,
                    lr,
                    target_layers,
                    img_hash,
                    len(pos_list),
                ),
            )
            for e, path in paths.items()
        ]
        for path in lora_save.save_files_atomic(files, overwrite):
            log.info("Glance trainer: saved %s", path)
    built = {e: experts.build_expert(model, r.state_dict, 1.0, f"trained {e} expert") for e, r in results.items()}
    phase_model = experts.apply_phase_lora(model, built.get("slow"), built.get("fast"), sched.boundary)
    curve = loss_curve(
        {f"{e} expert": r.losses for e, r in results.items()},
        title=f"Glance {objective} training ({arch.name})" + (f" — {note}" if note else ""),
    )
    return OneShotResult(
        results["slow"].state_dict if "slow" in results else {},
        results["fast"].state_dict if "fast" in results else {},
        phase_model,
        curve,
    )
