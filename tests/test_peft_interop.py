"""A saved expert is a plain PEFT LoRA: peft loads it into the diffusers-named modules and reproduces our forward.

The One-Shot Trainer writes ``transformer.<diffusers name>.lora_A/lora_B.weight`` with alpha/rank folded into
lora_B. ComfyUI's Qwen-Image modules carry the diffusers names, so peft can inject its own LoRA layers into a
second copy of the model and load the file as it is (lora_alpha = r: scale 1). Sampling that copy must give what
the Phase-Aware LoRA Loader gives with the same file at strength 1.0.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tests_helpers import sample, train

peft = pytest.importorskip("peft")


def test_trained_expert_loaded_by_peft_matches_the_loader(comfy_nodes, tiny, loras_dir):
    import comfy.model_patcher

    n = comfy_nodes.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model = tiny.build("qwen_image", 0)
    pos, neg = tiny.conditioning("qwen_image", 1), tiny.conditioning("qwen_image", 2)
    rank = 4
    train(
        comfy_nodes,
        model,
        pos,
        objective="trajectory",
        expert="slow",
        steps=4,
        rank=rank,
        alpha=16.0,
        learning_rate=5e-3,
        negative=neg,
        cfg=3.0,
        noises=1,
        teacher_steps=12,
        save_name="peft_check",
    )
    sd = load_file(str(loras_dir / "peft_check_slow.safetensors"))
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    assert max(v.abs().max().item() for k, v in sd.items() if "lora_B" in k) > 0, "training left the LoRA at zero"

    # Ours: the loader, Slow expert everywhere (boundary 0), strength 1.0.
    ours = n["PhaseAwareLoRALoader"].execute(model, "peft_check_slow.safetensors", "None", 1.0, 1.0, 0.0).args[0]

    # peft's: its LoRA layers injected into an independent copy of the base model, the file loaded as it is.
    theirs_model = tiny.build("qwen_image", 0).model
    dm = theirs_model.diffusion_model
    unprefixed = {k[len("transformer.") :]: v for k, v in sd.items()}
    names = sorted({k.rsplit(".lora_", 1)[0] for k in unprefixed})
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=names, lora_dropout=0.0)
    peft.inject_adapter_in_model(config, dm)
    result = peft.set_peft_model_state_dict(dm, unprefixed)
    assert not [k for k in result.unexpected_keys if "lora_" in k], result.unexpected_keys
    assert sum(1 for _, m in dm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)) == len(names)
    theirs = comfy.model_patcher.ModelPatcher(theirs_model, load_device=model.load_device, offload_device="cpu")

    latent = torch.zeros(1, 16, 8, 8)
    sigmas = torch.tensor([1.0, 0.97919, 0.95752, 0.0])
    base = sample(comfy_nodes, model, sigmas, pos, neg, latent, cfg=3.0)
    a = sample(comfy_nodes, ours, sigmas, pos, neg, latent, cfg=3.0)
    b = sample(comfy_nodes, theirs, sigmas, pos, neg, latent, cfg=3.0)
    assert (a - base).abs().max() > 1e-3, "the expert changed nothing: the comparison would be empty"
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
