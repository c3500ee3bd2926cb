"""What the ``trajectory`` objective gains with its training budget: one long run, measured at several step counts.

    .venv/bin/python -m bench.bench_trajectory_budget [--captions 6] [--steps 1200] [--at 150,300,600,1200]

The Slow + Fast experts are trained once, with the fidelity benchmark's trajectory recipe (``bench_fidelity``:
``TRAJECTORY``, overridable with ``--trajectory``), the Fast expert for ``--steps`` steps and the Slow one for
``--slow-steps``; copies of their factors are kept after each step count in ``--at`` (the optimiser runs at a constant
rate, so the copy at n steps IS the n-step run) and the pair at n is Slow at min(n, slow steps) + Fast at n. Each
pair is measured the fidelity benchmark's way, beside plain 10-step Euler on the same Glance sigmas: PSNR to the
teacher's 50-step output on the 18 held-out captions and on the seen (training) captions with new noises, and the
prompt-following score ÷ the teacher's. The training time of a row counts the teacher rollouts and both experts' steps
up to it. Answers "does the gain grow with more steps, and does it reach the held-out captions?".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.bench_fidelity import CFG, HANDFUL, TRAJECTORY, Bench, _pack, pool, psnr, recipe_overrides
from devtools import comfy_env
from glance_core import scenes


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="reference model file (default: the shipped one)")
    ap.add_argument("--captions", type=int, default=len(HANDFUL), help="training captions (the handful first)")
    ap.add_argument("--steps", type=int, default=1200, help="optimisation steps of the Fast expert")
    ap.add_argument(
        "--slow-steps", type=int, default=300, help="of the Slow expert (its loss is ~1000× below the Fast one's here)"
    )
    ap.add_argument("--at", default="150,300,600,1200", help="Fast step counts at which the pair is measured")
    ap.add_argument("--trajectory", default="", help="override the trajectory recipe, e.g. lr=1e-3,batch=16")
    ap.add_argument("--seeds", type=int, default=4, help="evaluation noises per caption")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="1 seed, 3 steps: a smoke run")
    ap.add_argument("--out", type=Path, default=comfy_env.REPO / "out" / "bench_trajectory_budget")
    args = ap.parse_args(argv)
    recipe = {**TRAJECTORY, **recipe_overrides(args.trajectory, TRAJECTORY)}
    recipe["steps"] = args.steps
    at = sorted({int(n) for n in args.at.split(",") if int(n) <= args.steps} | {args.steps})
    if args.quick:
        args.steps, args.slow_steps, at = 3, 3, [1, 3]
    torch.set_num_threads(args.threads)
    comfy_env.import_comfy()
    import comfy.samplers

    rm = _pack("glance_core.reference_model")
    b = Bench(args.model or rm.ASSETS / rm.REFERENCE_NAME, 1 if args.quick else args.seeds, args.quick)
    glance = b.schedules.custom(b.ms.percent_to_sigma, 50, 5, 2, 5)
    simple50 = comfy.samplers.calculate_sigmas(b.ms, "simple", 50).tolist()
    captions = pool(args.captions)
    evals = {"held-out": scenes.held_out_captions(), "seen": captions[: len(HANDFUL)]}

    def measure(model, sigmas) -> dict[str, float]:
        res = {}
        for split, caps in evals.items():
            out, _ = b.sample(model, caps, sigmas, cfg=CFG)
            labels = [c for c in caps for _ in range(b.seeds)]
            res[f"{split} PSNR"] = float(psnr(out, teacher[split]).mean())
            res[f"{split} score ÷ teacher"] = scenes.score(out, labels)["overall"] / max(teacher_score[split], 1e-9)
        return res

    teacher, teacher_score = {}, {}
    for split, caps in evals.items():
        teacher[split], _ = b.sample(b.model, caps, simple50)
        teacher_score[split] = scenes.score(teacher[split], [c for c in caps for _ in range(b.seeds)])["overall"]
    euler = measure(b.model, glance.sigmas)
    print(f"plain Euler 10 on the Glance sigmas: {json.dumps(euler)}", flush=True)

    ticks: list[float] = []
    last = [time.perf_counter()]

    def tick(step: int, loss: float) -> None:
        now = time.perf_counter()
        ticks.append(now - last[0])
        last[0] = now
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: loss {loss:.3g}, {sum(ticks):.0f} s", flush=True)

    slow_steps = min(args.slow_steps, args.steps)
    slow_at = sorted({min(n, slow_steps) for n in at})
    per_expert = {"slow": dict(steps=slow_steps, snapshots=slow_at), "fast": dict(steps=args.steps, snapshots=at)}
    results = b.train_experts(glance, "trajectory", captions=captions, per_expert=per_expert, on_step=tick, **recipe)
    n_slow = len(results["slow"].losses)
    rows = []
    for n in at:
        m = min(n, n_slow)
        states = {"slow": results["slow"].snapshots[m], "fast": results["fast"].snapshots[n]}
        model = b.phase_model(glance, states, f"trajectory {n} steps")
        train_s = round(sum(ticks[:m]) + sum(ticks[n_slow : n_slow + n]), 1)
        row = {"steps (slow + fast)": f"{m} + {n}", "train_s": train_s}
        row.update(measure(model, glance.sigmas))
        row["held-out gain dB"] = row["held-out PSNR"] - euler["held-out PSNR"]
        row["seen gain dB"] = row["seen PSNR"] - euler["seen PSNR"]
        row["loss slow / fast"] = [
            sum(results[e].losses[max(0, k - 50) : k]) / min(k, 50) for e, k in (("slow", m), ("fast", n))
        ]  # the mean of the last 50 steps' losses
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"captions": args.captions, "recipe": recipe, "seeds": b.seeds, "cfg": CFG, "euler": euler}
    (args.out / "report.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    head = (
        f"Trajectory budget: {args.captions} training captions, recipe {recipe}, CFG {CFG}, {b.seeds} noises per "
        f"caption. Plain Euler 10 (Glance sigmas): held-out {euler['held-out PSNR']:.2f} dB, seen "
        f"{euler['seen PSNR']:.2f} dB.\n\n"
    )
    cols = ["steps (slow + fast)", "held-out PSNR", "held-out gain dB", "held-out score ÷ teacher", "seen PSNR"]
    cols += ["seen gain dB", "seen score ÷ teacher", "train_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    (args.out / "report.md").write_text(head + "\n".join(lines) + "\n")
    print(head + "\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
