"""Fidelity and prompt-following of Glance and ArcFlow on the pack's reference teacher, against its 50-step output.

    .venv/bin/python -m bench.bench_fidelity [--rows teacher,trajectory,...] [--quick]   (one thread; long: see README)
    .venv/bin/python -m bench.bench_fidelity --jobs 2      (the row groups in two processes side by side, one report)

Same noises for every row (per caption, seeded from the caption). Held-out conditions: the 18 captions of
``glance_core.scenes.held_out_captions`` (compositions the teacher never drew, captions no adapter saw) × seeds.
Seen conditions: the handful of captions the adapters train on (``HANDFUL``; the one-caption rows use its first),
with noises no rollout used. The teacher samples with ``reference_model.CFG`` (negative: the empty caption);
ArcFlow distils the CFG in.

Columns: PSNR and SSIM to the teacher's 50-step output from the same noise; the exact prompt-following score of
``glance_core.scenes`` (GenEval-style mean over categories), absolute and ÷ the teacher's 50-step score; the sliced
Wasserstein distance (SWD, pixel space, 256 directions) between the row's held-out outputs and the teacher's
(a distribution distance, ignores which output came from which noise); sampling wall time ÷ the 50-step run;
training time; and whether the row meets its goal (the ``goal`` column).
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
from glance_core import reference_model, scenes

CFG = reference_model.CFG
SEEDS = 4
HANDFUL = list(scenes.HANDFUL)  # the adapters' training captions
#: The training recipe of the trajectory rows (what it gives on this teacher: docs/fidelity.md).
TRAJECTORY = dict(
    targets="all_linear", rank=8, alpha=8.0, lr=5e-4, batch=8, steps=300, noises=16, student_mix=0.0, unroll=True
)
OFFICIAL_STEPS = 60
ARCFLOW_ITERATIONS = 600


def _pack(name: str):
    return importlib.import_module(f"{comfy_env.pack().__name__}.{name}")


def pool(n: int, seed: int = 5) -> list[str]:
    """``n`` distinct training captions (compositions the teacher drew), the handful first."""
    rng = np.random.default_rng(seed)
    out = list(HANDFUL[:n])
    while len(out) < n:
        c = scenes.random_spec(rng).caption
        if c not in out:
            out.append(c)
    return out


def recipe_overrides(text: str, recipe: dict) -> dict:
    """``"steps=100,unroll=false"`` → ``{"steps": 100, "unroll": False}``, each value of the type ``recipe`` has."""
    out = {}
    for kv in filter(None, text.split(",")):
        k, v = kv.split("=")
        kind = type(recipe[k])
        out[k] = v.lower() in ("1", "true", "yes") if kind is bool else kind(v)
    return out


class Bench:
    def __init__(self, ref_path: Path, seeds: int, quick: bool):
        self.rm = _pack("glance_core.reference_model")
        self.training = _pack("glance_core.training")
        self.experts = _pack("glance_core.experts")
        self.schedules = _pack("glance_core.schedules")
        self.arcflow_model = _pack("glance_core.arcflow_model")
        self.arcflow_distill = _pack("glance_core.arcflow_distill")
        self.arcflow_sampler = _pack("glance_core.arcflow_sampler")
        self.architectures = _pack("glance_core.architectures")
        self.rollouts = _pack("glance_core.rollouts")
        self.ref = self.rm.load(ref_path)
        self.model = self.ref.model
        self.ms = self.model.get_model_object("model_sampling")
        self.neg = self.ref.encode("")
        self.size = int(self.ref.info.get("size", scenes.SIZE))
        self.seeds = seeds
        self.quick = quick

    def cond(self, caption: str) -> list:
        return self.training.clone_conditioning(self.ref.encode(caption))

    # -- sampling ---------------------------------------------------------------------------------------
    def noise(self, caption: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash_caption(caption))
        return torch.randn((self.seeds, 3, self.size, self.size), generator=g)

    def sample(self, model, captions: list[str], sigmas, sampler=None, cfg: float = CFG):
        """Images [N, H, W, 3] in [0, 1] for every caption × seed, and the wall time of the sampling."""
        import comfy.samplers

        sampler = sampler or comfy.samplers.ksampler("euler")
        sig = torch.tensor([float(s) for s in sigmas], dtype=torch.float32)
        out, elapsed = [], 0.0
        for cap in captions:
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(self.ref.encode(cap), self.neg if cfg != 1.0 else [])
            guider.set_cfg(cfg)
            noise = self.noise(cap)
            t = time.perf_counter()
            with torch.inference_mode():
                x = guider.sample(noise, torch.zeros_like(noise), sampler, sig, disable_pbar=True, seed=0)
            elapsed += time.perf_counter() - t
            out.append(((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1))
        return torch.cat(out).numpy(), elapsed

    # -- adapters ---------------------------------------------------------------------------------------
    def images(self, captions: list[str], seed: int) -> list[tuple[torch.Tensor, list]]:
        """Ground-truth scenes of ``captions`` as (latent [1, 3, H, W] in [-1, 1], conditioning)."""
        out = []
        for i, cap in enumerate(captions):
            img = torch.from_numpy(scenes.render(cap, seed + i, self.size)).float().permute(2, 0, 1)
            out.append((img.unsqueeze(0) * 2 - 1, self.cond(cap)))
        return out

    def train(self, schedule, objective: str, *, images=None, captions=None, single=False, **budget):
        """Slow + Fast experts (or one expert on all steps when ``single``) → phase-aware model, losses."""
        results = self.train_experts(schedule, objective, images=images, captions=captions, single=single, **budget)
        states = {name: res.state_dict for name, res in results.items()}
        return self.phase_model(schedule, states, objective), {name: res.losses for name, res in results.items()}

    def train_experts(
        self, schedule, objective: str, *, images=None, captions=None, single=False, per_expert=None, **budget
    ):
        """``{"slow"/"fast": TrainResult}`` (only "slow", on every step, when ``single``); ``per_expert``:
        ``{"slow"/"fast": {option: value}}`` over ``budget`` for that expert."""
        t = self.training
        s = list(schedule.sigmas)
        if single:
            jobs = {"slow": t.ExpertJob("slow", s[:-1], s[1:])}
        else:
            jobs = t.expert_jobs(schedule)
        flux = self.architectures.ARCHITECTURES["flux"]
        rank, alpha, lr = flux.rank, flux.alpha, flux.learning_rate
        if objective == "official":
            opts = dict(targets="official", rank=rank, alpha=alpha, lr=lr, batch=1, steps=OFFICIAL_STEPS)
        else:
            opts = dict(TRAJECTORY)
        opts.update(budget)
        if self.quick:
            opts["steps"], opts["noises"] = 3, 1
        noises = opts.pop("noises", 1)
        trajectories = None
        if objective == "trajectory":
            grid = self.rollouts.fine_grid(self.ms.percent_to_sigma, 50, s)
            conds = [(self.cond(c), self.training.clone_conditioning(self.neg)) for c in captions]
            shape = (1, 3, self.size, self.size)
            trajectories = self.rollouts.teacher_trajectories(self.model, conds, CFG, noises, 1234, shape, grid, s)
        return {
            name: t.train_expert(
                self.model,
                job,
                objective=objective,
                positive=images[0][1] if images else trajectories["captions"][0]["positive"],
                seed=100 + i,
                images=images,
                trajectories=trajectories,
                weight_decay=0.01,
                **{**opts, **(per_expert or {}).get(name, {})},
            )
            for i, (name, job) in enumerate(jobs.items())
        }

    def phase_model(self, schedule, states: dict[str, dict], label: str):
        """The phase-aware model of the experts' state dicts (``{"slow": sd}`` alone: one LoRA on every step)."""
        built = {name: self.experts.build_expert(self.model, sd, 1.0, f"{label} {name}") for name, sd in states.items()}
        boundary = schedule.boundary if "fast" in built else 0.0
        return self.experts.apply_phase_lora(self.model, built.get("slow"), built.get("fast"), boundary)

    def arcflow(self, captions: list[str], iterations: int):
        conds = [(self.cond(c), self.training.clone_conditioning(self.neg)) for c in captions]
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
        return model, res.losses


def hash_caption(caption: str) -> int:
    return int.from_bytes(caption.encode()[-6:].ljust(6, b"_"), "little") % (2**31) + len(caption)


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


def sheet(rows: list[tuple[str, np.ndarray]], path: Path, n: int = 12, scale: int = 3) -> None:
    from PIL import Image, ImageDraw

    size = rows[0][1].shape[1] * scale
    label = 330
    im = Image.new("RGB", (label + n * (size + 2), len(rows) * (size + 2)), "white")
    draw = ImageDraw.Draw(im)
    for r, (name, imgs) in enumerate(rows):
        draw.text((4, r * (size + 2) + size // 2 - 6), name[:54], fill="black")
        for c in range(min(n, len(imgs))):
            tile = Image.fromarray((imgs[c] * 255).round().astype(np.uint8)).resize((size, size), Image.NEAREST)
            im.paste(tile, (label + c * (size + 2), r * (size + 2)))
    im.save(path)


ROW_GROUPS = ("teacher", "official", "trajectory", "steps", "single", "arcflow")
#: Rough minutes per group on one thread of the 2-core CPU (for splitting the groups over --jobs processes).
GROUP_MINUTES = {"teacher": 2, "official": 3, "trajectory": 55, "steps": 25, "single": 17, "arcflow": 14}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="reference model file (default: the shipped one)")
    ap.add_argument("--out", type=Path, default=comfy_env.REPO / "out" / "bench_fidelity")
    ap.add_argument("--rows", default=",".join(ROW_GROUPS), help=f"groups of rows to run: {', '.join(ROW_GROUPS)}")
    ap.add_argument("--seeds", type=int, default=SEEDS, help="noises per caption")
    ap.add_argument("--quick", action="store_true", help="1 seed, 3 training steps: a smoke run, not the benchmark")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared CPU)")
    ap.add_argument("--trajectory", default="", help="override the trajectory recipe, e.g. steps=100,batch=8")
    ap.add_argument("--captions", default="1,6,48", help="caption counts of the trajectory group's rows")
    ap.add_argument("--arcflow-iterations", type=int, default=ARCFLOW_ITERATIONS, help="the distiller's iterations")
    ap.add_argument(
        "--jobs", type=int, default=1, help="run the row groups in this many processes side by side, then merge"
    )
    args = ap.parse_args(argv)
    if args.jobs > 1:
        return _run_jobs(args)
    TRAJECTORY.update(recipe_overrides(args.trajectory, TRAJECTORY))
    torch.set_num_threads(args.threads)
    comfy_env.import_comfy()
    import comfy.samplers

    groups = set(args.rows.split(","))
    rm = _pack("glance_core.reference_model")
    b = Bench(args.model or rm.ASSETS / rm.REFERENCE_NAME, 1 if args.quick else args.seeds, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    sch = b.schedules
    ms = b.ms
    glance = {10: sch.custom(ms.percent_to_sigma, 50, 5, 2, 5)}
    glance[6] = sch.custom(ms.percent_to_sigma, 50, 3, 2, 3)
    glance[4] = sch.custom(ms.percent_to_sigma, 50, 2, 2, 2)
    arc2 = sch.SlowFastSchedule(tuple(_pack("glance_core.arcflow").schedule(2, 3.2)), 1)
    simple = {n: comfy.samplers.calculate_sigmas(ms, "simple", n).tolist() for n in (50, 10, 6, 4, 2)}
    held_out = scenes.held_out_captions()[:: 6 if args.quick else 1]
    seen = HANDFUL[:2] if args.quick else HANDFUL
    evals = [("held-out", held_out), ("seen", seen)]
    rows: list[dict] = []
    group = "teacher"  # the group the rows being made belong to (merging --jobs parts keeps the groups' order)
    images: dict[str, np.ndarray] = {}
    curves: dict[str, dict] = {}

    teacher, t50, teacher_score = {}, {}, {}
    for split, caps in evals:
        teacher[split], t50[split] = b.sample(b.model, caps, simple[50])
        teacher_score[split] = scenes.score(teacher[split], [c for c in caps for _ in range(b.seeds)])["overall"]

    def row(name: str, n_eval: int, model, sigmas, train_s: float = 0.0, sampler=None, cfg=CFG, goal=None):
        res: dict = {
            "row": name, "group": group, "evaluations": n_eval * (2 if cfg != 1.0 else 1), "train_s": round(train_s, 1)
        }  # fmt: skip
        for split, caps in evals:
            if sigmas is None:  # the teacher's 50 steps: sampled above
                out, el = teacher[split], t50[split]
            else:
                out, el = b.sample(model, caps, sigmas, sampler=sampler, cfg=cfg)
            res[f"{split} PSNR"] = float(psnr(out, teacher[split]).mean())
            res[f"{split} SSIM"] = float(ssim(out, teacher[split]).mean())
            sc = scenes.score(out, [c for c in caps for _ in range(b.seeds)])
            res[f"{split} score"] = sc["overall"]
            res[f"{split} score ÷ teacher"] = sc["overall"] / max(teacher_score[split], 1e-9)
            if split == "held-out":
                res["held-out categories"] = sc
                res["SWD"] = swd(out, teacher[split])
                res["sampling_s"] = el
                res["time ratio"] = el / t50["held-out"]
                images[name] = out
        res["goal"] = goal(res) if goal else ""
        rows.append(res)
        print(json.dumps(res), flush=True)
        return res

    def euler(n: int) -> float:
        return next(r["held-out PSNR"] for r in rows if r["row"] == f"teacher, Euler on the Glance sigmas ({n})")

    def gain_goal(n: int, want_db: float):
        def check(r: dict) -> str:
            gain = r["held-out PSNR"] - euler(n)
            ok = gain >= want_db and r["held-out score ÷ teacher"] >= 0.95
            return f"{'met' if ok else 'MISSED'}: {gain:+.1f} dB over Euler {n} (goal +{want_db:g}, score ≥ 0.95×)"

        return check

    def at_least(n: int):
        def check(r: dict) -> str:
            ok = r["held-out PSNR"] >= euler(n)
            return f"{'met' if ok else 'MISSED'}: {r['held-out PSNR'] - euler(n):+.1f} dB vs plain Euler {n} (goal ≥)"

        return check

    row("teacher, 50 steps", 50, b.model, None)
    for n in (10, 6, 4):
        row(f"teacher, Euler on the Glance sigmas ({n})", n, b.model, glance[n].sigmas)
    for n in (10, 6, 4, 2):
        row(f"teacher, Euler on its simple schedule ({n})", n, b.model, simple[n])
    row("teacher, Euler on ArcFlow's sigmas (2)", 2, b.model, arc2.sigmas)

    def trained(name, n_eval, sched, objective, goal=None, **kw):
        t = time.perf_counter()
        model, losses = b.train(sched, objective, **kw)
        curves[name] = losses
        row(name, n_eval, model, sched.sigmas, time.perf_counter() - t, goal=goal)

    one_image = b.images([HANDFUL[0]], seed=1)
    if "official" in groups:
        group = "official"
        trained("Glance official, 1 image", 10, glance[10], "official", images=one_image)
        for n in (10, 100):
            imgs = b.images(pool(n), seed=2)
            trained(f"Glance official, {n} images", 10, glance[10], "official", images=imgs, steps=max(60, 2 * n))
    if "trajectory" in groups:
        group = "trajectory"
        for count in map(int, args.captions.split(",")):
            label = "1 caption" if count == 1 else f"{count} captions"
            trained(
                f"Glance trajectory, {label}", 10, glance[10], "trajectory", gain_goal(10, 6.0), captions=pool(count)
            )  # fmt: skip
        if TRAJECTORY["unroll"]:  # the per-step form beside it, at its own recipe (docs/fidelity.md)
            trained(
                "Glance trajectory per step (no unroll), 48 captions", 10, glance[10], "trajectory",
                gain_goal(10, 6.0), captions=pool(48), unroll=False, batch=16, noises=8,
            )  # fmt: skip
    if "steps" in groups:
        group = "steps"
        for n in (6, 4):
            trained(f"Glance official, 1 image, {n} steps", n, glance[n], "official", images=one_image)
            trained(
                f"Glance trajectory, {len(HANDFUL)} captions, {n} steps", n, glance[n], "trajectory",
                at_least(10) if n == 4 else None, captions=HANDFUL,
            )  # fmt: skip
    if "single" in groups:
        group = "single"
        trained(
            "one LoRA on all 10 steps, official, 1 image", 10, glance[10], "official", images=one_image, single=True
        )
        trained(
            f"one LoRA on all 10 steps, trajectory, {len(HANDFUL)} captions", 10, glance[10], "trajectory",
            captions=HANDFUL, single=True,
        )  # fmt: skip
    if "arcflow" in groups:
        group = "arcflow"
        t = time.perf_counter()
        af_model, af_losses = b.arcflow(pool(48), 20 if args.quick else args.arcflow_iterations)
        curves["ArcFlow"] = {"distill": af_losses}
        sampler = comfy.samplers.KSAMPLER(b.arcflow_sampler.sample)
        e2 = next(r["held-out PSNR"] for r in rows if r["row"] == "teacher, Euler on ArcFlow's sigmas (2)")
        e4 = next(r["held-out PSNR"] for r in rows if r["row"] == "teacher, Euler on its simple schedule (4)")

        def arc_goal(r: dict) -> str:
            ok = r["held-out PSNR"] >= e2 + 6 and r["held-out PSNR"] >= e4
            d2, d4 = r["held-out PSNR"] - e2, r["held-out PSNR"] - e4
            return f"{'met' if ok else 'MISSED'}: {d2:+.1f} dB over Euler 2 (goal +6), {d4:+.1f} vs Euler 4 (goal ≥)"

        row(
            f"ArcFlow, K = 8, {len(af_losses)} iterations, 48 captions", 2, af_model, arc2.sigmas,
            time.perf_counter() - t, sampler=sampler, cfg=1.0, goal=arc_goal,
        )  # fmt: skip
        trained(
            "K = 1 average-velocity student (trajectory, one LoRA, 2 steps)", 2, arc2, "trajectory", arc_goal,
            captions=pool(48), single=True,
        )  # fmt: skip

    report(rows, args.out, images, curves, {**b.ref.info, "seeds": b.seeds}, teacher_score)
    return {"rows": rows}


def _run_jobs(args) -> dict:
    """The requested groups split over ``args.jobs`` processes (one thread each, longest groups first onto the least
    loaded), run side by side, their reports merged into one in ``args.out`` (rows in the groups' order)."""
    import subprocess
    import sys

    wanted = [g for g in ROW_GROUPS if g in args.rows.split(",") and g != "teacher"]
    parts: list[list[str]] = [[] for _ in range(min(args.jobs, max(1, len(wanted))))]
    for g in sorted(wanted, key=lambda g: -GROUP_MINUTES[g]):
        min(parts, key=lambda p: sum(GROUP_MINUTES[x] for x in p)).append(g)
    common = ["--seeds", str(args.seeds), "--threads", str(args.threads), "--captions", args.captions]
    common += ["--arcflow-iterations", str(args.arcflow_iterations), "--trajectory", args.trajectory]
    common += ["--model", str(args.model)] if args.model else []
    common += ["--quick"] if args.quick else []
    procs = []
    for i, part in enumerate(parts):
        out = args.out / f"part{i}"
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "bench.bench_fidelity", *common, "--rows", ",".join(["teacher", *part])]
        print(f"part {i}: {', '.join(part) or 'teacher'} (log: {out / 'log.txt'})", flush=True)
        with open(out / "log.txt", "w") as log:
            procs.append(subprocess.Popen([*cmd, "--out", str(out)], stdout=log, stderr=subprocess.STDOUT))
    failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    if failed:
        raise SystemExit(f"bench_fidelity: part(s) {failed} failed; see {args.out}/part<N>/log.txt")
    rows, images, curves = [], {}, {}
    for i in range(len(parts)):
        out = args.out / f"part{i}"
        data = json.loads((out / "report.json").read_text())
        with np.load(out / "images.npz") as z:
            images |= {k: z[k] for k in z.files}
        rows += [r for r in data["rows"] if i == 0 or r["group"] != "teacher"]
        curves |= data["curves"]
        teacher_score, info = data["teacher_score"], data["info"]
    order = {name: k for k, name in enumerate(r["row"] for r in rows)}
    rows.sort(key=lambda r: (ROW_GROUPS.index(r["group"]), order[r["row"]]))
    images = {r["row"]: images[r["row"]] for r in rows if r["row"] in images}
    report(rows, args.out, images, curves, info, teacher_score)
    return {"rows": rows}


COLS = [
    "row",
    "evaluations",
    "held-out PSNR",
    "held-out SSIM",
    "held-out score",
    "held-out score ÷ teacher",
    "seen PSNR",
    "seen score",
    "SWD",
    "time ratio",
    "train_s",
    "goal",
]


def report(rows, out: Path, images, curves, info: dict, teacher_score: dict) -> None:
    lines = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    for r in rows:
        cells = []
        for c in COLS:
            v = r[c]
            three = ("SSIM", "score", "SWD", "ratio")
            cells.append(
                f"{v:.3f}"
                if isinstance(v, float) and any(k in c for k in three)
                else f"{v:.2f}"
                if isinstance(v, float)
                else str(v)
            )
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    head = (
        f"Reference teacher: {info.get('trained_by', '?')}, {info.get('steps', '?')} steps. CFG {CFG}; "
        f"{len(scenes.held_out_captions())} held-out captions and {len(HANDFUL)} seen captions × {info['seeds']} "
        "noises. "
        f"Teacher 50-step score: held-out {teacher_score['held-out']:.3f}, seen {teacher_score['seen']:.3f}. "
        f"Trajectory recipe: {TRAJECTORY}.\n\n"
    )
    (out / "report.md").write_text(head + table + "\n")
    data = {"rows": rows, "curves": curves, "teacher_score": teacher_score, "info": info}
    (out / "report.json").write_text(json.dumps(data, indent=1))
    np.savez_compressed(out / "images.npz", **images)  # for merging --jobs parts
    sheet([(k, v) for k, v in images.items()], out / "sheet.png")
    if "ArcFlow" in curves:
        _curve(curves["ArcFlow"]["distill"], out / "arcflow_curve.png")
    print(head + table)
    print(f"\nwrote {out / 'report.md'}, {out / 'sheet.png'}")


def _curve(losses: list[float], path: Path) -> None:
    from PIL import Image, ImageDraw

    w, h = 480, 200
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    y = np.log10(np.maximum(np.array(losses), 1e-12))
    k = max(1, len(y) // 50)
    y = np.convolve(y, np.ones(k) / k, mode="valid")
    lo, hi = float(y.min()), float(y.max()) + 1e-9
    pts = [(10 + i * (w - 20) / max(1, len(y) - 1), h - 20 - (v - lo) / (hi - lo) * (h - 40)) for i, v in enumerate(y)]
    d.line(pts, fill="black")
    d.text(
        (10, 4), f"ArcFlow distillation loss (log10, smoothed): max {10**hi:.3g}, last {10 ** y[-1]:.3g}", fill="black"
    )
    im.save(path)


if __name__ == "__main__":
    main()
