"""The prepared GPU check: full-size FLUX.1 and Qwen-Image, random bf16 weights, on CUDA, one table.

    python -m bench.gpu_check                  # on a machine with an NVIDIA GPU (≤ 8 min on one H100/H200)
    python -m bench.gpu_check --tiny           # the same code path on the tiny models, on the CPU (a smoke test)

For each architecture the model is built the way a user's ComfyUI loads it: a state dict of the real layout
(random bf16, seeded) through ``comfy.sd.load_diffusion_model_state_dict`` — ComfyUI's own detection and whichever
ModelPatcher class the runtime hands out (0.33 on CUDA: "Dynamic VRAM"). Then, with the model fully in VRAM and
again under a low-VRAM budget (ComfyUI's reserved-VRAM knob set so that about half the weights fit):

- loader ÷ bare: 10 Glance steps through the Phase-Aware LoRA Loader (official rank: FLUX 16, Qwen-Image 32) ÷
  the same 10 euler steps on the plain model (cfg 1, 1024²);
- trainer: the One-Shot Trainer (official objective, both experts, official rank/lr, 1024²): seconds per step
  (difference of a 2- and a 4-step run) and peak GPU memory;
- ArcFlow ÷ bare: ArcFlow Sampler, 2 steps on the ArcFlow Adapter Loader's model (K = 16) ÷ 2 euler steps on the
  plain model;
- distiller: ArcFlow Distiller seconds per iteration (difference of 1 and 2 iterations) and peak GPU memory.

Timed in blocks (each variant repeated on its own after a warm-up), so no row pays for ComfyUI swapping clones.
Prints a Markdown table and, with ``--json``, writes the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_phase_lora import timed
from devtools import comfy_env, tiny_models

GLANCE = {
    "flux": [1.0, 0.98698, 0.97320, 0.95861, 0.94312, 0.92665, 0.82570, 0.67799, 0.44120, 0.06055, 0.0],
    "qwen_image": [1.0, 0.97919, 0.95752, 0.93492, 0.91134, 0.88671, 0.74507, 0.56295, 0.32008, 0.02, 0.0],
}
BOUNDARY = {"flux": 0.934885, "qwen_image": 0.899025}
RANK = {"flux": 16, "qwen_image": 32}
FULL = {"flux": tiny_models.FLUX_DEV, "qwen_image": tiny_models.QWEN_IMAGE}


def _median_block(fn, repeats: int, device: str) -> float:
    fn()  # warm-up: loads the model and its patches once
    return statistics.median(timed(fn, device) for _ in range(repeats))


def _peak(fn, device: str) -> tuple[float, float]:
    """(seconds, peak GiB on the GPU; NaN on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    s = timed(fn, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return s, peak


def random_model(arch: str, cfg: dict, device: str, dtype: torch.dtype):
    """The runtime's own loader on a seeded random state dict of the real layout (weights made on ``device``,
    handed over on the CPU as from a file)."""
    import comfy.sd

    g = torch.Generator(device=device).manual_seed(0)
    sd = {}
    for key, shape in sorted(tiny_models.model_shapes(arch, cfg).items()):
        t = torch.empty(shape, device=device, dtype=dtype)
        if len(shape) >= 2:
            t.normal_(0.0, 1.0 / math.sqrt(shape[1:].numel()), generator=g)
        elif key.endswith(("scale", "norm.weight")):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=g)
        sd[key] = t.cpu()
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    if model is None:
        raise RuntimeError(f"ComfyUI did not detect the {arch} layout")
    return model


def conditioning(arch: str, cfg: dict, device: str, dtype: torch.dtype, seq: int) -> list:
    g = torch.Generator().manual_seed(1)
    if arch == "flux":
        ctx = torch.randn(1, seq, cfg["context_in_dim"], generator=g)
        extra = {"pooled_output": torch.randn(1, cfg["vec_in_dim"], generator=g), "guidance": 3.5}
    else:
        ctx, extra = torch.randn(1, seq, cfg["joint_attention_dim"], generator=g), {}
    return [[ctx.to(device, dtype), {k: v.to(device, dtype) if torch.is_tensor(v) else v for k, v in extra.items()}]]


def check(arch: str, args, nodes, loras: Path, lowvram: bool) -> dict:
    import comfy.model_management as mm
    import comfy.sd
    import numpy as np
    from skimage import data

    n = nodes.NODE_CLASS_MAPPINGS
    device, dtype = args.device, args.dtype
    cfg = tiny_models.CONFIGS[arch] if args.tiny else FULL[arch]
    size = args.size
    # Tiny configs are not what ComfyUI's detection assumes (full-size head counts): build them directly.
    model = tiny_models.build(arch, 0, dtype) if args.tiny else random_model(arch, cfg, device, dtype)
    pos = conditioning(arch, cfg, device, dtype, 16 if args.tiny else 256)
    latent = {"samples": torch.zeros(1, 16, size // 8, size // 8)}
    row: dict = {"arch": arch, "vram": "low" if lowvram else "full", "patcher": type(model).__name__}

    saved_reserve = mm.EXTRA_RESERVED_VRAM
    if lowvram:
        mm.unload_all_models()
        mm.soft_empty_cache()
        budget = int(0.5 * model.model_size())
        mm.EXTRA_RESERVED_VRAM = max(0, int(mm.get_free_memory(mm.get_torch_device())) - budget)
    try:

        def sample(m, sigmas, sampler) -> torch.Tensor:
            noise = n["RandomNoise"].execute(0).args[0]
            guider = n["BasicGuider"].execute(m, pos).args[0]
            out = n["SamplerCustomAdvanced"].execute(noise, guider, sampler, torch.tensor(sigmas), latent)
            return out.args[0]["samples"]

        euler = n["KSamplerSelect"].execute("euler").args[0]
        with torch.inference_mode():
            slow = tiny_models.glance_lora(arch, 1, RANK[arch], std=0.05, config=cfg)
            fast = tiny_models.glance_lora(arch, 2, RANK[arch], std=0.05, config=cfg)
            glance = (
                n["PhaseAwareLoRALoader"]
                .execute(model, "None", "None", 1.0, 1.0, BOUNDARY[arch], slow_lora_model=slow, fast_lora_model=fast)
                .args[0]
            )
            t_glance = _median_block(lambda: sample(glance, GLANCE[arch], euler), args.repeats, device)
            t_bare = _median_block(lambda: sample(model, GLANCE[arch], euler), args.repeats, device)
            row["loader_10_over_bare_10"] = t_glance / t_bare
            row["bare_10_s"] = t_bare
            if hasattr(model, "loaded_size"):
                row["loaded_fraction"] = model.loaded_size() / max(1, model.model_size())

            tiny_models.save_lora(
                loras / f"arcflow_{arch}.safetensors",
                tiny_models.arcflow_adapter(arch, 3, k=16, rank=RANK[arch], config=cfg),
            )
            arc = n["ArcFlowLoader"].execute(model, f"arcflow_{arch}.safetensors", 1.0, 3.2).args[0]
            arc_sampler = n["ArcFlowSampler"].execute().args[0]
            two = [1.0, 0.7619, 0.0]
            t_arc = _median_block(lambda: sample(arc, two, arc_sampler), args.repeats, device)
            t_two = _median_block(lambda: sample(model, two, euler), args.repeats, device)
            row["arcflow_2_over_bare_2"] = t_arc / t_two

            image = torch.from_numpy(data.astronaut().astype(np.float32) / 255.0)[None]
            vae = comfy.sd.VAE(sd=tiny_models.tiny_vae_state_dict(arch, 0))

            def train(steps: int):
                return n["OneShotTrainer"].execute(
                    model,
                    pos,
                    objective="official",
                    expert="both",
                    steps=steps,
                    rank=0,
                    alpha=0.0,
                    learning_rate=0.0,
                    seed=0,
                    target_layers="official",
                    batch=1,
                    resolution=size,
                    image=image,
                    vae=vae,
                )

            t2, _ = _peak(lambda: train(2), device)
            t4, peak = _peak(lambda: train(4), device)
            row["train_s_per_step"] = (t4 - t2) / (2 * 2)  # two experts, two more steps each
            row["train_peak_gib"] = peak

            def distill(iterations: int):
                return n["ArcFlowDistiller"].execute(
                    model,
                    pos,
                    iterations=iterations,
                    steps=2,
                    components=16,
                    rank=16,
                    learning_rate=1e-3,
                    batch=1,
                    resolution=size,
                    seed=0,
                )

            d1, _ = _peak(lambda: distill(1), device)
            d2, dpeak = _peak(lambda: distill(2), device)
            row["distill_s_per_iteration"] = d2 - d1
            row["distill_peak_gib"] = dpeak
    finally:
        mm.EXTRA_RESERVED_VRAM = saved_reserve
        mm.unload_all_models()
        mm.soft_empty_cache()
    return row


COLUMNS = [
    ("arch", "model", "{}"),
    ("vram", "VRAM", "{}"),
    ("patcher", "patcher", "{}"),
    ("loaded_fraction", "weights on GPU", "{:.2f}"),
    ("bare_10_s", "10 bare steps, s", "{:.3f}"),
    ("loader_10_over_bare_10", "loader 10 ÷ bare 10", "{:.3f}"),
    ("arcflow_2_over_bare_2", "ArcFlow 2 ÷ bare 2", "{:.3f}"),
    ("train_s_per_step", "train s/step", "{:.3f}"),
    ("train_peak_gib", "train peak GiB", "{:.1f}"),
    ("distill_s_per_iteration", "distil s/iteration", "{:.3f}"),
    ("distill_peak_gib", "distil peak GiB", "{:.1f}"),
]


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    lines = [head, sep]
    for r in rows:
        cells = [fmt.format(r[k]) if k in r else "–" for k, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (smoke test of the same path)")
    ap.add_argument("--arch", nargs="*", default=["flux", "qwen_image"])
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.device = "cpu" if args.tiny else "cuda"
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run on a machine with an NVIDIA GPU, or use --tiny on the CPU.")
    args.dtype = torch.float32 if args.tiny else torch.bfloat16
    args.size = 64 if args.tiny else 1024
    args.repeats = args.repeats or (1 if args.tiny else 3)

    nodes = comfy_env.import_comfy(cpu=args.tiny)
    import folder_paths

    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder_paths.add_model_folder_path("loras", tmp, is_default=True)
        for arch in args.arch:
            for lowvram in (False, True):
                if lowvram and args.tiny:
                    continue  # no VRAM budget on the CPU
                rows.append(check(arch, args, nodes, Path(tmp), lowvram))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    gpu = torch.cuda.get_device_name() if not args.tiny else "CPU (tiny models)"
    print(f"\n{gpu}, {args.size}², {args.dtype}, {time.perf_counter() - t0:.0f} s\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": gpu, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
