"""ArcFlow sampling cost, side by side in one run.

    .venv/bin/python -m bench.bench_arcflow                        # CPU, tiny FLUX, 512²
    .venv/bin/python -m bench.bench_arcflow --device cuda --full   # full-size FLUX.1 (random bf16), 1024²

- arcflow:  ArcFlowSampler, 2 steps, on the model with an ArcFlow adapter (K = 16, heads + LoRA);
- bare:     2 evaluations of the plain model (euler, same sigmas): the floor ArcFlow is compared with;
- teacher:  the plain model, 50 euler steps with CFG 3.5 against an empty negative (100 evaluations), the
            reference the paper's 40× is measured against (FLUX is guidance-distilled, so this is an
            upper bound on what FLUX.1-dev itself needs; it is what Qwen-Image's 50-step CFG costs).
Timed as a user pays per image with one loaded model: the ArcFlow model and the plain model are timed in
separate blocks (each block starts with an untimed warm-up that loads the model and merges the adapter's LoRA
once), alternating short blocks over ``--rounds`` so machine drift hits both; inside the plain model's block the
bare and teacher runs alternate (same model, nothing to re-merge). Medians over all timed runs.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench.bench_phase_lora import build_model, conditioning, timed
from devtools import comfy_env, tiny_models


def time_blocks(groups: list[dict], repeats: int, rounds: int, device: str) -> dict[str, list[float]]:
    """Wall times per variant. Each group holds the variants of ONE model: a round runs each group as a block
    (one untimed warm-up call, then ``repeats`` timed round-robin calls), so no timed call pays for loading a
    model or merging/unmerging a LoRA. Many short rounds keep the blocks interleaved against machine drift."""
    import comfy.model_management as mm

    times: dict[str, list[float]] = {k: [] for g in groups for k in g}
    for _ in range(rounds):
        for group in groups:
            mm.unload_all_models()
            next(iter(group.values()))()  # warm-up: loads the model (and merges its LoRA) once, untimed
            for _ in range(repeats):
                for k, f in group.items():
                    times[k].append(timed(f, device))
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per variant and block")
    ap.add_argument("--rounds", type=int, default=7, help="blocks per model (alternating)")
    ap.add_argument("--hidden", type=int, default=None, help="width of the CPU model (tiny: 64; heads of 24)")
    ap.add_argument("--depth", type=int, default=None, help="double and single blocks of the CPU model")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    nodes = comfy_env.import_comfy(cpu=args.device == "cpu")
    import importlib

    import comfy.sample
    import comfy.samplers

    pack = comfy_env.pack()
    arcflow_model = importlib.import_module(pack.__name__ + ".glance_core.arcflow_model")
    cfg = dict(tiny_models.FLUX_DEV if args.full else tiny_models.FLUX_TINY)
    if args.hidden:  # a wider CPU model: the heads' share of the compute shrinks towards full size
        cfg.update(hidden_size=args.hidden, num_heads=args.hidden // 32, axes_dim=[8, 12, 12])
    if args.depth:
        cfg.update(depth=args.depth, depth_single_blocks=2 * args.depth)
    dtype = torch.bfloat16 if args.full else torch.float32
    size = args.size or (1024 if args.full else 512)
    model = build_model(cfg, args.device, dtype)
    adapter = tiny_models.arcflow_adapter("flux", 1, k=16, rank=256 if args.full else 4, config=cfg)
    arc_model = arcflow_model.apply_arcflow(model, adapter, "bench adapter", 1.0, 3.2)
    pos = conditioning(cfg, 512 if args.full else 64, args.device)
    neg = conditioning(cfg, 512 if args.full else 64, args.device, seed=2)
    latent = torch.zeros(1, 16, size // 8, size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    two = torch.tensor([1.0, 0.7619, 0.0])
    ms = model.get_model_object("model_sampling")
    fifty = torch.tensor([ms.percent_to_sigma(i / 50) for i in range(50)] + [0.0])
    arc_sampler = comfy.samplers.KSAMPLER(pack.glance_core.arcflow_sampler.sample)
    euler = comfy.samplers.sampler_object("euler")

    def run(m, sampler, sigmas, cfg_scale, negative):
        return comfy.sample.sample_custom(
            m, noise, cfg_scale, sampler, sigmas, pos, negative, latent, disable_pbar=True, seed=0
        )

    groups = [
        {"arcflow": lambda: run(arc_model, arc_sampler, two, 1.0, [])},
        {"bare": lambda: run(model, euler, two, 1.0, []), "teacher": lambda: run(model, euler, fifty, 3.5, neg)},
    ]
    times = time_blocks(groups, args.repeats, args.rounds, args.device)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "config": "FLUX.1-dev (random bf16)"
        if args.full
        else f"FLUX fp32, width {cfg['hidden_size']}, {cfg['depth']}+{cfg['depth_single_blocks']} blocks",
        "size": size,
        "timed_runs": {k: len(v) for k, v in times.items()},
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "ratio_arcflow_over_bare": round(med["arcflow"] / med["bare"], 4),
        "speedup_vs_teacher_100_evals": round(med["teacher"] / med["arcflow"], 2),
    }
    if args.device.startswith("cuda"):
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    del nodes
    return result


if __name__ == "__main__":
    main()
