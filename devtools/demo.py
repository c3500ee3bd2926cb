"""The main job: the shipped Glance workflows in a real headless ComfyUI, on tiny seeded models.

    bash scripts/demo.sh            (= setup + python -m devtools.demo)

Until the embedded reference teacher exists, the models are tiny seeded stand-ins with the shipped
workflows' file names (random weights: the images show noise patterns, not pictures). Writes the
images, a side-by-side sheet, report.md and report.json into out/demo/ (or --out).
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
    lines = [
        "# comfyui-glance demo run",
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
    print(f"\nImages: {out / 'images'}\nSheet:  {out / 'sheet.png'}\nReport: {out / 'report.md'}")
    return out


def _sheet(out: Path, names: list[str]) -> None:
    imgs = [np.asarray(Image.open(out / "images" / f"{n}.png").convert("RGB")) for n in names]
    h = max(i.shape[0] for i in imgs)
    pad = [np.pad(i, ((0, h - i.shape[0]), (0, 8), (0, 0)), constant_values=255) for i in imgs]
    Image.fromarray(np.concatenate(pad, axis=1)).save(out / "sheet.png")


if __name__ == "__main__":
    main()
