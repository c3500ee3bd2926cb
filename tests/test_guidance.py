"""Qwen norm-rescaled CFG: maths, and the patch node inside a real ComfyUI run."""

import torch

from glance_core.guidance import norm_rescaled_cfg


def _token_norms(x):
    b, c, t, h, w = x.shape
    return (
        x.reshape(b, c, t, h // 2, 2, w // 2, 2)
        .permute(0, 2, 3, 5, 1, 4, 6)
        .reshape(b, t, h // 2, w // 2, -1)
        .norm(dim=-1)
    )


def test_rescaled_tokens_keep_the_conditional_norm():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 16, 1, 8, 6, generator=g), torch.randn(2, 16, 1, 8, 6, generator=g)
    out = norm_rescaled_cfg(cond, uncond, 5.0)
    assert torch.allclose(_token_norms(out), _token_norms(cond), rtol=1e-5)
    comb = uncond + 5.0 * (cond - uncond)
    # Same direction per token as plain CFG.
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), comb.flatten(1))
    assert (cos > 0).all()


def test_scale_one_is_identity_and_4d_works():
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    assert torch.allclose(norm_rescaled_cfg(cond, uncond, 1.0), cond, atol=1e-6)


def test_node_changes_qwen_cfg_output(comfy_nodes, tiny):
    import comfy.sample

    node = comfy_nodes.NODE_CLASS_MAPPINGS["GlanceQwenNormCFG"]
    base = tiny.build("qwen_image", 0)
    patched = node.execute(base).args[0]
    pos, neg, lat = tiny.conditioning("qwen_image", 1), tiny.conditioning("qwen_image", 2), tiny.latent("qwen_image")
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
    a = comfy.sample.sample(base, noise, 4, 5.0, "euler", "simple", pos, neg, lat, seed=0)
    b = comfy.sample.sample(patched, noise, 4, 5.0, "euler", "simple", pos, neg, lat, seed=0)
    c = comfy.sample.sample(patched, noise, 4, 1.0, "euler", "simple", pos, neg, lat, seed=0)
    d = comfy.sample.sample(base, noise, 4, 1.0, "euler", "simple", pos, neg, lat, seed=0)
    assert torch.isfinite(b).all() and not torch.allclose(a, b)
    assert torch.allclose(c, d)


def test_odd_latent_sizes_use_partial_edge_tokens():
    """ComfyUI pads odd latent sizes to the patch; the CFG must not fail there (it raised an EinopsError)."""
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(1, 16, 1, 7, 5, generator=g), torch.randn(1, 16, 1, 7, 5, generator=g)
    out = norm_rescaled_cfg(cond, uncond, 5.0)
    assert out.shape == cond.shape and torch.isfinite(out).all()
    # Whole tokens are as at an even size; an edge token is normed over its visible values.
    even = norm_rescaled_cfg(cond[..., :6, :4], uncond[..., :6, :4], 5.0)
    assert torch.allclose(out[..., :6, :4], even)
    comb = uncond + 5.0 * (cond - uncond)
    corner = (slice(None), slice(None), slice(None), slice(6, 7), slice(4, 5))
    want = comb[corner] * cond[corner].norm() / comb[corner].norm()
    assert torch.allclose(out[corner], want, rtol=1e-5)


def test_node_runs_at_odd_latent_size(comfy_nodes, tiny):
    import comfy.sample

    node = comfy_nodes.NODE_CLASS_MAPPINGS["GlanceQwenNormCFG"]
    patched = node.execute(tiny.build("qwen_image", 0)).args[0]
    pos, neg = tiny.conditioning("qwen_image", 1), tiny.conditioning("qwen_image", 2)
    lat = tiny.latent("qwen_image", height=24, width=40)  # 3×5 latent pixels: odd in both directions
    assert lat.shape[-2] % 2 and lat.shape[-1] % 2
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
    out = comfy.sample.sample(patched, noise, 2, 5.0, "euler", "simple", pos, neg, lat, seed=0)
    assert out.shape == lat.shape and torch.isfinite(out).all()
