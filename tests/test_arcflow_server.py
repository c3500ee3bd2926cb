"""ArcFlow through a real headless ComfyUI server: the graphs users build and bad adapters, where users meet them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(comfy_nodes, tmp_path_factory):
    from devtools import tiny_models
    from devtools.server import ComfyServer

    base = tmp_path_factory.mktemp("comfy")
    tiny_models.write_workflow_assets(base / "models")
    loras = base / "models" / "loras"
    nan = tiny_models.arcflow_adapter("qwen_image", 3)
    nan["proj_out_loggamma.bias"][0] = float("nan")
    tiny_models.save_lora(loras / "arcflow_nan.safetensors", nan)
    hot = tiny_models.arcflow_adapter("qwen_image", 3)
    hot["proj_out_loggamma.bias"] = torch.full_like(hot["proj_out_loggamma.bias"], 1000.0)  # γ = e^1000
    tiny_models.save_lora(loras / "arcflow_overflow.safetensors", hot)
    srv = ComfyServer(base).start()
    yield srv
    srv.stop()


def _api(object_info: dict, **loader_inputs) -> dict:
    from devtools import tiny_models, workflow

    ui = json.loads((REPO / "workflows" / "arcflow_qwen_image_2step.json").read_text())
    api = tiny_models.tiny_prompt(workflow.to_api(ui, object_info), 64)
    next(n for n in api.values() if n["class_type"] == "ArcFlowLoader")["inputs"].update(loader_inputs)
    return api


def _image(server, entry: dict) -> np.ndarray:
    from devtools.server import error_message

    assert entry["status"]["status_str"] == "success", error_message(entry)
    img = next(i for o in entry["outputs"].values() for i in o.get("images", []) if i["type"] == "output")
    return np.asarray(Image.open(server.base / "output" / img["subfolder"] / img["filename"])).astype(int)


def _error(server, api: dict) -> str:
    from devtools.server import error_message

    entry = server.run(api)
    assert entry["status"]["status_str"] == "error"
    return error_message(entry)


def test_modelsampling_after_the_loader_gives_the_same_image(server, object_info):
    """The stock Qwen-Image template's ModelSamplingAuraFlow placed after the ArcFlow loader (the old heads then
    returned zeros and the picture was the decoded noise)."""
    plain = _api(object_info)
    after = _api(object_info)
    loader_id = next(k for k, n in after.items() if n["class_type"] == "ArcFlowLoader")
    after["900"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": [loader_id, 0], "shift": 3.2}}
    for node in after.values():
        for name, value in node["inputs"].items():
            if node is not after["900"] and value == [loader_id, 0]:
                node["inputs"][name] = ["900", 0]
    a, b = _image(server, server.run(plain)), _image(server, server.run(after))
    assert np.abs(a - b).max() <= 1


def test_bad_adapters_are_named_errors_and_the_server_keeps_serving(server, object_info):
    msg = _error(server, _api(object_info, adapter="arcflow_nan.safetensors"))
    assert "arcflow_nan.safetensors" in msg and "proj_out_loggamma.bias" in msg and "NaN or inf" in msg, msg
    msg = _error(server, _api(object_info, adapter="arcflow_overflow.safetensors"))
    assert "not finite" in msg and "log-γ" in msg and "0.7619" in msg, msg
    msg = _error(server, _api(object_info, shift=float("nan")))
    assert "shift must be a finite number" in msg, msg
    _image(server, server.run(_api(object_info)))
