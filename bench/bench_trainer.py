"""One-image expert training: our OneShotTrainer against ComfyUI's own TrainLoraNode, same settings.

    .venv/bin/python -m bench.bench_trainer                        # CPU, tiny FLUX, 256², rank 16
    .venv/bin/python -m bench.bench_trainer --device cuda --full   # full-size FLUX.1 (random bf16), 1024²

Each trainer runs in its own process (peak memory is per process): seconds per step from the
difference between a run of S and of 2·S steps (setup cancels out), and peak RSS (CPU) or peak
GPU memory. Same model, image latent (scikit-image's astronaut), caption, rank, steps, resolution,
batch 1, AdamW, gradient checkpointing on for both; TrainLoraNode gets the latent twice because it
crashes on exactly one latent in ComfyUI 0.3.75 (``UnboundLocalError: multi_res``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _worker(args) -> dict:
    from bench.bench_phase_lora import build_model, conditioning
    from devtools import comfy_env, tiny_models

    nodes = comfy_env.import_comfy(cpu=args.device == "cpu")
    import numpy as np
    from skimage import data

    cfg = tiny_models.FLUX_DEV if args.full else tiny_models.FLUX_TINY
    dtype = torch.bfloat16 if args.full else torch.float32
    # Built outside inference mode: on CPU, TrainLoraNode cannot train a model whose weights are
    # inference-mode tensors (what a loader node makes there); ours converts them, so give both the same start.
    model = build_model(cfg, args.device, dtype)
    pos = conditioning(cfg, 512 if args.full else 64, args.device)
    image = torch.from_numpy(data.astronaut().astype(np.float32) / 255.0)[None]
    size = args.size
    latent_ch = 16
    g = torch.Generator().manual_seed(0)
    # A latent of the image's size (the VAE is not what is measured): random but fixed.
    x0 = torch.randn(1, latent_ch, size // 8, size // 8, generator=g)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with torch.inference_mode():
        if args.trainer == "glance":
            import importlib

            training = importlib.import_module(comfy_env.pack().__name__ + ".glance_core.training")
            from glance_core import schedules

            s = list(schedules.PRESETS["glance_flux"])
            job = training.ExpertJob("fast", s[5:10], s[6:11])
            training.train_expert(
                model,
                job,
                objective="official",
                positive=training.clone_conditioning(pos),
                rank=args.rank,
                alpha=float(args.rank),
                lr=5e-4,
                steps=args.steps,
                seed=0,
                targets="all_linear" if args.all_linear else "official",
                batch=1,
                x0=x0,
            )
        else:
            node = nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"]
            latents = [{"samples": x0}, {"samples": x0.clone()}]
            node.execute(
                model=[model],
                latents=latents,
                positive=[pos],
                batch_size=[1],
                steps=[args.steps],
                grad_accumulation_steps=[1],
                learning_rate=[5e-4],
                rank=[args.rank],
                optimizer=["AdamW"],
                loss_function=["MSE"],
                seed=[0],
                training_dtype=["bf16" if args.full else "fp32"],
                lora_dtype=["bf16" if args.full else "fp32"],
                algorithm=["LoRA"],
                gradient_checkpointing=[True],
                existing_lora=["[None]"],
            )
    seconds = time.perf_counter() - t
    out = {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.device.startswith("cuda"):
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del image
    return out


def _run(args, trainer: str, steps: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.bench_trainer",
        "--worker",
        "--trainer",
        trainer,
        "--steps",
        str(steps),
        "--device",
        args.device,
        "--size",
        str(args.size),
        "--rank",
        str(args.rank),
    ]
    if args.full:
        cmd.append("--full")
    if args.all_linear:
        cmd.append("--all-linear")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="S (runs of S and 2·S steps); default 20 CPU, 30 GPU")
    ap.add_argument("--all-linear", action="store_true", help="LoRA on every Linear (TrainLoraNode's coverage)")
    ap.add_argument("--trainer", default="glance")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.size = args.size or (1024 if args.full else 256)
    if args.worker:
        print(json.dumps(_worker(args)))
        return {}
    steps = args.steps or (30 if args.full else 20)
    result = {
        "device": args.device,
        "config": "FLUX.1-dev (random bf16)" if args.full else "tiny FLUX fp32",
        "size": args.size,
        "rank": args.rank,
        "steps": [steps, 2 * steps],
        "targets": "all_linear" if args.all_linear else "official (q/k/v/out)",
    }
    for trainer in ("glance", "comfy_TrainLoraNode"):
        a, b = _run(args, trainer, steps), _run(args, trainer, 2 * steps)
        if "error" in a or "error" in b:
            result[trainer] = {"error": a.get("error") or b.get("error")}
            continue
        per_step = (b["seconds"] - a["seconds"]) / steps
        result[trainer] = {
            "s_per_step": per_step,
            "steps_per_s": 1 / per_step,
            "peak_rss_mib": b["peak_rss_mib"],
            "peak_gpu_gib": b.get("peak_gpu_gib"),
        }
    g, c = result["glance"], result["comfy_TrainLoraNode"]
    if "error" not in g and "error" not in c:
        result["speed_ratio_glance_over_core"] = g["steps_per_s"] / c["steps_per_s"]
        result["rss_ratio_glance_over_core"] = g["peak_rss_mib"] / c["peak_rss_mib"]
        if g.get("peak_gpu_gib"):
            result["gpu_mem_ratio_glance_over_core"] = g["peak_gpu_gib"] / c["peak_gpu_gib"]
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
