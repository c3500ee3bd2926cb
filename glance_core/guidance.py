"""Qwen-Image's norm-rescaled true CFG.

The official Qwen pipeline combines the two predictions with CFG and then rescales the result,
per packed token, to the norm of the conditional prediction: the norm runs over the token's
16 latent channels × 2×2 patch (64 values). At latent sizes that are not multiples of the patch,
ComfyUI pads the model input at the bottom/right and crops the output; the edge tokens then
hold fewer visible values, and their norms are taken over those (zero padding adds nothing).
"""

from __future__ import annotations

import torch
from einops import rearrange


def _token_norm(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-token L2 norm over (channels, patch, patch), broadcast back to ``x``'s layout."""
    five_d = x.ndim == 5
    if not five_d:
        x = x.unsqueeze(2)
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % patch, (-w) % patch
    if pad_h or pad_w:
        x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h))
    t = rearrange(x, "b c t (h p) (w q) -> b t h w (c p q)", p=patch, q=patch)
    n = torch.linalg.vector_norm(t, dim=-1, keepdim=True).expand_as(t)
    n = rearrange(n, "b t h w (c p q) -> b c t (h p) (w q)", c=x.shape[1], p=patch, q=patch)[..., :h, :w]
    return n if five_d else n.squeeze(2)


def norm_rescaled_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, patch: int = 2) -> torch.Tensor:
    """``(uncond + scale·(cond − uncond)) · ‖cond‖ / ‖comb‖`` with per-token norms.

    Works on velocities or on σ·velocity (what ComfyUI's sampler_cfg_function receives): the
    ratio of norms is the same. Any latent height and width (partial edge tokens, as ComfyUI pads).
    """
    comb = uncond + scale * (cond - uncond)
    ratio = _token_norm(cond, patch) / _token_norm(comb, patch).clamp_min(torch.finfo(comb.dtype).tiny)
    return comb * ratio
