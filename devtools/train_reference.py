"""Train the pack's reference teacher (see ``glance_core.reference_model``) on scikit-image's bundled photos.

    .venv/bin/python -m devtools.train_reference            (≈ 25 min on 2 busy CPU cores; writes assets/)

Data: random crops of 17 photographs (astronaut, coffee, cat, rocket, … and LFW faces), resized to 32×32,
randomly flipped. A caption names the photo and, optionally, the framing: ``wide`` (most of the photo) or
``close`` (a detail, a quarter to two fifths of its shorter side). 10 % of captions are dropped (the empty
caption) so the model can be sampled with CFG, which makes its trajectories curved. Plain flow matching on the
velocity ε − x0 at logit-normal, FLUX-shifted sigmas; AdamW with an EMA of the weights, which is what is saved.
The same seed and steps give the same file.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import comfy_env

#: Caption word → the scikit-image photo it names.
PHOTOS = {
    "astronaut": "astronaut",
    "coffee": "coffee",
    "cat": "chelsea",
    "rocket": "rocket",
    "coins": "coins",
    "camera": "camera",
    "galaxy": "hubble_deep_field",
    "tissue": "immunohistochemistry",
    "retina": "retina",
    "colorwheel": "colorwheel",
    "motorcycle": "stereo_motorcycle",
    "moon": "moon",
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "clock": "clock",
    "face": "lfw_subset",
}
FRAMINGS = ("wide", "close")
VOCAB = ["", *PHOTOS, *FRAMINGS]
SIZE = 32
#: Photos are first resized so their shorter side is PREP pixels (a close crop then still has ≥ 40).
PREP = 160
#: Crop side as a fraction of the photo's shorter side, per framing.
CROP = {"wide": (0.75, 1.0), "close": (0.25, 0.4)}


def photos() -> dict[str, torch.Tensor]:
    """Each photo as float RGB [N, 3, H, W] in [0, 1] (LFW: 200 faces; others: one image)."""
    import skimage.data

    out = {}
    for word, name in PHOTOS.items():
        im = getattr(skimage.data, name)()
        if isinstance(im, tuple):  # stereo_motorcycle → (left, right, disparity)
            im = im[0]
        a = np.asarray(im, dtype=np.float32)
        if a.max() > 1.0:
            a = a / 255.0
        if a.ndim == 3 and a.shape[0] == 200:  # lfw_subset: [200, 25, 25] grey faces
            t = torch.from_numpy(a).unsqueeze(1).expand(-1, 3, -1, -1)
        else:
            t = torch.from_numpy(a)
            t = t.unsqueeze(-1).expand(*t.shape, 3) if t.ndim == 2 else t[..., :3]
            t = t.permute(2, 0, 1).unsqueeze(0)
        short = min(t.shape[-2:])
        if short > PREP:  # once, here: antialiased resizing of a 1400-pixel crop per sample would dominate training
            hw = [round(d * PREP / short) for d in t.shape[-2:]]
            t = F.interpolate(t, size=hw, mode="bilinear", antialias=True, align_corners=False)
        out[word] = t.contiguous()
    return out


def crop(photo: torch.Tensor, framing: str, g: torch.Generator) -> torch.Tensor:
    """A random ``framing`` crop of one of ``photo``'s images, flipped at random, as [3, SIZE, SIZE] in [-1, 1]."""
    img = photo[int(torch.randint(photo.shape[0], (1,), generator=g))]
    h, w = img.shape[-2:]
    lo, hi = CROP[framing]
    side = max(4, int(min(h, w) * (lo + (hi - lo) * float(torch.rand((), generator=g)))))
    y = int(torch.randint(h - side + 1, (1,), generator=g))
    x = int(torch.randint(w - side + 1, (1,), generator=g))
    c = img[:, y : y + side, x : x + side].unsqueeze(0)
    c = F.interpolate(c, size=(SIZE, SIZE), mode="bilinear", antialias=side > SIZE, align_corners=False)[0]
    if float(torch.rand((), generator=g)) < 0.5:
        c = c.flip(-1)
    return c.clamp(0, 1) * 2 - 1


def sample_batch(data: dict[str, torch.Tensor], n: int, g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """``n`` crops and their captions ('' for 10 %, the photo's word alone for 20 %, else word + framing)."""
    words = list(PHOTOS)
    xs, caps = [], []
    for _ in range(n):
        word = words[int(torch.randint(len(words), (1,), generator=g))]
        framing = FRAMINGS[int(torch.randint(2, (1,), generator=g))]
        xs.append(crop(data[word], framing, g))
        u = float(torch.rand((), generator=g))
        caps.append("" if u < 0.1 else word if u < 0.3 else f"{word} {framing}")
    return torch.stack(xs), caps


def sigmas(n: int, g: torch.Generator, mu: float = 1.15) -> torch.Tensor:
    """Logit-normal times, FLUX-shifted like the sampling schedule (a fifth uniform, to cover the ends)."""
    t = torch.sigmoid(torch.randn(n, generator=g))
    t = torch.where(torch.rand(n, generator=g) < 0.2, torch.rand(n, generator=g), t).clamp(1e-4, 1.0)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def initial_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Seeded N(0, 1/fan_in) weights (ComfyUI's layers skip torch's init), output layer zeroed."""
    from glance_core import reference_model

    from . import tiny_models

    shapes = {k: v.shape for k, v in reference_model.build_model(config).model.diffusion_model.state_dict().items()}
    sd = tiny_models.seeded_state_dict(shapes, seed)
    for k in sd:
        if k.startswith("final_layer.linear") or (k.startswith("final_layer.adaLN") and k.endswith("weight")):
            sd[k] = torch.zeros_like(sd[k])
    return sd


def _copying_block(args: dict, extra: dict) -> dict:
    """ComfyUI's FLUX blocks add residuals in place into tensors autograd has saved; run each block on cloned
    inputs with every saved tensor copied, so full-model training can backpropagate through them."""
    tensors = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        return extra["original_block"](tensors)


def _trainable_options(config: dict) -> dict:
    blocks = {("double_block", i): _copying_block for i in range(config["depth"])}
    blocks |= {("single_block", i): _copying_block for i in range(config["depth_single_blocks"])}
    return {"patches_replace": {"dit": blocks}}


def train(
    out: Path, steps: int, batch: int, seed: int, lr: float, log_every: int = 50, threads: int | None = None
) -> dict:
    comfy_env.import_comfy()
    from glance_core.training import training_mode

    with training_mode():  # ComfyUI's switch to autograd-capable kernels (RoPE) on releases that have it
        return _train(out, steps, batch, seed, lr, log_every, threads)


def _train(out: Path, steps: int, batch: int, seed: int, lr: float, log_every: int, threads: int | None) -> dict:
    from safetensors.torch import save_file

    from glance_core import reference_model as rm

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    config = dict(rm.CONFIG)
    patcher = rm.build_model(config, initial_weights(config, seed), device="cpu")
    dm = patcher.model.diffusion_model
    dm.train()
    params = [p for p in dm.parameters()]
    for p in params:
        p.requires_grad_(True)
    emb = torch.nn.Parameter(torch.randn(len(VOCAB), config["context_in_dim"], generator=g))
    ema = {k: v.detach().clone() for k, v in dm.state_dict().items()}
    ema_emb = emb.detach().clone()
    opt = torch.optim.AdamW([*params, emb], lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    data = photos()
    options = _trainable_options(config)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        x0, caps = sample_batch(data, batch, g)
        ids = torch.tensor([rm.padded(VOCAB, c) for c in caps])
        ctx = emb[ids]
        s = sigmas(batch, g)
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
        v = dm(xt, s, ctx, y=ctx.mean(1), transformer_options=options)
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*params, emb], 1.0)
        for group in opt.param_groups:  # warm-up, then cosine decay to 10 %
            group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v_ in dm.state_dict().items():
                ema[k].lerp_(v_, 1 - decay)
            ema_emb.lerp_(emb, 1 - decay)
        losses.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            print(f"step {step + 1}/{steps}  loss {np.mean(losses[-log_every:]):.4f}  {el / 60:.1f} min", flush=True)
    info = {
        "trained_by": "python -m devtools.train_reference",
        "data": "random 32x32 crops of scikit-image's bundled photos: "
        + ", ".join(f"{w}={n}" for w, n in PHOTOS.items()),
        "captions": "'<subject>', '<subject> wide' or '<subject> close'; '' (10 %) for CFG",
        "steps": steps,
        "batch": batch,
        "seed": seed,
        "learning_rate": lr,
        "final_loss": round(float(np.mean(losses[-200:])), 5),
        "minutes": round((time.perf_counter() - t0) / 60, 2),
        "size": SIZE,
    }
    sd = {k: v.contiguous() for k, v in ema.items()}
    sd[rm.TEXT_KEY] = ema_emb.contiguous()
    meta = {rm.META_CONFIG: json.dumps(config), rm.META_VOCAB: json.dumps(VOCAB), rm.META_INFO: json.dumps(info)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata=meta)
    tmp.replace(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return info


def main(argv: list[str] | None = None) -> None:
    from glance_core import reference_model as rm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=rm.ASSETS / rm.REFERENCE_NAME)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    train(args.out, args.steps, args.batch, args.seed, args.lr, threads=args.threads)


if __name__ == "__main__":
    main()
