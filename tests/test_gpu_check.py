"""The prepared GPU check (``python -m bench.gpu_check``) runs end to end: on the tiny models on the CPU (the
same nodes and code path as on CUDA), and its full-size layouts are detected by ComfyUI as the real models."""

from __future__ import annotations

import math

import pytest
import torch


def test_gpu_check_runs_on_the_tiny_models(comfy_nodes):
    from bench import gpu_check

    rows = gpu_check.main(["--tiny"])
    assert [r["arch"] for r in rows] == ["flux", "qwen_image"]
    for r in rows:
        # Figures only (timing differences on tiny models are noise): every measurement ran and gave a number.
        for key in ("loader_10_over_bare_10", "arcflow_2_over_bare_2", "train_s_per_step", "distill_s_per_iteration"):
            assert math.isfinite(r[key]), (r["arch"], key, r[key])
    assert "| flux | full |" in gpu_check.table(rows)


@pytest.mark.parametrize("arch", ["flux", "qwen_image"])
def test_full_size_layouts_are_detected_as_the_real_models(comfy_nodes, tiny, arch):
    """gpu_check loads its random full-size weights through ComfyUI's detection: it must find FLUX.1-dev /
    Qwen-Image with exactly the configuration the check claims to measure."""
    import comfy.model_detection

    from bench import gpu_check

    cfg = gpu_check.FULL[arch]
    sd = {k: torch.empty(s, device="meta") for k, s in tiny.model_shapes(arch, cfg).items()}
    mc = comfy.model_detection.model_config_from_unet(sd, "")
    assert mc is not None and mc.unet_config["image_model"] == arch
    assert {k: v for k, v in mc.unet_config.items() if k in cfg and cfg[k] != v} == {}
