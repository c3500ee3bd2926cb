"""Shared fixtures. Pure-maths tests import ``glance_core`` directly; everything else runs
against the real ComfyUI runtime ($COMFYUI_PATH or .comfyui/), in-process or as a server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # after ComfyUI: the repo root has a nodes/ package


@pytest.fixture(scope="session")
def comfy_nodes():
    """ComfyUI imported in-process with the pack loaded; returns ComfyUI's ``nodes`` module."""
    from devtools import comfy_env

    return comfy_env.import_comfy()


@pytest.fixture(scope="session")
def glance(comfy_nodes):
    """The pack as ComfyUI loaded it."""
    from devtools import comfy_env

    return comfy_env.pack()


@pytest.fixture
def loras_dir(comfy_nodes, tmp_path):
    """A fresh folder registered as ComfyUI's first ``loras`` folder for one test."""
    import folder_paths

    d = tmp_path / "loras"
    d.mkdir()
    folder_paths.add_model_folder_path("loras", str(d), is_default=True)
    yield d
    folder_paths.folder_names_and_paths["loras"][0].remove(str(d))
    folder_paths.filename_list_cache.pop("loras", None)


@pytest.fixture(scope="module")
def object_info(server):
    """ComfyUI's /object_info of the module's ``server`` fixture (each server test module starts its own)."""
    return server.object_info()


@pytest.fixture(scope="session")
def tiny():
    from devtools import tiny_models

    return tiny_models
