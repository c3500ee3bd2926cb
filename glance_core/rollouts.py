"""Rollouts through ComfyUI's own guider: ONE Euler helper (every Euler loop of the trainer), the fine grid and
the teacher trajectories of the ``trajectory`` objective."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import GlanceError, schedules
from .checkpoint import outside_inference_mode


def euler_steps(
    model, x: torch.Tensor, sigmas, extra_args: dict | None = None, on_state: Callable | None = None
) -> torch.Tensor:
    """Plain Euler over ``sigmas`` (k-diffusion convention: ``model`` returns the denoised x). ``on_state(i, x)``
    sees the state at ``sigmas[i]`` for every i, the last one included."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        if on_state:
            on_state(i, x)
        den = model(x, sigmas[i] * s_in, **extra_args)
        x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    if on_state:
        on_state(len(sigmas) - 1, x)
    return x


def _ksampler(on_state: Callable | None = None, out: dict | None = None):
    """A ComfyUI KSAMPLER running :func:`euler_steps`; ``out["x"]`` receives the raw final state."""
    import comfy.samplers

    def run(model, x, sigmas, extra_args=None, callback=None, disable=None):
        x = euler_steps(model, x, sigmas, extra_args, on_state)
        if out is not None:
            out["x"] = x
        return x

    return comfy.samplers.KSAMPLER(run)


def euler(guider, x: torch.Tensor, sigmas: list[float], seed: int) -> torch.Tensor:
    """Euler over ``sigmas`` from state ``x`` (at sigmas[0]) through ``guider`` (its conds, CFG and wrappers)."""
    if len(sigmas) < 2:
        return x
    out: dict = {}
    # The state is passed as the "noise" at sigma = sigmas[0] with an empty latent: CONST noise scaling then
    # gives sigma·x, so divide first.
    s0 = float(sigmas[0])
    guider.sample(
        x / s0,
        torch.zeros_like(x),
        _ksampler(out=out),
        torch.tensor(sigmas, dtype=torch.float32, device="cpu"),
        disable_pbar=True,
        seed=seed,
    )
    return out["x"].to(torch.float32)


def fine_grid(percent_to_sigma: Callable[[float], float], base_steps: int, glance_sigmas: list[float]) -> list[float]:
    """The base model's own ``base_steps``-step schedule with the Glance sigmas added, descending, ending in 0."""
    base = schedules.base_sigmas(percent_to_sigma, base_steps)
    grid = sorted(set(base) | {float(s) for s in glance_sigmas} | {0.0}, reverse=True)
    out = [grid[0]]
    for s in grid[1:]:
        if out[-1] - s > 1e-6:
            out.append(s)
        elif s in glance_sigmas:
            out[-1] = s  # keep the exact Glance value when two nearly coincide
    return out


@outside_inference_mode(grad=False)
def teacher_trajectories(
    model_patcher,
    captions: list[tuple[list, list | None]],
    cfg: float,
    noises: int,
    seed: int,
    latent_shape: tuple[int, ...],
    grid: list[float],
    keep: list[float],
    on_step: Callable[[], None] | None = None,
) -> dict:
    """Roll the frozen model out with Euler over ``grid`` (CFG ``cfg``) from ``noises`` seeded noises per
    caption; keep the states at the sigmas in ``keep``. Runs through ComfyUI's own CFGGuider."""
    import comfy.samplers

    # Grid index → Glance sigma (the grid holds the exact Glance values; compare by index, not by float32 value).
    at = {i: s for i, s in enumerate(grid) if any(abs(s - k) < 1e-9 for k in keep)}
    keep_set = set(at.values())
    out = {"captions": [], "grid": list(grid)}
    for c, (pos, neg) in enumerate(captions):
        record: dict[float, torch.Tensor] = {}

        def seen(i: int, x: torch.Tensor, record=record) -> None:
            if i in at:
                record[at[i]] = x.detach().clone()
            if i and on_step:
                on_step()

        guider = comfy.samplers.CFGGuider(model_patcher)
        guider.set_conds(pos, neg if neg is not None and cfg != 1.0 else [])
        guider.set_cfg(cfg)
        g = torch.Generator().manual_seed(seed + 7919 * c)
        # Noise and sigmas on the CPU, as ComfyUI's KSampler passes them: the guider moves them to the load device.
        noise = torch.randn((noises, *latent_shape[1:]), generator=g, device="cpu")
        latent = torch.zeros_like(noise)
        sig = torch.tensor(grid, dtype=torch.float32, device="cpu")
        guider.sample(noise, latent, _ksampler(seen), sig, disable_pbar=True, seed=seed)
        missing = {float(k) for k in keep} - set(record)
        if missing:
            raise GlanceError(f"Internal: the fine grid lacks Glance sigmas {sorted(missing)}.")
        out["captions"].append(
            {
                "positive": pos,
                "negative": neg if cfg != 1.0 else None,
                "cfg": cfg,
                "states": {s: record[s].to(torch.float32) for s in keep_set},
            }
        )
    return out
