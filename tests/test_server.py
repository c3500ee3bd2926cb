"""Through a real headless ComfyUI server (main.py --cpu on 127.0.0.1): the shipped workflows,
node registration, errors and interrupts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
PACK_NODES = {
    "SlowFastScheduler",
    "PhaseAwareLoRALoader",
    "GlanceQwenNormCFG",
    "GlanceOfficialSampler",
    "OneShotTrainer",
    "ArcFlowLoader",
    "ArcFlowSampler",
    "ArcFlowDistiller",
    "GlanceReferenceLoader",
    "GlanceReferenceTextEncode",
}


@pytest.fixture(scope="module")
def server(comfy_nodes, tmp_path_factory):
    from devtools import tiny_models
    from devtools.server import ComfyServer

    base = tmp_path_factory.mktemp("comfy")
    tiny_models.write_workflow_assets(base / "models")
    tiny_models.write_example_image(base / "input")
    srv = ComfyServer(base).start()
    yield srv
    srv.stop()


def _api(name: str, object_info: dict, size: int = 256) -> dict:
    from devtools import tiny_models, workflow

    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    return tiny_models.tiny_prompt(workflow.to_api(ui, object_info), size)


def _images(server, entry: dict, kind: str = "output") -> list[np.ndarray]:
    """Images of a finished prompt: SaveImage's ("output") or previews ("temp")."""
    out = []
    for node_out in entry["outputs"].values():
        for img in node_out.get("images", []):
            if img["type"] == kind:
                out.append(np.asarray(Image.open(server.base / kind / img["subfolder"] / img["filename"])))
    return out


def test_pack_registers_its_nodes_with_tooltips(object_info):
    """Every node of the pack (found by its module) sits under the pack's one category, has a description, a
    tooltip on every input and output, and numeric inputs say their range/defaults in figures."""
    import re

    category = re.search(r'^CATEGORY = "(.+)"$', (REPO / "nodes" / "common.py").read_text(), re.M).group(1)
    pack = {k: v for k, v in object_info.items() if v.get("python_module", "").endswith("comfyui-glance")}
    assert PACK_NODES <= set(pack)
    for node, info in pack.items():
        assert info["category"] == category, (node, info["category"])
        assert len(info["description"]) >= 40, f"{node} has no description"
        for group in ("required", "optional"):
            for name, spec in info["input"].get(group, {}).items():
                tip = spec[1].get("tooltip", "") if len(spec) > 1 else ""
                assert tip, f"{node}.{name} has no tooltip"
                if spec[0] in ("INT", "FLOAT"):
                    assert re.search(r"\d", tip), f"{node}.{name}: the tooltip gives no figure (range, default)"
        tips = info.get("output_tooltips") or []
        assert len(tips) == len(info["output"]) and all(tips), f"{node}: an output has no tooltip"


def test_workflows_show_in_template_browser(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates["comfyui-glance"]) == sorted(p.stem for p in WORKFLOWS)
    assert len(WORKFLOWS) >= 3


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_typechecks_and_runs_on_tiny_models(server, object_info, path):
    from devtools import workflow

    ui = json.loads(path.read_text())
    workflow.check_links(ui, object_info)  # every node type exists, every link type-checks
    entry = server.run(_api(path.stem, object_info), workflow=ui)
    from devtools.server import error_message

    assert entry["status"]["status_str"] == "success", error_message(entry)
    images = _images(server, entry)
    size = 32 if "reference" in path.stem else 256  # the reference teacher works at 32 x 32
    assert images and images[0].shape == (size, size, 3)
    if "reference" in path.stem:  # Glance 10 steps, the teacher's 50 and the distilled ArcFlow student's 2, 4 each
        saved = {k: len(v["images"]) for k, v in entry["outputs"].items() if k in ("25", "28", "57")}
        assert saved == {"25": 4, "28": 4, "57": 4}, entry["outputs"].keys()
        assert all(np.ptp(img) > 50 for img in images), "an output is flat: the scene is missing"


def _fails_naming(server, api: dict, *needles: str) -> None:
    """The prompt is refused at validation (400) or fails at execution, with a message naming ``needles``."""
    from devtools.server import PromptRejected, error_message

    try:
        entry = server.run(api)
    except PromptRejected as rejected:
        msg = json.dumps(rejected.answer)
    else:
        assert entry["status"]["status_str"] == "error"
        msg = error_message(entry)
    assert all(n in msg for n in needles), msg


def test_bad_input_fails_with_a_clear_message_and_server_keeps_serving(server, object_info):
    def with_loader(**inputs):
        api = _api("glance_flux_10step", object_info)
        next(n for n in api.values() if n["class_type"] == "PhaseAwareLoRALoader")["inputs"].update(inputs)
        return api

    _fails_naming(
        server,
        with_loader(slow_lora="glance_qwen_slow.safetensors"),  # a Qwen-Image LoRA on FLUX
        "glance_qwen_slow.safetensors",
        "match no layer",
    )
    _fails_naming(server, with_loader(fast_lora="no_such_lora.safetensors"), "no_such_lora.safetensors")
    _fails_naming(server, with_loader(boundary_sigma=-2.0), "boundary_sigma")  # -1 is auto
    # A LoRA file with a NaN value: refused by name before sampling, not a black image.
    from devtools import tiny_models

    sd = tiny_models.glance_lora("flux", 1)
    key = next(iter(sorted(sd)))
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    tiny_models.save_lora(server.base / "models" / "loras" / "nan_slow.safetensors", sd)
    _fails_naming(server, with_loader(slow_lora="nan_slow.safetensors"), "nan_slow.safetensors", key, "NaN")
    assert server.run(_api("glance_flux_10step", object_info))["status"]["status_str"] == "success"


def test_interrupt_stops_the_run_and_leaves_the_model_intact(server, object_info):
    glance = _api("glance_flux_10step", object_info)
    first = _images(server, server.run(glance))[0]
    slow = _api("flux_base_50step", object_info, size=768)
    slow_id = server.queue(slow)
    deadline = time.time() + 60
    while time.time() < deadline and not server.get("/queue")["queue_running"]:
        time.sleep(0.05)
    time.sleep(0.5)
    server.post("/interrupt", {})
    entry = server.wait(slow_id, timeout=120)
    events = [e for e, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in events, events
    # Change the seed so ComfyUI cannot serve a cached result, then back: same pixels as before.
    noise = next(n for n in glance.values() if n["class_type"] == "RandomNoise")
    noise["inputs"]["noise_seed"] = 43
    assert server.run(glance)["status"]["status_str"] == "success"
    noise["inputs"]["noise_seed"] = 42
    again = _images(server, server.run(glance))[0]
    assert np.array_equal(first, again)


def test_stop_interrupts_training_promptly_and_writes_nothing(server, object_info):
    api = _api("glance_flux_train_one_image", object_info)
    trainer = next(n for n in api.values() if n["class_type"] == "OneShotTrainer")
    trainer["inputs"].update(steps=100000, save_name="never_written")
    prompt_id = server.queue(api)
    deadline = time.time() + 120
    while time.time() < deadline and not server.get("/queue")["queue_running"]:
        time.sleep(0.05)
    time.sleep(3.0)  # well into training
    t = time.time()
    server.post("/interrupt", {})
    entry = server.wait(prompt_id, timeout=60)
    assert time.time() - t < 10, "Stop took effect within seconds"
    assert "execution_interrupted" in [e for e, _ in entry["status"]["messages"]]
    assert not list((server.base / "models" / "loras").glob("never_written*"))
    assert server.run(_api("glance_flux_10step", object_info))["status"]["status_str"] == "success"


def test_save_names_that_cannot_be_saved_fail_before_training(server, object_info):
    """Through /prompt: a save_name too long for the file system, one with a NUL, and a name whose Fast file
    already exists are refused before any training step, name the problem, write nothing; the server serves on."""
    loras = server.base / "models" / "loras"
    (loras / "taken_fast.safetensors").write_bytes(b"someone's file")
    before = sorted(p.name for p in loras.iterdir())
    for name, needles in [
        ("n" * 300, ("save_name is too long", "Nothing was trained")),
        ("bad\x00name", ("contains '\\x00'", "Nothing was trained")),
        ("taken", ("taken_fast.safetensors already exists", "overwrite")),
    ]:
        api = _api("glance_flux_train_one_image", object_info)
        trainer = next(n for n in api.values() if n["class_type"] == "OneShotTrainer")
        trainer["inputs"].update(steps=100000, save_name=name)  # would run for hours if the check came late
        t = time.time()
        _fails_naming(server, api, *needles)
        assert time.time() - t < 60
    assert sorted(p.name for p in loras.iterdir()) == before
    assert (loras / "taken_fast.safetensors").read_bytes() == b"someone's file"
    assert server.run(_api("glance_flux_10step", object_info))["status"]["status_str"] == "success"
