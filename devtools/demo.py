"""The main job, in a real headless ComfyUI (CPU):

    bash scripts/demo.sh            (= setup + python -m devtools.demo)

1. The shipped demo workflow (workflows/glance_reference_demo.json) on the pack's reference teacher: the One-Shot
   Trainer learns the Slow/Fast experts from ONE photo, then held-out captions are sampled with the 10-step Glance
   graph and, from the same noise, with the teacher's 50 steps (and, for scale, plain 10-step Euler). Writes
   reference_sheet.png and the times, speedup and fidelity (PSNR/SSIM to the 50-step output) into the report.
2. Every other shipped workflow, on tiny seeded stand-ins of FLUX / Qwen-Image under the workflows' file names
   (random weights: those images are patterns, not pictures), timed.

Everything goes to out/demo/ (or --out): images, sheets, report.md, report.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from . import comfy_env, tiny_models, workflow
from .server import ComfyServer, error_message

RUNS = [
    ("glance_flux_10step", "Glance FLUX, 10 evaluations (5 Slow + 5 Fast)"),
    ("flux_base_50step", "FLUX base, 50 evaluations"),
    ("glance_qwen_image_10step", "Glance Qwen-Image, 10 steps × CFG 2 = 20 evaluations"),
    ("glance_flux_train_one_image", "One-Shot Trainer on one photo (first run trains), then Glance 10 steps"),
    ("arcflow_flux_2step", "ArcFlow FLUX, 2 evaluations"),
    ("arcflow_qwen_image_2step", "ArcFlow Qwen-Image, 2 evaluations"),
]


def _timed_run(srv: ComfyServer, api: dict, ui: dict) -> tuple[float, dict]:
    t = time.perf_counter()
    entry = srv.run(api, workflow=ui)
    if entry["status"]["status_str"] != "success":
        raise RuntimeError(error_message(entry))
    return time.perf_counter() - t, entry


def _sampler_ids(api: dict) -> list[str]:
    return [k for k, n in api.items() if n["class_type"] == "RandomNoise"]


def _sampling_only(api: dict, prefix: str) -> dict:
    """The same prompt ending in SaveLatent: times the sampling without the VAE decode."""
    api = {k: v for k, v in api.items() if v["class_type"] not in ("VAEDecode", "SaveImage")}
    sampler = next(k for k, v in api.items() if v["class_type"] == "SamplerCustomAdvanced")
    api["latent_out"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": prefix}}
    return api


def _median_time(srv: ComfyServer, api: dict, ui: dict, repeats: int) -> list[float]:
    times = []
    for i in range(repeats):
        for nid in _sampler_ids(api):
            api[nid]["inputs"]["noise_seed"] = 1000 + i  # a new seed: ComfyUI cannot serve a cached result
        times.append(_timed_run(srv, api, ui)[0])
    return times


#: Captions the demo's experts never saw (they learn from the astronaut photo, caption "astronaut wide").
HELD_OUT = [
    "cat close",
    "moon wide",
    "retina close",
    "brick wide",
    "clock close",
    "face wide",
    "gravel close",
    "rocket wide",
]
REF_NODES = {"caption": "4", "glance_guider": "8", "noise": "20", "glance_save": "25", "teacher_save": "28"}


def _outputs(srv: ComfyServer, entry: dict, node: str) -> np.ndarray:
    imgs = entry["outputs"][node]["images"]
    return (
        np.stack(
            [np.asarray(Image.open(srv.base / "output" / i["subfolder"] / i["filename"]).convert("RGB")) for i in imgs]
        ).astype(np.float64)
        / 255.0
    )


def _branch(api: dict, keep: str) -> dict:
    """The prompt with only one SaveImage branch (the trainer's output stays cached in ComfyUI)."""
    drop = {"glance": ("26", "27", "28", "12", "13"), "teacher": ("23", "24", "25", "8", "11")}[keep]
    return {k: v for k, v in api.items() if k not in drop}


def reference_demo(srv: ComfyServer, info: dict, out: Path, repeats: int) -> dict:
    from skimage.metrics import structural_similarity

    ui = json.loads((comfy_env.REPO / "workflows" / "glance_reference_demo.json").read_text())
    workflow.check_links(ui, info)
    api = workflow.to_api(ui, info)
    n = REF_NODES
    euler = json.loads(json.dumps(api))
    euler[n["glance_guider"]]["inputs"]["model"] = ["1", 0]  # the teacher itself on the Glance sigmas
    default = api[n["caption"]]["inputs"]["text"]
    train_s, first = _timed_run(srv, api, ui)  # trains the experts (then cached) and samples the default caption
    print(f"reference demo: trained the Slow/Fast experts on one photo and sampled in {train_s:.1f} s")
    rows, tiles = [], []
    for cap in HELD_OUT:
        for a in (api, euler):
            a[n["caption"]]["inputs"]["text"] = cap
        # ComfyUI reports only the nodes it ran: an unchanged prompt would come back empty from its cache.
        entry = first if cap == default else _timed_run(srv, api, ui)[1]
        glance = _outputs(srv, entry, n["glance_save"])
        teacher = _outputs(srv, entry, n["teacher_save"])
        plain = _outputs(srv, _timed_run(srv, _branch(euler, "glance"), ui)[1], n["glance_save"])
        score = {}
        for name, imgs in (("glance", glance), ("euler10", plain)):
            mse = ((imgs - teacher) ** 2).reshape(len(imgs), -1).mean(1)
            score[f"{name}_psnr"] = float(np.mean(10 * np.log10(1 / np.maximum(mse, 1e-12))))
            score[f"{name}_ssim"] = float(
                np.mean(
                    [
                        structural_similarity(x, y, channel_axis=-1, data_range=1.0, win_size=7)
                        for x, y in zip(imgs, teacher)
                    ]
                )
            )
        rows.append({"caption": cap, **score})
        tiles.append((cap, teacher, glance, plain))
        print(
            f"  {cap:14s} Glance {score['glance_psnr']:.2f} dB / SSIM {score['glance_ssim']:.3f};  plain 10-step "
            f"Euler {score['euler10_psnr']:.2f} dB / {score['euler10_ssim']:.3f}"
        )
    times = {}
    for name, a in (("glance", _branch(api, "glance")), ("teacher", _branch(api, "teacher"))):
        times[name] = _median_time(srv, a, ui, repeats)
    _reference_sheet(tiles, out / "reference_sheet.png")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "caption"}
    return {
        "captions": rows,
        "mean": mean,
        "first_run_with_training_s": round(train_s, 2),
        "glance_run_s": round(statistics.median(times["glance"]), 3),
        "teacher_run_s": round(statistics.median(times["teacher"]), 3),
        "speedup": round(statistics.median(times["teacher"]) / statistics.median(times["glance"]), 2),
    }


def _reference_sheet(tiles: list, path: Path, scale: int = 3) -> None:
    from PIL import ImageDraw

    rows = []
    for _cap, *groups in tiles:
        strip = [np.pad(np.concatenate(list(g), axis=1), ((0, 0), (0, 6), (0, 0)), constant_values=1.0) for g in groups]
        rows.append(np.pad(np.concatenate(strip, axis=1), ((0, 4), (0, 0), (0, 0)), constant_values=1.0))
    grid = (np.concatenate(rows) * 255).round().astype(np.uint8)
    im = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    label = Image.new("RGB", (im.width + 130, im.height + 24), "white")
    label.paste(im, (130, 24))
    draw = ImageDraw.Draw(label)
    w = (im.width) // 3
    for i, t in enumerate(("teacher, 50 steps", "Glance, 10 steps", "plain Euler, 10 steps")):
        draw.text((130 + i * w + 4, 6), t, fill="black")
    h = im.height // len(tiles)
    for r, (cap, *_) in enumerate(tiles):
        draw.text((4, 24 + r * h + h // 2 - 6), cap, fill="black")
    label.save(path)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=comfy_env.REPO / "out" / "demo")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (the workflows say 1024)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per workflow (new seed each, warm model)")
    args = ap.parse_args(argv)

    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    comfy_env.import_comfy()  # tiny models are built with ComfyUI's own classes
    base = out / "comfyui"
    tiny_models.write_workflow_assets(base / "models")
    tiny_models.write_example_image(base / "input")
    results = {}
    with ComfyServer(base) as srv:
        info = srv.object_info()
        ref = reference_demo(srv, info, out, args.repeats)
        for name, label in RUNS:
            ui = json.loads((comfy_env.REPO / "workflows" / f"{name}.json").read_text())
            workflow.check_links(ui, info)
            api = tiny_models.tiny_prompt(workflow.to_api(ui, info), args.size)
            cold, entry = _timed_run(srv, api, ui)  # loads the models
            times = _median_time(srv, api, ui, args.repeats)
            sampling = _median_time(srv, _sampling_only(api, name), ui, args.repeats)
            img = next(i for o in entry["outputs"].values() for i in o.get("images", []) if i["type"] == "output")
            dest = out / "images" / f"{name}.png"
            shutil.copy(base / "output" / img["subfolder"] / img["filename"], dest)
            results[name] = {
                "label": label,
                "first_run_s": round(cold, 3),
                "median_run_s": round(statistics.median(times), 3),
                "runs_s": [round(t, 3) for t in times],
                "median_sampling_s": round(statistics.median(sampling), 3),
                "image": str(dest.relative_to(out)),
            }
            print(
                f"{label}: first {cold:.2f} s, median of {len(times)} warm runs {statistics.median(times):.2f} s, "
                f"sampling only {statistics.median(sampling):.2f} s"
            )

    base = results["flux_base_50step"]
    speedup = base["median_run_s"] / results["glance_flux_10step"]["median_run_s"]
    sampling_speedup = base["median_sampling_s"] / results["glance_flux_10step"]["median_sampling_s"]
    arcflow_speedup = base["median_sampling_s"] / results["arcflow_flux_2step"]["median_sampling_s"]
    report = {
        "reference_demo": ref,
        "size": args.size,
        "device": "cpu",
        "models": "tiny seeded stand-ins (random weights)",
        "runs": results,
        "flux_speedup_glance_vs_base": round(speedup, 2),
        "flux_sampling_speedup_glance_vs_base": round(sampling_speedup, 2),
        "flux_sampling_speedup_arcflow_vs_base": round(arcflow_speedup, 2),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _sheet(out, [n for n, _ in RUNS])
    m = ref["mean"]
    lines = [
        "# comfyui-glance demo run",
        "",
        "## Glance on the reference teacher (workflows/glance_reference_demo.json)",
        "",
        "One-Shot Trainer, objective 'official', on ONE photo (astronaut, caption 'astronaut wide'); then "
        f"{len(HELD_OUT)} held-out captions × 4 seeds, sampled with the 10-step Glance graph and with the teacher's "
        "50 steps from the same noise (CFG 3, so 20 vs 100 evaluations).",
        "",
        f"- first run (training both experts + sampling): {ref['first_run_with_training_s']} s",
        f"- sampling a batch of 4, whole prompt: Glance {ref['glance_run_s']} s, teacher {ref['teacher_run_s']} s: "
        f"**{ref['speedup']}×** faster",
        f"- fidelity to the teacher's 50-step output (mean over captions): Glance **{m['glance_psnr']:.2f} dB** PSNR, "
        f"SSIM {m['glance_ssim']:.3f}; plain 10-step Euler on the same sigmas {m['euler10_psnr']:.2f} dB, "
        f"SSIM {m['euler10_ssim']:.3f}",
        "",
        "| held-out caption | Glance PSNR (dB) | Glance SSIM | plain Euler 10 PSNR (dB) | plain Euler 10 SSIM |",
        "|---|---|---|---|---|",
        *[
            f"| {r['caption']} | {r['glance_psnr']:.2f} | {r['glance_ssim']:.3f} | {r['euler10_psnr']:.2f} | "
            f"{r['euler10_ssim']:.3f} |"
            for r in ref["captions"]
        ],
        "",
        "Side by side (teacher | Glance | plain Euler, 4 seeds each): reference_sheet.png",
        "",
        "## Every shipped workflow on tiny stand-ins",
        "",
        f"Real headless ComfyUI (CPU) with the pack; shipped workflows at {args.size}² on tiny seeded stand-in "
        "models (random weights, so the images are patterns, not pictures).",
        "",
        "| workflow | first run (s) | median warm run (s) | median sampling only (s) |",
        "|---|---|---|---|",
        *[
            f"| {r['label']} | {r['first_run_s']} | {r['median_run_s']} | {r['median_sampling_s']} |"
            for r in results.values()
        ],
        "",
        f"Speedup, Glance FLUX 10 steps vs base 50 steps: **{sampling_speedup:.2f}×** in sampling, "
        f"{speedup:.2f}× for the whole prompt (incl. VAE decode and saving); ArcFlow 2 steps vs base 50 steps: "
        f"**{arcflow_speedup:.2f}×** in sampling. Sampling times include ComfyUI's per-prompt overhead.",
        "",
        "Side-by-side: sheet.png",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(
        f"\nReference demo sheet: {out / 'reference_sheet.png'}\nImages: {out / 'images'}\n"
        f"Sheet:  {out / 'sheet.png'}\nReport: {out / 'report.md'}"
    )
    return out


def _sheet(out: Path, names: list[str]) -> None:
    imgs = [np.asarray(Image.open(out / "images" / f"{n}.png").convert("RGB")) for n in names]
    h = max(i.shape[0] for i in imgs)
    pad = [np.pad(i, ((0, h - i.shape[0]), (0, 8), (0, 0)), constant_values=255) for i in imgs]
    Image.fromarray(np.concatenate(pad, axis=1)).save(out / "sheet.png")


if __name__ == "__main__":
    main()
