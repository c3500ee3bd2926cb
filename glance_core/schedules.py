"""Glance Slow/Fast sigma schedules.

The official Glance experts are trained at timesteps picked from the base model's own 50-step
schedule at 1024²: Slow = base steps {0, 2, 4, 6, 8}, Fast = {10, 20, 30, 40, 49}
(the released Glance pipelines). Sampling runs ONE Euler pass over those ten sigmas, Slow expert
first, then Fast.

Pure maths: no ComfyUI import. The ``percent_to_sigma`` callable is the model's own
``model_sampling.percent_to_sigma`` when called from a node.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import GlanceError

#: Official Glance sigma lists (training timesteps / 1000 at 1024², terminal 0 appended).
PRESETS: dict[str, tuple[float, ...]] = {
    "glance_qwen_image": (1.0, 0.97919, 0.95752, 0.93492, 0.91134, 0.88671, 0.74507, 0.56295, 0.32008, 0.02, 0.0),
    "glance_flux": (1.0, 0.98698, 0.97320, 0.95861, 0.94312, 0.92665, 0.82570, 0.67799, 0.44120, 0.06055, 0.0),
}
#: Number of Slow evaluations in each preset (the rest are Fast).
PRESET_SLOW_STEPS = 5

#: The model-sampling settings that reproduce each preset in ``custom`` mode:
#: flux-style exponential shift mu at 1024², and the terminal stretch (0 = none).
PRESET_SOURCES: dict[str, dict[str, float]] = {
    "glance_qwen_image": {"mu": 0.5 + 0.4 * (4096 - 256) / (8192 - 256), "shift_terminal": 0.02},
    "glance_flux": {"mu": 1.15, "shift_terminal": 0.0},
}


@dataclass(frozen=True)
class SlowFastSchedule:
    """A Glance schedule: ``sigmas`` (descending, ending in 0) and where Slow ends."""

    sigmas: tuple[float, ...]
    slow_steps: int

    @property
    def boundary(self) -> float:
        """A sigma strictly between the last Slow and the first Fast evaluation.

        Evaluations at sigma >= boundary use Slow, below it Fast. With no Fast step the boundary
        is 0 (everything Slow); with no Slow step it lies above the first sigma.
        """
        s = self.sigmas
        if self.slow_steps >= len(s) - 1:
            return 0.0
        if self.slow_steps == 0:
            return s[0] + 1.0
        return 0.5 * (s[self.slow_steps - 1] + s[self.slow_steps])

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


def preset(name: str) -> SlowFastSchedule:
    try:
        return SlowFastSchedule(PRESETS[name], PRESET_SLOW_STEPS)
    except KeyError:
        raise GlanceError(f"Unknown Glance preset {name!r}; choose one of {sorted(PRESETS)}.") from None


def glance_indices(base_steps: int, slow_steps: int, slow_stride: int, fast_steps: int) -> tuple[list[int], list[int]]:
    """Which base steps are evaluated: Slow every ``slow_stride``-th of the first
    ``slow_steps * slow_stride`` steps, Fast evenly spread over the rest with the last base step kept.

    ``glance_indices(50, 5, 2, 5)`` gives the official ``[0, 2, 4, 6, 8]``, ``[10, 20, 30, 40, 49]``.
    """
    if base_steps < 2:
        raise GlanceError(f"base_steps must be at least 2 (got {base_steps}).")
    if slow_steps < 0 or fast_steps < 0 or slow_steps + fast_steps == 0:
        raise GlanceError(
            f"Need at least one Slow or Fast step (got slow_steps={slow_steps}, fast_steps={fast_steps})."
        )
    if slow_stride < 1:
        raise GlanceError(f"slow_stride must be at least 1 (got {slow_stride}).")
    slow_end = slow_steps * slow_stride
    if slow_end + fast_steps > base_steps or (fast_steps and slow_end >= base_steps):
        raise GlanceError(
            f"The Slow phase covers base steps 0..{slow_end - 1} "
            f"(slow_steps {slow_steps} × slow_stride {slow_stride}), "
            f"which leaves too few of the {base_steps} base steps for {fast_steps} Fast steps: "
            f"raise base_steps or lower slow_steps/slow_stride/fast_steps."
        )
    slow = [i * slow_stride for i in range(slow_steps)]
    if fast_steps == 0:
        return slow, []
    if fast_steps == 1:
        return slow, [slow_end]
    span = base_steps - slow_end
    fast = [min(slow_end + round(k * span / (fast_steps - 1)), base_steps - 1) for k in range(fast_steps)]
    if len(set(fast)) != len(fast):
        raise GlanceError(f"{fast_steps} Fast steps do not fit in the {span} base steps after the Slow phase.")
    return slow, fast


def base_sigmas(
    percent_to_sigma: Callable[[float], float], base_steps: int, shift_terminal: float = 0.0
) -> list[float]:
    """The base model's own ``base_steps``-step flow schedule, diffusers-style.

    Base step i sits at unshifted time t = 1 - i/N (``linspace(1, 1/N, N)``), mapped through the
    model's shift: sigma_i = percent_to_sigma(i/N). ``shift_terminal`` > 0 stretches the schedule
    so that its last sigma equals it (diffusers' ``shift_terminal``, used by Qwen-Image: 0.02).
    """
    sig = [float(percent_to_sigma(i / base_steps)) for i in range(base_steps)]
    if shift_terminal:
        if not 0.0 < shift_terminal < 1.0:
            raise GlanceError(f"shift_terminal must lie in (0, 1) or be 0 for none (got {shift_terminal}).")
        scale = (1.0 - sig[-1]) / (1.0 - shift_terminal)
        sig = [1.0 - (1.0 - s) / scale for s in sig]
    return sig


def custom(
    percent_to_sigma: Callable[[float], float],
    base_steps: int = 50,
    slow_steps: int = 5,
    slow_stride: int = 2,
    fast_steps: int = 5,
    shift_terminal: float = 0.0,
) -> SlowFastSchedule:
    """Derive a Glance schedule from any flow model's own sampling (see ``glance_indices``)."""
    slow, fast = glance_indices(base_steps, slow_steps, slow_stride, fast_steps)
    sig = base_sigmas(percent_to_sigma, base_steps, shift_terminal)
    out = tuple(sig[i] for i in slow + fast) + (0.0,)
    bad = next((v for v in out if not (math.isfinite(v) and 0.0 <= v <= 1.0)), None)
    if bad is not None or any(not b < a for a, b in zip(out, out[1:])):
        shown = bad if bad is not None else next(b for a, b in zip(out, out[1:]) if not b < a)
        raise GlanceError(
            f"The model's sampling gives an unusable schedule (sigma {shown} among {[round(v, 5) for v in out]}): "
            "a ModelSampling node before the scheduler has a NaN, infinite or out-of-range shift. Set a finite "
            "shift (FLUX: ModelSamplingFlux max_shift 1.15, base_shift 0.5) or remove that node."
        )
    return SlowFastSchedule(out, len(slow))


def flux_time_shift(mu: float, t: float) -> float:
    """Exponential time shift used by FLUX / Qwen-Image: sigma = e^mu / (e^mu + 1/t - 1)."""
    if t <= 0.0:
        return 0.0
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def validate_sigmas(sigmas: Sequence[float]) -> None:
    """Descending, finite, within [0, 1]: what a flow schedule must be."""
    if len(sigmas) < 2:
        raise GlanceError("A sigma schedule needs at least two values (one step).")
    for a in sigmas:
        if not math.isfinite(a) or a < 0.0:
            raise GlanceError(f"Sigma {a} is not a finite non-negative number.")
    for a, b in zip(sigmas, sigmas[1:]):
        if not b < a:
            raise GlanceError(f"Sigmas must be strictly descending; found {a} followed by {b}.")


# ---------------------------------------------------------------------------------------------
# The released Glance Qwen-Image pipeline's stepping ("official" mode).
#
# The released pipelines overwrite the scheduler's timesteps with hard-coded bf16 values, so the
# model is CONDITIONED at t = bf16(1000·σ) of the 50-step schedule's Glance steps, while diffusers'
# Euler step ignores the t it is given and UPDATES with the scheduler's own sigma list: the Slow
# pipeline's 50-step schedule (its first 5 intervals), then the Fast pipeline's own 5-step schedule,
# started afresh at σ = 1. Both lists are rebuilt here from the scheduler configuration.
# ---------------------------------------------------------------------------------------------

#: diffusers ``FlowMatchEulerDiscreteScheduler`` configuration of Qwen-Image (its scheduler_config.json).
QWEN_IMAGE_SCHEDULER: dict[str, object] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}
#: The image size the hard-coded conditioning timesteps were taken at: 1024² = 4096 latent tokens.
OFFICIAL_SEQ_LEN = (1024 // 16) ** 2
#: Name of the official-stepping preset of the Slow/Fast Scheduler.
OFFICIAL_PRESET = "glance_qwen_image_official"
#: The released pipelines' step counts: the Slow one forces a 50-step schedule, the Fast one 5 steps.
OFFICIAL_SLOW_BASE_STEPS = 50
OFFICIAL_FAST_STEPS = 5


def qwen_mu(image_seq_len: int) -> float:
    """Resolution-dependent shift mu of the Qwen-Image pipeline: linear in the latent token count."""
    c = QWEN_IMAGE_SCHEDULER
    slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    return c["base_shift"] + slope * (image_seq_len - c["base_image_seq_len"])


def flow_match_sigmas(steps: int, mu: float, shift_terminal: float) -> list[float]:
    """diffusers' dynamic-shifting flow schedule: ``linspace(1, 1/steps, steps)`` shifted with ``mu``,
    stretched so that its last sigma is ``shift_terminal`` (0 = no stretch), then the terminal 0."""
    if steps < 1:
        raise GlanceError(f"A flow schedule needs at least one step (got {steps}).")
    ts = [1.0 - i * (1.0 - 1.0 / steps) / (steps - 1) for i in range(steps)] if steps > 1 else [1.0]
    sig = [flux_time_shift(mu, t) for t in ts]
    if shift_terminal:
        scale = (1.0 - sig[-1]) / (1.0 - shift_terminal)
        sig = [1.0 - (1.0 - s) / scale for s in sig]
    return sig + [0.0]


def bf16_timestep_sigma(sigma: float) -> float:
    """σ as the released pipeline conditions the model on it: t = 1000σ rounded to bfloat16, then
    t / 1000 in float32 (the model's dtype)."""
    import torch

    t = torch.tensor(1000.0 * sigma, dtype=torch.float64).to(torch.bfloat16).to(torch.float32)
    return float(t / 1000)


@dataclass(frozen=True)
class OfficialStepping:
    """The released pipeline's 10 model calls: ``conditioning`` are the sigmas the model is called
    at (terminal 0 appended, a descending SIGMAS list), ``updates`` the (from, to) sigmas of the
    Euler update after each call; the first ``slow_steps`` calls belong to the Slow pipeline."""

    conditioning: tuple[float, ...]
    updates: tuple[tuple[float, float], ...]
    slow_steps: int

    @property
    def schedule(self) -> SlowFastSchedule:
        return SlowFastSchedule(self.conditioning, self.slow_steps)

    @property
    def total_update(self) -> float:
        """Σ (from − to) over all updates: 1 for a consistent schedule, ≈1.054 for the released one."""
        return sum(a - b for a, b in self.updates)


def official_conditioning() -> tuple[float, ...]:
    """The sigmas the released pipelines condition the model at (1024² schedule, bf16-rounded), + 0."""
    base = flow_match_sigmas(
        OFFICIAL_SLOW_BASE_STEPS, qwen_mu(OFFICIAL_SEQ_LEN), QWEN_IMAGE_SCHEDULER["shift_terminal"]
    )
    slow, fast = glance_indices(OFFICIAL_SLOW_BASE_STEPS, PRESET_SLOW_STEPS, 2, OFFICIAL_FAST_STEPS)
    return tuple(bf16_timestep_sigma(base[i]) for i in slow + fast) + (0.0,)


def official_stepping(image_seq_len: int = OFFICIAL_SEQ_LEN) -> OfficialStepping:
    """The released Glance Qwen-Image stepping for an image of ``image_seq_len`` latent tokens.

    The conditioning sigmas are hard-coded in the pipelines (taken at 1024²); the update sigmas are
    the schedules the pipelines build for the actual image: mu follows its token count, as in
    ``QwenImagePipeline``. At 1024²: updates 1.0 → 0.98970 → … → 0.94634 (Slow), then
    1.0 → 0.8367 → 0.6326 → 0.3701 → 0.02 → 0 (Fast).
    """
    if image_seq_len < 1:
        raise GlanceError(f"The latent has no tokens (image_seq_len = {image_seq_len}).")
    mu, terminal = qwen_mu(image_seq_len), QWEN_IMAGE_SCHEDULER["shift_terminal"]
    slow = flow_match_sigmas(OFFICIAL_SLOW_BASE_STEPS, mu, terminal)[: PRESET_SLOW_STEPS + 1]
    fast = flow_match_sigmas(OFFICIAL_FAST_STEPS, mu, terminal)
    updates = tuple(zip(slow, slow[1:])) + tuple(zip(fast, fast[1:]))
    return OfficialStepping(official_conditioning(), updates, PRESET_SLOW_STEPS)
