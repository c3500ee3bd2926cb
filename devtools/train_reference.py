"""Train the pack's reference teacher (see ``glance_core.reference_model``) on scenes drawn in code.

    .venv/bin/python -m devtools.train_reference            (≈ 55 min on two CPU threads; writes assets/)

Data: ``glance_core.scenes`` — 1–3 coloured shapes on a light background (one per cell of a 2 × 2 layout) with
captions such as "two red circles" or "a blue square left of a yellow triangle", the two-object kinds drawn more
often (``scenes.CATEGORY_WEIGHTS``); some colour–shape pairs and relations are never drawn (the held-out
compositions). 10 % of captions are dropped (the empty caption) so the model
can be sampled with CFG, which makes its trajectories curved. Plain flow matching on the velocity ε − x0 at
logit-normal, FLUX-shifted sigmas; AdamW with an EMA of the weights, which is what is saved.
The same seed, steps and thread count give the same weights. The teacher takes each phrase of a caption
("a red circle" | "left of" | "a blue square") as one context token, the sum of its words' vectors, so an object's
colour is bound to its shape before the model sees it; ``--tokens words`` trains the older kind, one token per word.
With phrase tokens, relation slots (the objects of a relation take the slot of their side) and count tokens ("three
red circles" → three "a red circle" tokens) are on by default, as in the shipped file (``--no-relation-slots``,
``--no-count-tokens``; see ``reference_model.slots`` / ``groups``). The loader reads all of this from the file.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from glance_core import scenes

from . import comfy_env

if TYPE_CHECKING:
    from glance_core.reference_model import CaptionFormat

SIZE = scenes.SIZE


def sample_batch(
    n: int, rng: np.random.Generator, weights: tuple[float, ...] | None = None
) -> tuple[torch.Tensor, list[str]]:
    """``n`` scenes as [n, 3, SIZE, SIZE] in [-1, 1] and their captions ('' for 10 %, for CFG)."""
    imgs, caps = scenes.training_batch(n, rng, SIZE, weights)
    drop = rng.random(n) < 0.1
    caps = ["" if d else c for d, c in zip(drop, caps)]
    return torch.from_numpy(imgs).float().permute(0, 3, 1, 2) * 2 - 1, caps


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


def _step(
    dm,
    options: dict,
    emb: torch.Tensor,
    pos: torch.Tensor,
    captions: CaptionFormat,
    batch: int,
    rng,
    g,
    weights: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """One batch of plain flow matching on the velocity ε − x0."""
    x0, caps = sample_batch(batch, rng, weights)
    ctx = torch.stack([captions.context(emb, pos, c) for c in caps])
    s = sigmas(batch, g)
    eps = torch.randn(x0.shape, generator=g)
    xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
    v = dm(xt, s, ctx, y=ctx.mean(1), transformer_options=options)
    return F.mse_loss(v, eps - x0)


def train(
    out: Path,
    steps: int,
    batch: int,
    seed: int,
    lr: float,
    log_every: int = 50,
    threads: int | None = None,
    config: dict | None = None,
    snapshot_every: int = 0,
    phrases: bool = True,
    relation_slots: bool = False,
    weights: tuple[float, ...] | None = None,
    count_tokens: bool = False,
) -> dict:
    if (relation_slots or count_tokens) and not phrases:
        raise ValueError("relation slots and count tokens need phrase tokens (--tokens phrases)")
    comfy_env.import_comfy()
    from safetensors.torch import save_file

    from glance_core import reference_model as rm
    from glance_core.checkpoint import training_mode

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = dict(config or rm.CONFIG)
    captions = rm.CaptionFormat(  # how captions become tokens; written to the file's info below
        tuple(scenes.VOCAB),
        scenes.MAX_PHRASES if phrases else scenes.MAX_WORDS,
        tuple(scenes.PHRASE_STARTS) if phrases else None,
        relation_slots,
        dict(scenes.NUMBERS) if count_tokens else None,
    )
    patcher = rm.build_model(config, initial_weights(config, seed), device="cpu")
    dm = patcher.model.diffusion_model
    dm.train()
    params = [p for p in dm.parameters()]
    for p in params:
        p.requires_grad_(True)
    emb = torch.nn.Parameter(torch.randn(len(captions.vocab), config["context_in_dim"], generator=g))
    n_slots = captions.length + (len(rm.RELATION_SLOTS) if captions.relation_slots else 0)
    pos = torch.nn.Parameter(0.1 * torch.randn(n_slots, config["context_in_dim"], generator=g))
    ema = {k: v.detach().clone() for k, v in dm.state_dict().items()}
    ema_text = [emb.detach().clone(), pos.detach().clone()]
    opt = torch.optim.AdamW([*params, emb, pos], lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    options = _trainable_options(config)
    losses, t0 = [], time.perf_counter()

    def save(path: Path, done: int) -> dict:
        info = {
            "trained_by": "python -m devtools.train_reference",
            "data": "glance_core.scenes: 1-3 coloured shapes on a light background, drawn in code; never drawn: "
            + ", ".join(" ".join(p) for p in sorted(scenes.HELD_OUT_PAIRS))
            + "; never captioned: "
            + ", ".join(" ".join(r) for r in sorted(scenes.HELD_OUT_RELATIONS)),
            "captions": "e.g. 'a triangle', 'a red circle', 'a circle and a square', 'two red circles', "
            "'a red circle and a blue square', 'a red circle left of a blue square'; '' (10 %) for CFG",
            "example_caption": "a red circle left of a blue square",
            "context_tokens": captions.length,
            **({"phrase_starts": list(captions.phrase_starts)} if captions.phrase_starts else {}),
            **({"relation_slots": True} if captions.relation_slots else {}),
            **({"count_tokens": captions.count_words} if captions.count_words else {}),
            **({"category_weights": list(weights)} if weights else {}),
            "steps": done,
            "batch": batch,
            "seed": seed,
            "learning_rate": lr,
            "final_loss": round(float(np.mean(losses[-200:])), 5),
            "minutes": round((time.perf_counter() - t0) / 60, 2),
            "threads": torch.get_num_threads(),
            "size": SIZE,
        }
        # float16 on disk (half the size; the loader computes in float32): ≈ 1e-3 off the float32 weights
        sd = rm.canonical_keys({k: v.to(torch.float16).contiguous() for k, v in ema.items()})
        sd[rm.TEXT_KEY] = ema_text[0].to(torch.float16).contiguous()
        sd[rm.POSITION_KEY] = ema_text[1].to(torch.float16).contiguous()
        meta = {
            rm.META_CONFIG: json.dumps(config),
            rm.META_VOCAB: json.dumps(list(captions.vocab)),
            rm.META_INFO: json.dumps(info),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(sd, str(tmp), metadata=meta)
        tmp.replace(path)
        return info

    with training_mode():  # ComfyUI's switch to autograd-capable kernels (FLUX's RoPE) on releases that have it
        for step in range(steps):
            loss = _step(dm, options, emb, pos, captions, batch, rng, g, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*params, emb, pos], 1.0)
            for group in opt.param_groups:  # warm-up, then cosine decay to 10 %
                group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
            opt.step()
            decay = min(0.999, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v_ in dm.state_dict().items():
                    ema[k].lerp_(v_, 1 - decay)
                for e, t in zip(ema_text, (emb, pos)):
                    e.lerp_(t, 1 - decay)
            losses.append(float(loss.detach()))
            if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
                save(out.with_name(f"{out.stem}.step{step + 1}{out.suffix}"), step + 1)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                el = time.perf_counter() - t0
                print(
                    f"step {step + 1}/{steps}  loss {np.mean(losses[-log_every:]):.4f}  {el / 60:.1f} min", flush=True
                )
    info = save(out, steps)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return info


def parser() -> argparse.ArgumentParser:
    """The command line; its defaults train the shipped file."""
    from glance_core import reference_model as rm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=rm.ASSETS / rm.REFERENCE_NAME)
    ap.add_argument("--steps", type=int, default=7000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--snapshot-every", type=int, default=0, help="also write the EMA weights every N steps")
    ap.add_argument(
        "--tokens",
        choices=("words", "phrases"),
        default="phrases",
        help="one context token per phrase (an object's words summed: the shipped file) or per word (see README)",
    )
    ap.add_argument(
        "--relation-slots",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the two objects of a relation take the slot of their side (left/right/above/below), not of their "
        "place (default: on with phrase tokens, as the shipped file)",
    )
    ap.add_argument(
        "--count-tokens",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a counted phrase becomes one token per object ('three red circles' -> 3 x 'a red circle'; default: "
        "on with phrase tokens, as the shipped file)",
    )
    ap.add_argument(
        "--category-weights",
        type=lambda t: tuple(float(x) for x in t.split(",")),
        default=None,
        help="how often each caption kind is drawn, 6 numbers in scenes.CATEGORIES order (default: "
        "scenes.CATEGORY_WEIGHTS)",
    )
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    phrases = args.tokens == "phrases"
    train(
        args.out,
        args.steps,
        args.batch,
        args.seed,
        args.lr,
        threads=args.threads,
        snapshot_every=args.snapshot_every,
        phrases=phrases,
        relation_slots=phrases if args.relation_slots is None else args.relation_slots,
        weights=args.category_weights,
        count_tokens=phrases if args.count_tokens is None else args.count_tokens,
    )


if __name__ == "__main__":
    main()
