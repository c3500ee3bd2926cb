"""How good is the reference teacher? Prompt-following score at 50 steps and how far plain few-step Euler is off.

    .venv/bin/python -m bench.bench_teacher [--model FILE] [--seeds 4] [--cfg 8] [--cfg-below-sigma S]
                                                                                     (≈ 5 min, one thread)

For the seen and the held-out captions of ``glance_core.scenes`` (× seeds): the score of the teacher's 50-step
output (per category and overall; for the position captions also how often the relation holds when both objects
are drawn, against the chance of a random arrangement), the score and PSNR to that output of plain Euler at 10
steps (the Glance sigmas and the simple schedule), and a sheet (out/bench_teacher/sheet_*.png: 50 steps | 10-step
Euler, per caption).
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import numpy as np
import torch

from devtools import comfy_env
from glance_core import reference_model, scenes


def _pack(name: str):
    return importlib.import_module(f"{comfy_env.pack().__name__}.{name}")


def sample(ref, model, captions: list[str], seeds: int, sigmas, cfg: float, sampler=None, offset: int = 0):
    """[len(captions) × seeds, H, W, 3] in [0, 1]: caption i's seeds are noises (offset + i·seeds + j)."""
    import comfy.samplers

    sampler = sampler or comfy.samplers.ksampler("euler")
    sig = torch.tensor([float(s) for s in sigmas], dtype=torch.float32)
    size = int(ref.info.get("size", scenes.SIZE))
    out = []
    for i, cap in enumerate(captions):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(ref.encode(cap), ref.encode("") if cfg != 1.0 else [])
        guider.set_cfg(cfg)
        noise = torch.stack(
            [
                torch.randn((3, size, size), generator=torch.Generator().manual_seed(offset + i * seeds + j))
                for j in range(seeds)
            ]
        )
        with torch.inference_mode():
            x = guider.sample(noise, torch.zeros_like(noise), sampler, sig, disable_pbar=True, seed=0)
        out.append(((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1))
    return torch.cat(out).numpy()


def guidance_below(model, max_sigma: float):
    """A clone of ``model`` that applies CFG only while σ ≤ ``max_sigma`` and takes the conditional prediction alone
    above it (guidance in a limited interval): the layout, decided at high noise, then follows the caption's count
    instead of being pushed to fill every cell."""

    def cfg(args: dict) -> torch.Tensor:
        cond, uncond, sigma = args["cond"], args["uncond"], args["sigma"]
        scale = torch.where(sigma <= max_sigma, args["cond_scale"], 1.0).to(cond.dtype)
        return uncond + (cond - uncond) * scale.view(-1, *([1] * (cond.ndim - 1)))

    patched = model.clone()
    patched.set_model_sampler_cfg_function(cfg)
    return patched


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def sheet(columns: list[tuple[str, np.ndarray]], captions: list[str], seeds: int, path: Path, scale: int = 3) -> None:
    """One row per caption (its text at the left), one block of ``seeds`` tiles per column (its name on top)."""
    from PIL import Image, ImageDraw

    size = columns[0][1].shape[1] * scale
    label, head, gap = 250, 16, 10
    block = seeds * (size + 2) + gap
    im = Image.new("RGB", (label + len(columns) * block, head + len(captions) * (size + 2)), "white")
    draw = ImageDraw.Draw(im)
    for c, (name, imgs) in enumerate(columns):
        draw.text((label + c * block, 2), name, fill="black")
        for r in range(len(captions)):
            for j in range(seeds):
                tile = (imgs[r * seeds + j] * 255).round().astype(np.uint8)
                tile = Image.fromarray(tile).resize((size, size), Image.NEAREST)
                im.paste(tile, (label + c * block + j * (size + 2), head + r * (size + 2)))
    for r, cap in enumerate(captions):
        draw.text((4, head + r * (size + 2) + size // 2 - 6), cap, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=reference_model.CFG)
    ap.add_argument("--out", type=Path, default=comfy_env.REPO / "out" / "bench_teacher")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--cfg-below-sigma",
        type=float,
        default=None,
        help="apply CFG only while sigma <= this (the conditional model alone above it); default: at every step",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    comfy_env.import_comfy()
    import comfy.samplers

    rm = _pack("glance_core.reference_model")
    ref = rm.load(args.model or rm.ASSETS / rm.REFERENCE_NAME)
    model = ref.model if args.cfg_below_sigma is None else guidance_below(ref.model, args.cfg_below_sigma)
    ms = ref.model.get_model_object("model_sampling")
    s50 = comfy.samplers.calculate_sigmas(ms, "simple", 50).tolist()
    s10 = comfy.samplers.calculate_sigmas(ms, "simple", 10).tolist()
    glance10 = _pack("glance_core.schedules").preset("glance_flux").sigmas
    result: dict = {"model": str(args.model or rm.REFERENCE_NAME), "cfg": args.cfg, "seeds": args.seeds}
    if args.cfg_below_sigma is not None:
        result["cfg only below sigma"] = args.cfg_below_sigma
    for split, caps in (("seen", scenes.seen_captions()), ("held-out", scenes.held_out_captions())):
        labels = [c for c in caps for _ in range(args.seeds)]
        t50 = sample(ref, model, caps, args.seeds, s50, args.cfg)
        g10 = sample(ref, model, caps, args.seeds, glance10, args.cfg)
        e10 = sample(ref, model, caps, args.seeds, s10, args.cfg)
        result[split] = {
            "score 50 steps": scenes.score(t50, labels),
            "score Euler 10 (Glance sigmas)": scenes.score(g10, labels)["overall"],
            "score Euler 10 (simple)": scenes.score(e10, labels)["overall"],
            "PSNR Euler 10 (Glance sigmas)": psnr(g10, t50),
            "PSNR Euler 10 (simple)": psnr(e10, t50),
        }
        rate, found = scenes.relation_rate(t50, labels)
        result[split]["position: relation held, 50 steps (both colours found once)"] = rate
        result[split]["position: images with both colours found once"] = found
        result[split]["position: relation held by chance (random cells)"] = scenes.relation_chance(caps)
        sheet(
            [("teacher, 50 steps", t50), ("Euler, 10 steps (Glance sigmas)", g10)],
            caps,
            args.seeds,
            args.out / f"sheet_{split}.png",
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
