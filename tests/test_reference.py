"""The shipped reference teacher: its file, its loader and caption nodes, its training script, and the property
the fidelity benchmark relies on (plain few-step Euler is clearly off its 50-step output)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "assets" / "glance_reference_photos.safetensors"


@pytest.fixture(scope="module")
def rm(glance):
    return glance.glance_core.reference_model


@pytest.fixture(scope="module")
def ref(rm):
    return rm.load(SHIPPED)


def test_shipped_file_is_small_and_self_describing(rm):
    from safetensors import safe_open

    assert SHIPPED.stat().st_size < 8e6
    with safe_open(str(SHIPPED), framework="pt") as f:
        meta = f.metadata()
    config = json.loads(meta[rm.META_CONFIG])
    info = json.loads(meta[rm.META_INFO])
    assert config["image_model"] == "flux" and config["in_channels"] == 3
    assert info["trained_by"] == "python -m devtools.train_reference" and info["minutes"] <= 30


def test_loader_and_caption_nodes_give_a_comfy_flux_in_pixel_space(glance, comfy_nodes, rm):
    import comfy.latent_formats
    import comfy.model_base

    nodes = glance.nodes.reference
    model, pos, neg, vae = nodes.ReferenceLoader.execute(rm.REFERENCE_NAME, "coffee close", "").args
    assert isinstance(model.model, comfy.model_base.Flux)
    assert isinstance(model.model.latent_format, comfy.latent_formats.ChromaRadiance)
    assert vae.latent_channels == 3 and vae.downscale_ratio == 1
    assert pos[0][0].shape == (1, 2, 32) and pos[0][1]["pooled_output"].shape == (1, 32)
    other = nodes.ReferenceTextEncode.execute(rm.REFERENCE_NAME, "Coffee, close").args[0]
    assert torch.equal(other[0][0], pos[0][0])  # case and commas do not matter
    assert not torch.equal(neg[0][0], pos[0][0])
    image = torch.rand(1, 32, 32, 3)
    latent = vae.encode(image)
    assert latent.shape == (1, 3, 32, 32) and torch.allclose(vae.decode(latent), image, atol=1e-6)


def test_bad_captions_and_files_are_named(glance, rm, tmp_path):
    from safetensors.torch import save_file

    ref = rm.load(SHIPPED)
    with pytest.raises(glance.glance_core.GlanceError, match=r"'dog'.*astronaut, coffee"):
        ref.encode("dog close")
    with pytest.raises(glance.glance_core.GlanceError, match="at most 2"):
        ref.encode("cat moon close")
    other = tmp_path / "lora.safetensors"
    save_file({"a": torch.zeros(1)}, str(other))
    with pytest.raises(glance.glance_core.GlanceError, match="lora.safetensors is not a Glance reference model"):
        rm.load(other)
    with pytest.raises(glance.glance_core.GlanceError, match="only .safetensors"):
        rm.load(tmp_path / "model.ckpt")


def _sample(comfy_nodes, ref, caption: str, sigmas, seed: int = 0, n: int = 2) -> torch.Tensor:

    from tests_helpers import sample

    latent = torch.zeros(n, 3, 32, 32)
    sig = torch.tensor([float(s) for s in sigmas])
    return sample(comfy_nodes, ref.model, sig, ref.encode(caption), ref.encode(""), latent, cfg=3.0, seed=seed)


def test_teacher_follows_its_captions_and_leaves_room_to_accelerate(comfy_nodes, glance, ref):
    """Samples follow the caption's photo (orange coffee, grey faces); and plain 10-step Euler on the Glance sigmas
    is clearly off the 50-step output (what makes the accelerators measurable)."""
    import comfy.samplers

    ms = ref.model.get_model_object("model_sampling")
    s50 = comfy.samplers.calculate_sigmas(ms, "simple", 50)
    glance10 = glance.glance_core.schedules.preset("glance_flux").sigmas
    means = {c: _sample(comfy_nodes, ref, f"{c} wide", s50).mean((0, 2, 3)) for c in ("coffee", "face")}
    assert means["coffee"][0] - means["coffee"][2] > 0.2  # the coffee photo is orange: red well over blue
    assert abs(means["face"][0] - means["face"][2]) < 0.1  # the LFW faces are grey
    teacher = _sample(comfy_nodes, ref, "coffee close", s50, n=4)
    fast = _sample(comfy_nodes, ref, "coffee close", glance10, n=4)
    mse = float(((teacher - fast) / 2).square().mean())
    psnr = 10 * np.log10(1 / mse)
    assert psnr < 30, f"10-step Euler is at {psnr:.1f} dB of the 50-step output: no room to accelerate"


def test_training_script_is_reproducible_from_its_seed(comfy_nodes, tmp_path):
    from safetensors.torch import load_file

    from devtools import train_reference

    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    train_reference.train(a, steps=2, batch=2, seed=3, lr=1e-3)
    train_reference.train(b, steps=2, batch=2, seed=3, lr=1e-3)
    train_reference.train(c, steps=2, batch=2, seed=4, lr=1e-3)
    sa, sb, sc = load_file(str(a)), load_file(str(b)), load_file(str(c))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
