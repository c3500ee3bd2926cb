"""Fidelity of Glance and ArcFlow on the pack's reference teacher, against its own 50-step output.

    .venv/bin/python -m bench.bench_fidelity            (≈ 10 min on 2 CPU cores; writes out/bench_fidelity/)

Same noises, same conditions for every row. Conditions are (caption, seed) pairs: 12 held-out captions × 5 seeds =
60 held-out conditions (no adapter saw these captions), and 2 of the 4 "handful" captions (one of them the one-image
caption) × 5 seeds as seen conditions (new noises: the trajectory objective's rollouts used other seeds). The
teacher samples with CFG 3 (negative: the empty caption), which is what bends its trajectories; ArcFlow distils that
CFG in and samples at cfg 1.

Columns: PSNR and SSIM to the teacher's 50-step output (mean over conditions), the sliced Wasserstein distance
(SWD, pixel space, 256 random directions) between the set of the row's held-out outputs and the set of the teacher's
(a distribution distance: it ignores which output came from which noise), and the wall time of the row's sampling ÷
that of the 50-step run (training time not included; it is in train_s).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from devtools import comfy_env

CFG = 3.0
SEEDS = 5
HELD_OUT = [f"{w} {f}" for w in ("cat", "moon", "retina", "brick", "clock", "face") for f in ("wide", "close")]
POOL = [
    f"{w} {f}"
    for w in (
        "astronaut",
        "coffee",
        "rocket",
        "coins",
        "camera",
        "galaxy",
        "tissue",
        "colorwheel",
        "motorcycle",
        "grass",
        "gravel",
    )
    for f in ("wide", "close")
]
ONE = "astronaut wide"
HANDFUL = ["astronaut wide", "coffee close", "galaxy wide", "grass close"]
SEEN = HANDFUL[:2]  # seen by the 1-image / 1-caption and the handful rows


def _pack(name: str):
    return importlib.import_module(f"{comfy_env.pack().__name__}.{name}")


class Bench:
    def __init__(self, ref_path: Path, quick: bool):
        self.rm = _pack("glance_core.reference_model")
        self.training = _pack("glance_core.training")
        self.experts = _pack("glance_core.experts")
        self.schedules = _pack("glance_core.schedules")
        self.arcflow_model = _pack("glance_core.arcflow_model")
        self.arcflow_distill = _pack("glance_core.arcflow_distill")
        self.arcflow_nodes = _pack("nodes.arcflow")
        self.ref = self.rm.load(ref_path)
        self.model = self.ref.model
        self.ms = self.model.get_model_object("model_sampling")
        self.neg = self.ref.encode("")
        self.quick = quick
        self.size = self.ref.info.get("size", 32)
        self.seeds = 2 if quick else SEEDS

    # -- sampling ---------------------------------------------------------------------------------------
    def noise(self, caption: str, offset: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash_caption(caption) + offset)
        return torch.randn((self.seeds, 3, self.size, self.size), generator=g)

    def sample(self, model, captions: list[str], sigmas, sampler=None, cfg: float = CFG, offset: int = 0):
        """Images [N, H, W, 3] in [0, 1] for every caption × seed, and the wall time of the sampling."""
        import comfy.samplers

        sampler = sampler or comfy.samplers.ksampler("euler")
        sig = torch.tensor([float(s) for s in sigmas], dtype=torch.float32)
        out, elapsed = [], 0.0
        for cap in captions:
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(self.ref.encode(cap), self.neg if cfg != 1.0 else [])
            guider.set_cfg(cfg)
            noise = self.noise(cap, offset)
            t = time.perf_counter()
            with torch.inference_mode():
                x = guider.sample(noise, torch.zeros_like(noise), sampler, sig, disable_pbar=True, seed=0)
            elapsed += time.perf_counter() - t
            out.append(((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1))
        return torch.cat(out).numpy(), elapsed

    # -- adapters ---------------------------------------------------------------------------------------
    def crops(self, n: int, captions: list[str], seed: int) -> list[tuple[torch.Tensor, list]]:
        """``n`` real training images (32×32 photo crops) with their captions, as (latent, conditioning)."""
        from devtools import train_reference as tr

        data = tr.photos()
        g = torch.Generator().manual_seed(seed)
        out = []
        for i in range(n):
            cap = captions[i % len(captions)]
            word, framing = cap.split()
            cond = self.training.clone_conditioning(self.ref.encode(cap))
            out.append((tr.crop(data[word], framing, g).unsqueeze(0), cond))
        return out

    def train(self, schedule, objective: str, *, images=None, captions=None, noises=4, single=False, steps=None):
        steps = 4 if self.quick else steps
        """Slow + Fast experts (or one expert on all steps when ``single``) → phase-aware model."""
        t = self.training
        s = list(schedule.sigmas)
        n_slow = schedule.slow_steps
        if single:
            jobs = {"slow": t.ExpertJob("slow", s[:-1], s[1:])}
        else:
            jobs = {
                "slow": t.ExpertJob("slow", s[:n_slow], s[1 : n_slow + 1]),
                "fast": t.ExpertJob("fast", s[n_slow:-1], s[n_slow + 1 :]),
            }
        rank, alpha, lr = t.OFFICIAL["flux"]
        trajectories = None
        if objective == "trajectory":
            grid = t.fine_grid(self.ms.percent_to_sigma, 50, s)
            conds = [
                (self.training.clone_conditioning(self.ref.encode(c)), self.training.clone_conditioning(self.neg))
                for c in captions
            ]
            trajectories = t.teacher_trajectories(
                self.model, conds, CFG, noises, 1234, (1, 3, self.size, self.size), grid, s
            )
        built = {}
        for i, (name, job) in enumerate(jobs.items()):
            default_steps = 60 if objective == "official" else 100
            res = t.train_expert(
                self.model,
                job,
                objective=objective,
                positive=images[0][1] if images else trajectories["captions"][0]["positive"],
                negative=None,
                cfg=CFG,
                rank=rank,
                alpha=alpha,
                lr=lr if objective == "official" else 1e-3,
                steps=steps or default_steps,
                seed=100 + i,
                targets="official",
                batch=1 if objective == "official" else 4,
                images=images,
                trajectories=trajectories,
                weight_decay=0.01,
            )
            built[name] = self.experts.build_expert(self.model, res.state_dict, 1.0, f"{objective} {name}")
        boundary = 0.0 if single else schedule.boundary
        return self.experts.apply_phase_lora(self.model, built.get("slow"), built.get("fast"), boundary)

    def arcflow(self, captions: list[str], iterations: int):
        conds = [
            (self.training.clone_conditioning(self.ref.encode(c)), self.training.clone_conditioning(self.neg))
            for c in captions
        ]
        res = self.arcflow_distill.distill(
            self.model,
            conds,
            teacher_cfg=CFG,
            iterations=iterations,
            steps=2,
            k=8,
            rank=16,
            lr=1e-3,
            batch=4,
            seed=7,
            latent_shape=(1, 3, self.size, self.size),
        )
        model = self.arcflow_model.apply_arcflow(self.model, res.adapter, "distilled ArcFlow adapter")
        return model, self.arcflow_distill_sigmas()

    def arcflow_distill_sigmas(self):
        return _pack("glance_core.arcflow").schedule(2, 3.2)


def hash_caption(caption: str) -> int:
    return int.from_bytes(caption.encode()[:6].ljust(6, b"_"), "little") % (2**31)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from skimage.metrics import structural_similarity

    return np.array([structural_similarity(x, y, channel_axis=-1, data_range=1.0, win_size=7) for x, y in zip(a, b)])


def swd(a: np.ndarray, b: np.ndarray, directions: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equally sized sets of images (pixel space)."""
    x = torch.from_numpy(a.reshape(len(a), -1)).double()
    y = torch.from_numpy(b.reshape(len(b), -1)).double()
    d = torch.randn(x.shape[1], directions, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    d /= d.norm(dim=0, keepdim=True)
    px, py = (x @ d).sort(0).values, (y @ d).sort(0).values
    return float(((px - py) ** 2).mean().sqrt())


def sheet(rows: list[tuple[str, np.ndarray]], path: Path, n: int = 10, scale: int = 3) -> None:
    from PIL import Image, ImageDraw

    size = rows[0][1].shape[1] * scale
    label = 260
    im = Image.new("RGB", (label + n * (size + 2), len(rows) * (size + 2)), "white")
    draw = ImageDraw.Draw(im)
    for r, (name, imgs) in enumerate(rows):
        draw.text((4, r * (size + 2) + size // 2 - 6), name[:40], fill="black")
        for c in range(min(n, len(imgs))):
            tile = Image.fromarray((imgs[c] * 255).round().astype(np.uint8)).resize((size, size), Image.NEAREST)
            im.paste(tile, (label + c * (size + 2), r * (size + 2)))
    im.save(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="reference model file (default: the shipped one)")
    ap.add_argument("--out", type=Path, default=comfy_env.REPO / "out" / "bench_fidelity")
    ap.add_argument("--quick", action="store_true", help="2 seeds, short training: a smoke run, not the benchmark")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: a small model on a shared CPU "
        "runs fastest and steadiest this way; oversubscribed threads made it ~15x slower here)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    comfy_env.import_comfy()
    import comfy.samplers

    rm = _pack("glance_core.reference_model")
    b = Bench(args.model or rm.ASSETS / rm.REFERENCE_NAME, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    sch = b.schedules
    ms = b.ms
    glance10 = sch.custom(ms.percent_to_sigma, 50, 5, 2, 5)
    preset = sch.preset("glance_flux")
    assert np.allclose(glance10.sigmas, preset.sigmas, atol=2e-5), (glance10.sigmas, preset.sigmas)
    glance6 = sch.custom(ms.percent_to_sigma, 50, 3, 2, 3)
    glance4 = sch.custom(ms.percent_to_sigma, 50, 2, 2, 2)
    simple = {n: comfy.samplers.calculate_sigmas(ms, "simple", n).tolist() for n in (50, 10, 6, 4)}
    held_out = HELD_OUT[:2] if args.quick else HELD_OUT
    evals = [("held-out", held_out), ("seen", SEEN[:1] if args.quick else SEEN)]
    rows: list[dict] = []
    images: dict[str, np.ndarray] = {}

    teacher, t50 = {}, {}
    for split, caps in evals:
        teacher[split], t50[split] = b.sample(b.model, caps, simple[50])

    def row(name: str, n_eval: int, model, sigmas, train_s: float = 0.0, sampler=None, cfg=CFG):
        res = {"row": name, "evaluations": n_eval, "train_s": round(train_s, 1)}
        for split, caps in evals:
            if sigmas is None:  # the teacher's 50 steps: sampled above
                out, el = teacher[split], t50[split]
            else:
                out, el = b.sample(model, caps, sigmas, sampler=sampler, cfg=cfg)
            res[f"{split} PSNR"] = float(psnr(out, teacher[split]).mean())
            res[f"{split} SSIM"] = float(ssim(out, teacher[split]).mean())
            if split == "held-out":
                res["SWD"] = swd(out, teacher[split])
                res["sampling_s"] = el
                res["time ratio"] = el / rows[0]["sampling_s"] if rows else 1.0  # ÷ the 50-step row (warm)
                images[name] = out
        rows.append(res)
        print(json.dumps(res), flush=True)

    row("teacher, 50 steps", 50, b.model, None)
    for n, sched in ((10, glance10), (6, glance6), (4, glance4)):
        row(f"teacher, Euler on the Glance sigmas ({n})", n, b.model, sched.sigmas)
        row(f"teacher, Euler on its simple schedule ({n})", n, b.model, simple[n])

    def trained(name, n_eval, sched, objective, **kw):
        t = time.perf_counter()
        if args.quick:
            kw.setdefault("steps", 4)
            kw["noises"] = 1
        m = b.train(sched, objective, **kw)
        row(name, n_eval, m, sched.sigmas, time.perf_counter() - t)

    one_image = b.crops(1, [ONE], seed=1)
    many = {n: b.crops(n, POOL, seed=2) for n in (10, 100)}
    trained("Glance official, 1 image", 10, glance10, "official", images=one_image)
    trained("Glance trajectory, 1 caption", 10, glance10, "trajectory", captions=[ONE])
    trained("Glance trajectory, 4 captions", 10, glance10, "trajectory", captions=HANDFUL)
    trained("one LoRA on all 10 steps, official, 1 image", 10, glance10, "official", images=one_image, single=True)
    trained(
        "one LoRA on all 10 steps, trajectory, 4 captions", 10, glance10, "trajectory", captions=HANDFUL, single=True
    )
    for n in (10, 100):
        trained(f"Glance official, {n} images", 10, glance10, "official", images=many[n], steps=max(60, 2 * n))
        caps = POOL[:n]
        trained(
            f"Glance trajectory, {n} rollouts ({len(caps)} captions)",
            10,
            glance10,
            "trajectory",
            captions=caps,
            noises=max(1, n // len(caps)),
        )
    for n, sched in ((6, glance6), (4, glance4)):
        trained(f"Glance official, 1 image, {n} steps", n, sched, "official", images=one_image)
        trained(f"Glance trajectory, 4 captions, {n} steps", n, sched, "trajectory", captions=HANDFUL)
    t = time.perf_counter()
    af_model, af_sigmas = b.arcflow(POOL, 20 if args.quick else 120)
    sampler = comfy.samplers.KSAMPLER(b.arcflow_nodes.sample_arcflow)
    row(
        "ArcFlow adapter distilled from the teacher (22 captions)",
        2,
        af_model,
        af_sigmas,
        time.perf_counter() - t,
        sampler=sampler,
        cfg=1.0,
    )

    report(rows, args.out, images, b)
    return {"rows": rows}


def report(rows: list[dict], out: Path, images: dict[str, np.ndarray], b: Bench) -> None:
    cols = [
        "row",
        "evaluations",
        "held-out PSNR",
        "held-out SSIM",
        "seen PSNR",
        "seen SSIM",
        "SWD",
        "time ratio",
        "train_s",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(
                f"{v:.3f}"
                if isinstance(v, float) and c in ("held-out SSIM", "seen SSIM", "SWD", "time ratio")
                else f"{v:.2f}"
                if isinstance(v, float)
                else str(v)
            )
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    head = (
        f"Reference teacher: {b.ref.info.get('trained_by', '?')}, {b.ref.info.get('steps', '?')} steps. "
        f"CFG {CFG}; {len(HELD_OUT)}×{b.seeds} held-out and {len(SEEN)}×{b.seeds} seen conditions.\n\n"
    )
    (out / "report.md").write_text(head + table + "\n")
    (out / "report.json").write_text(json.dumps(rows, indent=1))
    sheet([(k, v) for k, v in images.items()], out / "sheet.png")
    print(head + table)
    print(f"\nwrote {out / 'report.md'}, {out / 'sheet.png'}")


if __name__ == "__main__":
    main()
