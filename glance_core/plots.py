"""A loss-curve picture as a ComfyUI IMAGE (PIL only; no plotting library needed)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

COLORS = [(66, 133, 244), (234, 113, 36), (52, 168, 83), (171, 71, 188)]


def loss_curve(series: dict[str, list[float]], title: str = "", size: tuple[int, int] = (768, 432)) -> torch.Tensor:
    """Losses per step on a log scale, one line per series; returns [1, H, W, 3] floats in 0..1."""
    w, h = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((left, 12), _ascii(title)[:110], fill=(0, 0, 0))
    values = [v for s in series.values() for v in s if math.isfinite(v) and v > 0]
    n = max((len(s) for s in series.values()), default=0)
    d.rectangle((left, top, w - right, h - bottom), outline=(120, 120, 120))
    if not values or n == 0:
        d.text((left + 10, top + 10), "no losses", fill=(0, 0, 0))
        return _tensor(img)
    lo, hi = math.log10(min(values)), math.log10(max(values))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (w - left - right) * (i / max(n - 1, 1))
        y = top + (h - top - bottom) * (1 - (math.log10(max(v, 10**lo)) - lo) / (hi - lo))
        return x, y

    for k in range(5):  # y ticks
        v = 10 ** (lo + (hi - lo) * k / 4)
        _, y = xy(0, v)
        d.line((left - 4, y, left, y), fill=(120, 120, 120))
        d.text((4, y - 6), f"{v:.3g}", fill=(60, 60, 60))
    d.text(((w - left) // 2, h - bottom + 18), f"step (1..{n})", fill=(60, 60, 60))
    for c, (name, losses) in enumerate(series.items()):
        color = COLORS[c % len(COLORS)]
        pts = [xy(i, v) for i, v in enumerate(losses) if math.isfinite(v) and v > 0]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        last = f"{losses[-1]:.4g}" if losses else "-"
        d.text((w - right - 220, top + 8 + 16 * c), f"{name}: last {last}", fill=color)
    return _tensor(img)


def _ascii(text: str) -> str:
    """PIL's built-in font has no glyphs beyond ASCII."""
    for a, b in (("—", "-"), ("×", "x"), ("→", "->"), ("²", "^2")):
        text = text.replace(a, b)
    return text.encode("ascii", "replace").decode()


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
