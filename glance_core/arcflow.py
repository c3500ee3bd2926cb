"""ArcFlow maths (arXiv 2602.09014): momentum-mixture velocities integrated in closed form. Pure torch,
no ComfyUI.

Within a step that starts at σ_src, where the network is evaluated, the velocity at σ ≤ σ_src is

    u(σ) = Σ_k π_k · m_k · γ_k^(σ_src − σ),      π = softmax(logits over k), γ_k = e^{λ_k}, λ_0 ≡ 0,

and the displacement from σ_a down to σ_b (elapsed a = σ_src − σ_a, Δ = σ_a − σ_b) is

    D = Σ_k π_k · m_k · γ_k^a · Δ · φ(λ_k Δ),   φ(z) = expm1(z)/z,   x(σ_b) = x(σ_a) − D.

Shapes (ComfyUI layout): means [B, K, C, *S], logits [B, K, 1, *S], loggammas [B, K−1, 1, *S]
(S = spatial dims, e.g. (H, W) or (T, H, W)); π and γ are per pixel, shared over channels.
Everything is evaluated in float32, on the device of the inputs.

The heads' per-token outputs can also be integrated without unpacking them (:func:`token_velocity`): the
step-mean velocity ū = D/Δ = Σ_k π_k · m_k · φ(λ_k Δ) has the layout of the base model's output
projection, so the model's own unpatchify (padding, cropping, several conditionings) handles the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SERIES_BELOW = 1e-4  # |z| below which φ uses its Taylor series (expm1(z)/z loses digits; 0/0 at z = 0)


def phi(z: torch.Tensor) -> torch.Tensor:
    """φ(z) = (e^z − 1)/z with φ(0) = 1, accurate and finite (values and gradients) for every z."""
    z = z.to(torch.float32)
    small = z.abs() < SERIES_BELOW
    safe = torch.where(small, torch.ones_like(z), z)  # the untaken branch must stay finite too
    series = 1.0 + z * (0.5 + z * (1.0 / 6.0 + z / 24.0))
    return torch.where(small, series, torch.expm1(safe) / safe)


def full_loggammas(loggammas: torch.Tensor) -> torch.Tensor:
    """λ for all K components: component 0 has γ = 1 (λ = 0) and is prepended."""
    zero = loggammas.new_zeros((loggammas.shape[0], 1, *loggammas.shape[2:]))
    return torch.cat([zero, loggammas], dim=1).to(torch.float32)


def displacement(
    means: torch.Tensor,
    logits: torch.Tensor,
    loggammas: torch.Tensor,
    sigma_a: float,
    sigma_b: float,
    elapsed: float = 0.0,
) -> torch.Tensor:
    """D such that x(σ_b) = x(σ_a) − D, for the policy evaluated ``elapsed`` before σ_a (σ_src = σ_a + elapsed)."""
    delta = float(sigma_a) - float(sigma_b)
    pi = torch.softmax(logits.to(torch.float32), dim=1)
    lam = full_loggammas(loggammas)
    weight = pi * torch.exp(lam * elapsed) * delta * phi(lam * delta)  # [B, K, 1, *S]
    return (weight * means.to(torch.float32)).sum(dim=1)


def velocity(means: torch.Tensor, logits: torch.Tensor, loggammas: torch.Tensor, elapsed: float) -> torch.Tensor:
    """u(σ) at σ = σ_src − ``elapsed``."""
    pi = torch.softmax(logits.to(torch.float32), dim=1)
    lam = full_loggammas(loggammas)
    return (pi * torch.exp(lam * elapsed) * means.to(torch.float32)).sum(dim=1)


def mean_velocity(means, logits, loggammas, sigma_a: float, sigma_b: float, elapsed: float = 0.0) -> torch.Tensor:
    """ū = D / Δ: the constant velocity whose Euler step from σ_a lands where the policy does at σ_b."""
    return displacement(means, logits, loggammas, sigma_a, sigma_b, elapsed) / (float(sigma_a) - float(sigma_b))


@dataclass(frozen=True)
class ArcFlowPolicy:
    """π(x, σ) of one model evaluation at σ_src: the K momentum components of every pixel (ComfyUI layout, see
    the module doc). The velocity and the displacement of any sub-interval follow in closed form."""

    means: torch.Tensor  # [B, K, C, *S]
    logits: torch.Tensor  # [B, K, 1, *S]
    loggammas: torch.Tensor  # [B, K−1, 1, *S]

    def velocity(self, elapsed: float) -> torch.Tensor:
        """u(σ) at σ = σ_src − ``elapsed``."""
        return velocity(self.means, self.logits, self.loggammas, elapsed)

    def displacement(self, sigma_a: float, sigma_b: float, elapsed: float = 0.0) -> torch.Tensor:
        """D with x(σ_b) = x(σ_a) − D, σ_a lying ``elapsed`` below σ_src."""
        return displacement(self.means, self.logits, self.loggammas, sigma_a, sigma_b, elapsed)

    def detach(self) -> ArcFlowPolicy:
        return ArcFlowPolicy(self.means.detach(), self.logits.detach(), self.loggammas.detach())

    def without(self, dropped: torch.Tensor) -> ArcFlowPolicy:
        """The policy with the components where ``dropped`` ([B, K] bool) is set removed (their gates −inf); a
        sample that would lose every component keeps them all."""
        dropped = dropped & ~dropped.all(dim=1, keepdim=True)
        shape = (*dropped.shape, *([1] * (self.logits.ndim - 2)))
        logits = self.logits.masked_fill(dropped.view(shape).to(self.logits.device), float("-inf"))
        return ArcFlowPolicy(self.means, logits, self.loggammas)


def schedule(steps: int, shift: float = 3.2) -> list[float]:
    """The official ArcFlow sigmas: raw time τ = 1 − i/steps warped by σ = sτ / (1 + (s−1)τ); ends in 0.

    ``schedule(2)`` = [1.0, 0.7619…, 0.0] (timestep_ratio 1, as the released adapters were trained).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    out = []
    for i in range(steps + 1):
        tau = 1.0 - i / steps
        out.append(shift * tau / (1.0 + (shift - 1.0) * tau))
    out[-1] = 0.0
    return out


def token_velocity(
    means: torch.Tensor,
    logits: torch.Tensor,
    loggammas: torch.Tensor,
    k: int,
    channels: int,
    patch: int,
    delta: float | None,
) -> torch.Tensor:
    """Per-token heads [B, T, K·C·p²], [B, T, K·p²], [B, T, (K−1)·p²] (diffusers order (k, c, ph, pw)) →
    the velocity per token [B, T, C·p²] in the base projection's (c, ph, pw) order, float32: the step-mean
    velocity D/Δ over a step of length ``delta`` (elapsed 0), or u(σ_src) when ``delta`` is None."""
    b, t, p2 = means.shape[0], means.shape[1], patch * patch
    m = means.to(torch.float32).reshape(b, t, k, channels, p2)
    pi = torch.softmax(logits.to(torch.float32).reshape(b, t, k, 1, p2), dim=2)
    if delta is not None:
        lam = loggammas.to(torch.float32).reshape(b, t, k - 1, 1, p2)
        lam = torch.cat([lam.new_zeros(b, t, 1, 1, p2), lam], dim=2)  # component 0: γ = 1
        pi = pi * phi(lam * float(delta))
    return (pi * m).sum(dim=2).reshape(b, t, channels * p2)


def unpack_tokens(raw: torch.Tensor, k: int, channels: int, h: int, w: int, patch: int = 2) -> torch.Tensor:
    """Per-token head output [B, h·w, k·channels·p²] (diffusers order (k, c, ph, pw)) → [B, k, channels, h·p, w·p]."""
    b = raw.shape[0]
    t = raw.narrow(1, 0, h * w).reshape(b, h, w, k, channels, patch, patch)
    return t.permute(0, 3, 4, 1, 5, 2, 6).reshape(b, k, channels, h * patch, w * patch)


def init_loggamma_bias(k: int) -> torch.Tensor:
    """Initial λ for components 1..K−1: ln of log-spaced γ in [0.2, 4] (official init), on the CPU like the other
    initial heads (the caller moves them to the load device)."""
    if k < 2:
        return torch.zeros(0, device="cpu")
    lo, hi = math.log10(0.2), math.log10(4.0)
    gammas = torch.logspace(lo, hi, k - 1, device="cpu")
    return torch.log(gammas)
