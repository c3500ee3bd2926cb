"""The main job, in a real headless ComfyUI (CPU):

    bash scripts/demo.sh            (= setup + python -m devtools.demo)

1. The shipped demo workflow (workflows/glance_reference_demo.json) on the pack's reference teacher: the One-Shot
   Trainer learns the Slow/Fast experts from the teacher's own rollouts for six captions ('trajectory'), then
   held-out captions are sampled with the 10-step Glance graph and, from the same noise, with the teacher's 50 steps,
   plain 10-step Euler, the 2-step ArcFlow student the same graph distils (ArcFlow Distiller) and the released
   one-image recipe ('official'). Writes reference_sheet.png and the times, speedups, prompt-following score and
   PSNR to the 50-step output into the report.
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


#: Captions the demo samples: none of them among the experts' training captions, each a composition the teacher
#: never saw (a colour–shape pair or a relation left out of its data), two per kind of scene that names colours.
HELD_OUT = [
    "a green triangle left of a blue square",
    "a red circle below a blue triangle",
    "a yellow circle and a cyan triangle",
    "a blue triangle and a purple square",
    "two green triangles",
    "three purple squares",
    "a green triangle",
    "a yellow circle",
]
REF_NODES = {
    "loader": "1",
    "caption": "4",
    "trainer": "10",
    "glance_guider": "8",
    "noise": "20",
    "glance_save": "25",
    "teacher_save": "28",
    "distiller": "50",
    "arcflow_save": "57",
}
#: Each SaveImage branch of the demo graph: the nodes only it needs (the trainer and distiller are dropped with
#: their loss previews when no kept branch uses them).
BRANCHES = {
    "glance": ("23", "24", "25", "8", "11", "10"),
    "teacher": ("26", "27", "28", "12", "13"),
    "arcflow": ("55", "56", "57", "53", "52", "51", "50"),
}
SCENE_IMAGE = "reference_scene.png"


def _outputs(srv: ComfyServer, entry: dict, node: str) -> np.ndarray:
    imgs = entry["outputs"][node]["images"]
    return (
        np.stack(
            [np.asarray(Image.open(srv.base / "output" / i["subfolder"] / i["filename"]).convert("RGB")) for i in imgs]
        ).astype(np.float64)
        / 255.0
    )


def _branch(api: dict, keep: str) -> dict:
    """The prompt with only one SaveImage branch (the trainer's and distiller's outputs stay cached in ComfyUI)."""
    drop = {k for name, nodes in BRANCHES.items() if name != keep for k in nodes}
    return {k: v for k, v in api.items() if k not in drop}


def _official(api: dict) -> dict:
    """The same graph with the released recipe: plain loss on ONE rendered scene and its caption (the loader's
    prompt), the trainer's official settings."""
    n = REF_NODES
    api = json.loads(json.dumps(api))
    api["90"] = {"class_type": "LoadImage", "inputs": {"image": SCENE_IMAGE}}
    t = api[n["trainer"]]["inputs"]
    t.update(objective="official", steps=60, rank=0, alpha=0.0, learning_rate=0.0, target_layers="official", batch=1)
    t.update(image=["90", 0], vae=[n["loader"], 3], positive=[n["loader"], 1])
    return _branch(api, "glance")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(1 / np.maximum(mse, 1e-12))))


COLUMNS = [
    ("teacher", "teacher, 50 steps (100 evals)"),
    ("glance", "Glance, 10 steps (20 evals)"),
    ("euler10", "plain Euler, 10 steps (20 evals)"),
    ("arcflow", "ArcFlow, 2 steps (2 evals)"),
    ("official", "Glance 'official', 1 image"),
]


def reference_demo(srv: ComfyServer, info: dict, out: Path, repeats: int, quick: bool = False) -> dict:
    from glance_core import scenes

    ui = json.loads((comfy_env.REPO / "workflows" / "glance_reference_demo.json").read_text())
    workflow.check_links(ui, info)
    api = workflow.to_api(ui, info)
    n = REF_NODES
    if quick:  # a smoke run of the code path, not the demo
        api[n["trainer"]]["inputs"].update(steps=3, noises=1)
        api[n["distiller"]]["inputs"].update(iterations=3)
    # the trainer wants at least 64 px a side: the 32-px scene, each pixel 4 x 4 (it resizes back to 32)
    scene = (scenes.render(api[n["loader"]]["inputs"]["prompt"], 0) * 255).round().astype(np.uint8)
    Image.fromarray(scene.repeat(4, 0).repeat(4, 1)).save(srv.base / "input" / SCENE_IMAGE)
    euler = json.loads(json.dumps(api))
    euler[n["glance_guider"]]["inputs"]["model"] = [n["loader"], 0]  # the teacher itself on the Glance sigmas
    official = _official(api)
    default = api[n["caption"]]["inputs"]["text"]
    train_s, first = _timed_run(srv, api, ui)  # trains the experts (then cached) and samples the default caption
    print(f"reference demo: trained the Slow/Fast experts (trajectory) and sampled in {train_s:.1f} s", flush=True)
    official_s = None
    rows, tiles = [], []
    for cap in HELD_OUT[:2] if quick else HELD_OUT:
        for a in (api, euler, official):
            a[n["caption"]]["inputs"]["text"] = cap
        # ComfyUI reports only the nodes it ran: an unchanged prompt would come back empty from its cache.
        entry = first if cap == default else _timed_run(srv, api, ui)[1]
        imgs = {k: _outputs(srv, entry, n[f"{k}_save"]) for k in ("glance", "teacher", "arcflow")}
        imgs["euler10"] = _outputs(srv, _timed_run(srv, _branch(euler, "glance"), ui)[1], n["glance_save"])
        t, entry = _timed_run(srv, official, ui)
        official_s = official_s or t  # the first official run trains its experts
        imgs["official"] = _outputs(srv, entry, n["glance_save"])
        row = {"caption": cap}
        for key, _ in COLUMNS:
            row[f"{key}_score"] = scenes.score(imgs[key], [cap] * len(imgs[key]))["overall"]
            if key != "teacher":
                row[f"{key}_psnr"] = _psnr(imgs[key], imgs["teacher"])
        rows.append(row)
        tiles.append((cap, [imgs[k] for k, _ in COLUMNS], row))
        print(
            f"  {cap:40s} score teacher {row['teacher_score']:.2f} | Glance {row['glance_score']:.2f}, "
            f"{row['glance_psnr']:.2f} dB | Euler 10 {row['euler10_score']:.2f}, {row['euler10_psnr']:.2f} dB | "
            f"ArcFlow 2 {row['arcflow_score']:.2f}, {row['arcflow_psnr']:.2f} dB | "
            f"official {row['official_score']:.2f}, {row['official_psnr']:.2f} dB",
            flush=True,
        )
    times = {}
    for name in ("glance", "teacher", "arcflow"):
        times[name] = _median_time(srv, _branch(api, name), ui, repeats)
    _reference_sheet(tiles, out / "reference_sheet.png")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "caption"}
    return {
        "captions": rows,
        "mean": mean,
        "training": dict(api[n["trainer"]]["inputs"]),
        "cfg": api[n["glance_guider"]]["inputs"]["cfg"],
        "first_run_with_training_s": round(train_s, 2),
        "official_first_run_s": round(official_s or 0.0, 2),
        "glance_run_s": round(statistics.median(times["glance"]), 3),
        "teacher_run_s": round(statistics.median(times["teacher"]), 3),
        "arcflow_run_s": round(statistics.median(times["arcflow"]), 3),
        "speedup": round(statistics.median(times["teacher"]) / statistics.median(times["glance"]), 2),
        "arcflow_speedup": round(statistics.median(times["teacher"]) / statistics.median(times["arcflow"]), 2),
        "distiller": {k: api[n["distiller"]]["inputs"][k] for k in ("iterations", "components", "rank", "batch")},
    }


def _reference_sheet(tiles: list, path: Path, scale: int = 3) -> None:
    """One row per caption (the caption above it); per column 4 seeds, with the score and PSNR under them."""
    from PIL import ImageDraw

    size = tiles[0][1][0].shape[1] * scale
    block = 4 * (size + 2) + 16
    head, text, lab = 22, 14, 14
    row_h = lab + size + text + 8
    im = Image.new("RGB", (len(COLUMNS) * block + 8, head + len(tiles) * row_h), "white")
    draw = ImageDraw.Draw(im)
    for c, (_, title) in enumerate(COLUMNS):
        draw.text((8 + c * block, 4), title, fill="black")
    for r, (cap, groups, row) in enumerate(tiles):
        y = head + r * row_h
        draw.text((8, y), f"\u201c{cap}\u201d", fill=(0, 0, 160))
        for c, ((key, _), imgs) in enumerate(zip(COLUMNS, groups)):
            for j, img in enumerate(imgs[:4]):
                tile = Image.fromarray((img * 255).round().astype(np.uint8)).resize((size, size), Image.NEAREST)
                im.paste(tile, (8 + c * block + j * (size + 2), y + lab))
            note = f"score {row[f'{key}_score']:.2f}"
            if key != "teacher":
                note += f"   PSNR {row[f'{key}_psnr']:.1f} dB"
            draw.text((8 + c * block, y + lab + size + 1), note, fill="black")
    im.save(path)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=comfy_env.REPO / "out" / "demo")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (the workflows say 1024)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per workflow (new seed each, warm model)")
    ap.add_argument("--quick", action="store_true", help="3 training steps, 2 captions: a smoke run of the code")
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
    # LRU caching keeps the trained experts and the distilled student while the demo alternates between prompts
    # (ComfyUI 0.3.x's default cache drops the outputs of nodes the current prompt lacks, and would train again).
    with ComfyServer(base, extra_args=("--cache-lru", "64")) as srv:
        info = srv.object_info()
        ref = reference_demo(srv, info, out, args.repeats, args.quick)
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
    tr = ref["training"]
    lines = [
        "# comfyui-glance demo run",
        "",
        "## Glance on the reference teacher (workflows/glance_reference_demo.json)",
        "",
        f"One-Shot Trainer, objective 'trajectory' ({tr['steps']} steps per expert, rank {tr['rank']} on every "
        f"Linear, batch {tr['batch']}, {tr['noises']} teacher rollouts per caption) on six captions, no image; then "
        f"{len(HELD_OUT)} held-out captions × 4 seeds (compositions the teacher never saw, captions the experts never "
        "saw), sampled with the 10-step Glance graph and with the teacher's 50 steps from the same noise "
        f"(CFG {ref['cfg']:g}, so "
        "20 vs 100 evaluations). Score: the exact prompt-following score of glance_core.scenes (share of images that "
        "show what the caption asks). The released one-image recipe ('official', 60 steps on one rendered scene) "
        "runs too, reported as it is.",
        "",
        f"- first run (teacher rollouts + training both experts + sampling): {ref['first_run_with_training_s']} s; "
        f"official recipe's first run: {ref['official_first_run_s']} s",
        f"- sampling a batch of 4, whole prompt: Glance {ref['glance_run_s']} s, teacher {ref['teacher_run_s']} s: "
        f"**{ref['speedup']}×** faster; ArcFlow {ref['arcflow_run_s']} s: **{ref['arcflow_speedup']}×** (ArcFlow "
        f"Distiller in the same graph: {ref['distiller']['iterations']} iterations, K = "
        f"{ref['distiller']['components']}, rank {ref['distiller']['rank']}, batch {ref['distiller']['batch']}, on "
        "the six training captions)",
        f"- mean over captions: score teacher {m['teacher_score']:.2f}, Glance {m['glance_score']:.2f}, plain Euler "
        f"10 {m['euler10_score']:.2f}, ArcFlow 2 {m['arcflow_score']:.2f}, official {m['official_score']:.2f}; PSNR "
        f"to the teacher's 50 steps: Glance **{m['glance_psnr']:.2f} dB**, plain Euler 10 {m['euler10_psnr']:.2f} dB, "
        f"ArcFlow 2 {m['arcflow_psnr']:.2f} dB, official {m['official_psnr']:.2f} dB",
        "",
        "| held-out caption | teacher score | Glance score | Glance PSNR (dB) | Euler 10 score | Euler 10 PSNR (dB) "
        "| ArcFlow 2 score | ArcFlow 2 PSNR (dB) | official score | official PSNR (dB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['caption']} | {r['teacher_score']:.2f} | {r['glance_score']:.2f} | {r['glance_psnr']:.2f} | "
            f"{r['euler10_score']:.2f} | {r['euler10_psnr']:.2f} | {r['arcflow_score']:.2f} | "
            f"{r['arcflow_psnr']:.2f} | {r['official_score']:.2f} | "
            f"{r['official_psnr']:.2f} |"
            for r in ref["captions"]
        ],
        "",
        "Side by side (teacher | Glance | plain Euler | ArcFlow | official, 4 seeds each): reference_sheet.png",
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
