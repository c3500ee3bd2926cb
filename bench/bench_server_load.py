"""A real headless ComfyUI server under load: queued Glance prompts, hostile prompts, memory before and after.

    .venv/bin/python -m bench.bench_server_load                    # 160 Glance prompts, 60 bad ones
    .venv/bin/python -m bench.bench_server_load --prompts 20 --bad 20

On the tiny stand-in models (CPU), through ``/prompt``, ``/history`` and ``/interrupt`` only, as a user's client:

- load: ``--prompts`` Glance 10-step prompts (each a new seed, so nothing is served from ComfyUI's cache) queued
  at once; seconds per prompt (median of the gaps between finishes) and the server's resident memory before, after
  the first 10 and at the end (a leak shows as growth after the warm-up);
- hostile: ``--bad`` prompts that must each be refused or fail with a message (files outside the folder, pickles,
  missing files, non-finite numbers, a LoRA of the other architecture), interleaved with good ones; the reference
  image (seed 42) before and after must be bit-identical and the server must keep answering;
- stop: a 50-step prompt interrupted mid-run; the time from ``/interrupt`` to the prompt's end.

Prints one JSON object. Figures, not pass/fail: the test suite asserts the behaviour.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _api(name: str, object_info: dict, size: int) -> dict:
    from devtools import tiny_models, workflow

    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    return tiny_models.tiny_prompt(workflow.to_api(ui, object_info), size)


def _node(api: dict, class_type: str) -> dict:
    return next(n for n in api.values() if n["class_type"] == class_type)["inputs"]


def _image(server, entry: dict) -> np.ndarray:
    for out in entry["outputs"].values():
        for img in out.get("images", []):
            if img["type"] == "output":
                return np.asarray(Image.open(server.base / "output" / img["subfolder"] / img["filename"]))
    raise RuntimeError("the prompt saved no image")


def _hostile(server, base: dict) -> list[tuple[str, dict]]:
    """(label, prompt) pairs that must be refused or fail with a message."""
    import copy

    loras = server.base / "models" / "loras"
    (loras / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle renamed
    cases = {
        "traversal": {"slow_lora": "../../../etc/passwd.safetensors"},
        "absolute path": {"fast_lora": "/etc/hostname.safetensors"},
        "pickle renamed": {"slow_lora": "pickle.safetensors"},
        "missing file": {"fast_lora": "no_such_lora.safetensors"},
        "other architecture": {"slow_lora": "glance_qwen_slow.safetensors"},
        "NaN strength": {"slow_strength": float("nan")},
        "infinite strength": {"fast_strength": float("inf")},
        "negative boundary": {"boundary_sigma": -2.0},  # -1 is "auto"
        "NaN boundary": {"boundary_sigma": float("nan")},
    }
    out = []
    for label, change in cases.items():
        api = copy.deepcopy(base)
        _node(api, "PhaseAwareLoRALoader").update(change)
        out.append((label, api))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=160)
    ap.add_argument("--bad", type=int, default=60)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from devtools import comfy_env, tiny_models
    from devtools.server import ComfyServer, PromptRejected, error_message

    comfy_env.import_comfy()  # the tiny models are built with ComfyUI's own classes
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        tiny_models.write_workflow_assets(server.base / "models")
        info = server.object_info()
        base = _api("glance_flux_10step", info, args.size)
        seed = _node(base, "RandomNoise")
        pid = server.proc.pid

        seed["noise_seed"] = 42
        reference = _image(server, server.run(base))
        rss_start = _rss_mib(pid)

        # --- load -----------------------------------------------------------------------------
        ids = []
        for i in range(args.prompts):
            seed["noise_seed"] = 1000 + i
            ids.append(server.queue(base))
        finished, rss_warm = [], None
        for i, pid_ in enumerate(ids):
            entry = server.wait(pid_, timeout=600)
            assert entry["status"]["status_str"] == "success", error_message(entry)
            finished.append(time.perf_counter())
            if i == min(9, len(ids) - 1):
                rss_warm = _rss_mib(pid)
        rss_load = _rss_mib(pid)
        gaps = [b - a for a, b in zip(finished, finished[1:])]

        # --- hostile ----------------------------------------------------------------------------
        cases = _hostile(server, base)
        outcomes: dict[str, int] = {"refused (400)": 0, "failed with a message": 0, "succeeded": 0}
        succeeded = []
        for i in range(args.bad):
            label, api = cases[i % len(cases)]
            _node(api, "RandomNoise")["noise_seed"] = 5000 + i
            try:
                entry = server.run(api)
            except PromptRejected:
                outcomes["refused (400)"] += 1
                continue
            if entry["status"]["status_str"] == "error" and error_message(entry):
                outcomes["failed with a message"] += 1
            else:
                outcomes["succeeded"] += 1
                succeeded.append(label)
            if i % 5 == 4:  # good prompts between the bad ones still run
                seed["noise_seed"] = 9000 + i
                assert server.run(base)["status"]["status_str"] == "success"
        seed["noise_seed"] = 42
        identical = bool(np.array_equal(reference, _image(server, server.run(base))))

        # --- stop -----------------------------------------------------------------------------
        slow = _api("flux_base_50step", info, 768)
        slow_id = server.queue(slow)
        deadline = time.time() + 60
        while time.time() < deadline and not server.get("/queue")["queue_running"]:
            time.sleep(0.05)
        time.sleep(0.5)
        t = time.perf_counter()
        server.post("/interrupt", {})
        server.wait(slow_id, timeout=120)
        stop_s = time.perf_counter() - t
        rss_end = _rss_mib(pid)

    result = {
        "prompts": args.prompts,
        "median_s_per_prompt": round(statistics.median(gaps), 4) if gaps else None,
        "rss_mib": {
            "after_first_image": round(rss_start, 1),
            "after_10_prompts": round(rss_warm or float("nan"), 1),
            "after_load": round(rss_load, 1),
            "end": round(rss_end, 1),
        },
        "rss_growth_after_warmup_mib": round(rss_load - (rss_warm or rss_load), 1),
        "bad_prompts": args.bad,
        "bad_outcomes": outcomes,
        "bad_that_succeeded": sorted(set(succeeded)),
        "reference_image_bit_identical": identical,
        "stop_s": round(stop_s, 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
