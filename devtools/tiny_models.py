"""Tiny FLUX / Qwen-Image models in ComfyUI's own architectures, with seeded weights, and
seeded LoRA files in every key layout the pack must load.

Shapes follow ``comfy.ldm.flux`` / ``comfy.ldm.qwen_image``; weights are random but
deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

FLUX_TINY = dict(
    image_model="flux",
    in_channels=16,
    out_channels=16,
    vec_in_dim=32,
    context_in_dim=32,
    hidden_size=64,
    mlp_ratio=4.0,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=[8, 12, 12],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    guidance_embed=True,
)
QWEN_TINY = dict(
    image_model="qwen_image",
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=32,
    axes_dims_rope=[8, 12, 12],
)
CONFIGS = {"flux": FLUX_TINY, "qwen_image": QWEN_TINY}
#: The full-size architectures (FLUX.1-dev, Qwen-Image 20B), for GPU benchmarks and layout checks on "meta".
FLUX_DEV = dict(
    image_model="flux",
    in_channels=16,
    out_channels=16,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=[16, 56, 56],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    guidance_embed=True,
)
QWEN_IMAGE = dict(
    image_model="qwen_image",
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    axes_dims_rope=[16, 56, 56],
)
META_KEY = "glance_tiny_config"


def _config_class(arch: str):
    import comfy.supported_models as sm

    return {"flux": sm.Flux, "qwen_image": sm.QwenImage}[arch]


#: Fields newer ComfyUI releases added to FluxParams, with the value their detection gives a FLUX.1 file
#: (0.33: ``txt_ids_dims`` = [] — no text-position RoPE axes).
_FLUX1_DETECTED = {"txt_ids_dims": []}


def runtime_config(arch: str, config: dict | None = None) -> dict:
    """``config`` completed with the fields this ComfyUI release requires for a FLUX.1-layout model.

    The tiny configs list the fields ComfyUI 0.3.75 needs; detection fills the newer ones for files on disk,
    in-process builds take the same values here. A required field we do not know is an error, not a guess."""
    config = dict(config or CONFIGS[arch])
    if arch != "flux":
        return config
    import dataclasses

    from comfy.ldm.flux.model import FluxParams

    for f in dataclasses.fields(FluxParams):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in config and f.name not in ("image_model",):
            if f.name not in _FLUX1_DETECTED:
                raise RuntimeError(f"This ComfyUI's FluxParams requires '{f.name}', unknown to devtools.tiny_models.")
            config[f.name] = _FLUX1_DETECTED[f.name]
    return config


def model_config(arch: str, config: dict | None = None, dtype: torch.dtype = torch.float32):
    """ComfyUI's own model-config object (``supported_models``) for a tiny or full-size config."""
    mc = _config_class(arch)(runtime_config(arch, config))
    mc.set_inference_dtype(dtype, None)
    return mc


def seeded_state_dict(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Weights ~ N(0, 1/fan_in), norm scales 1, biases small; each tensor seeded by (seed, key)."""
    sd = {}
    for key in sorted(shapes):
        shape = shapes[key]
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        if len(shape) >= 2:
            t = torch.randn(shape, generator=g) / shape[1:].numel() ** 0.5
        elif key.endswith(("scale", "norm.weight")) or ".norm" in key and key.endswith("weight"):
            t = torch.ones(shape)
        else:
            t = 0.02 * torch.randn(shape, generator=g)
        sd[key] = t
    return sd


def model_shapes(arch: str, config: dict | None = None) -> dict[str, torch.Size]:
    model = model_config(arch, config).get_model({}, device="meta")  # shapes only: no memory, even at full size
    return {k: v.shape for k, v in model.diffusion_model.state_dict().items()}


def state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return seeded_state_dict(model_shapes(arch), seed)


def build(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | None = None):
    """A ComfyUI ModelPatcher of the tiny model (in-process, no file)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    model = model_config(arch, dtype=dtype).get_model({})
    model.load_model_weights(state_dict(arch, seed), "")
    load_device = torch.device(device) if device else mm.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def save(path: Path, arch: str, seed: int = 0) -> Path:
    """A diffusion-model file that ComfyUI's UNETLoader loads once the testkit's detection hook knows
    the tiny config (stored in the file's metadata)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(arch, seed), str(path), metadata={META_KEY: json.dumps(CONFIGS[arch])})
    return path


def conditioning(arch: str, seed: int = 0, seq: int = 8, batch: int = 1, guidance: float = 3.5):
    """ComfyUI CONDITIONING of the right shape for the tiny model."""
    g = torch.Generator().manual_seed(seed)
    dim = FLUX_TINY["context_in_dim"] if arch == "flux" else QWEN_TINY["joint_attention_dim"]
    extra = {}
    if arch == "flux":
        extra = {"pooled_output": torch.randn(batch, FLUX_TINY["vec_in_dim"], generator=g), "guidance": guidance}
    return [[torch.randn(batch, seq, dim, generator=g), extra]]


def latent(arch: str, height: int = 32, width: int = 32, batch: int = 1) -> torch.Tensor:
    """An empty latent (zeros) at 1/8 of the pixel size: 4-D for FLUX, 5-D for Qwen-Image."""
    shape = (batch, 16, height // 8, width // 8) if arch == "flux" else (batch, 16, 1, height // 8, width // 8)
    return torch.zeros(shape)


# ---------------------------------------------------------------------------------------------
# LoRA files in the layouts the loader must accept.
# ---------------------------------------------------------------------------------------------
GLANCE_QWEN_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.net.2",
    "img_mod.1",
    "txt_mlp.net.2",
    "txt_mod.1",
)
GLANCE_FLUX_DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
GLANCE_FLUX_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v")
_DIFFUSERS3 = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"}  # renamed to lora.down/up by diffusers


def _factor(seed: int, name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    digest = hashlib.sha256(f"lora{seed}:{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return std * torch.randn(shape, generator=g)


def diffusers_linear_shapes(arch: str, config: dict | None = None) -> dict[str, tuple[int, int]]:
    """diffusers module name → (out, in) for the tiny model (the names official LoRAs use)."""
    cfg = config or CONFIGS[arch]
    shapes = model_shapes(arch, cfg)
    if arch == "qwen_image":
        return {k[: -len(".weight")]: (v[0], v[1]) for k, v in shapes.items() if k.endswith(".weight") and len(v) == 2}
    import comfy.utils

    out = {}
    for dk, target in comfy.utils.flux_to_diffusers(cfg, output_prefix="").items():
        if not dk.endswith(".weight"):
            continue
        key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
        w = shapes.get(key)
        if w is None or len(w) != 2:
            continue
        out[dk[: -len(".weight")]] = (offset[2] if offset else w[0], w[1])
    return out


def glance_lora(
    arch: str, seed: int, rank: int = 4, std: float = 0.5, config: dict | None = None
) -> dict[str, torch.Tensor]:
    """An official-Glance-layout LoRA (as the released Glance files): ``transformer.`` prefix, diffusers
    names, ``lora.down/up`` on attention projections and ``lora_A/lora_B`` elsewhere, no alpha."""
    cfg = config or CONFIGS[arch]
    shapes = diffusers_linear_shapes(arch, cfg)
    if arch == "qwen_image":
        names = [f"transformer_blocks.{i}.{t}" for i in range(cfg["num_layers"]) for t in GLANCE_QWEN_TARGETS]
    else:
        names = [f"transformer_blocks.{i}.{t}" for i in range(cfg["depth"]) for t in GLANCE_FLUX_DOUBLE]
        names += [
            f"single_transformer_blocks.{i}.{t}" for i in range(cfg["depth_single_blocks"]) for t in GLANCE_FLUX_SINGLE
        ]
    sd = {}
    for n in names:
        out_f, in_f = shapes[n]
        down = _factor(seed, n + ".A", (rank, in_f), 1.0 / in_f**0.5)
        up = _factor(seed, n + ".B", (out_f, rank), std / rank**0.5)
        diffusers3 = any(n.endswith(t) for t in _DIFFUSERS3)
        a, b = ("lora.down.weight", "lora.up.weight") if diffusers3 else ("lora_A.weight", "lora_B.weight")
        sd[f"transformer.{n}.{a}"] = down
        sd[f"transformer.{n}.{b}"] = up
    return sd


def native_lora(
    arch: str, seed: int, rank: int = 4, std: float = 0.5, alpha: float | None = 2.0, style: str = "comfy"
) -> dict[str, torch.Tensor]:
    """A LoRA on ComfyUI-native module names: ``comfy`` = ``diffusion_model.<name>.lora_up/down`` + alpha,
    ``kohya`` = ``lora_unet_<name_with_underscores>.lora_up/down`` + alpha."""
    shapes = model_shapes(arch)
    sd = {}
    for key in sorted(shapes):
        if not key.endswith(".weight") or len(shapes[key]) != 2:
            continue
        if not any(s in key for s in (".qkv.", ".proj.", "linear1", "linear2", "to_q", "to_out", "img_mod", "txt_mlp")):
            continue
        name = key[: -len(".weight")]
        out_f, in_f = shapes[key]
        prefix = f"diffusion_model.{name}" if style == "comfy" else "lora_unet_" + name.replace(".", "_")
        sd[f"{prefix}.lora_down.weight"] = _factor(seed, name + ".A", (rank, in_f), 1.0 / in_f**0.5)
        sd[f"{prefix}.lora_up.weight"] = _factor(seed, name + ".B", (out_f, rank), std / rank**0.5)
        if alpha is not None:
            sd[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return sd


def peft_lora(arch: str, seed: int, rank: int = 4, std: float = 0.5) -> dict[str, torch.Tensor]:
    """Unprefixed PEFT keys (``<diffusers name>.lora_A/lora_B.weight``), as ArcFlow/Qwen trainers save (Qwen only)."""
    return {
        k[len("transformer.") :]
        .replace("lora.down.weight", "lora_A.weight")
        .replace("lora.up.weight", "lora_B.weight"): v
        for k, v in glance_lora(arch, seed, rank, std).items()
    }


def save_lora(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


# ---------------------------------------------------------------------------------------------
# Tiny VAEs that ComfyUI's stock VAELoader detects, and the files the shipped workflows name.
# ---------------------------------------------------------------------------------------------
def tiny_vae_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """FLUX: a TAEF1-layout VAE (16 latent channels, ×8); Qwen-Image: a Wan-2.1-layout VAE of width 16
    (ComfyUI reads the width from the weights). Random seeded weights."""
    if arch == "flux":
        from comfy.taesd.taesd import TAESD

        net = TAESD(latent_channels=16)
        sd = {k: v for k, v in net.state_dict().items() if k not in ("vae_scale", "vae_shift")}
        sd = seeded_state_dict({k: v.shape for k, v in sd.items()}, seed)
        sd["vae_scale"], sd["vae_shift"] = torch.tensor(0.3611), torch.tensor(0.1159)
        return sd
    from comfy.ldm.wan.vae import WanVAE

    net = WanVAE(
        dim=16,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
    )
    return seeded_state_dict({k: v.shape for k, v in net.state_dict().items()}, seed)


#: File names used by the shipped workflows → what the tiny stand-in is.
WORKFLOW_ASSETS = {
    "diffusion_models/flux1-dev.safetensors": ("model", "flux", 0),
    "diffusion_models/qwen_image_bf16.safetensors": ("model", "qwen_image", 0),
    "loras/glance_flux_slow.safetensors": ("lora", "flux", 1),
    "loras/glance_flux_fast.safetensors": ("lora", "flux", 2),
    "loras/glance_qwen_slow.safetensors": ("lora", "qwen_image", 1),
    "loras/glance_qwen_fast.safetensors": ("lora", "qwen_image", 2),
    "loras/arcflow_flux_2steps.safetensors": ("arcflow", "flux", 3),
    "loras/arcflow_qwen_2steps.safetensors": ("arcflow", "qwen_image", 3),
    "vae/ae.safetensors": ("vae", "flux", 0),
    "vae/qwen_image_vae.safetensors": ("vae", "qwen_image", 0),
}


def write_workflow_assets(models_dir: Path, lora_std: float = 0.05) -> None:
    """Tiny seeded stand-ins, under the names the shipped workflows use, in ``models_dir``."""
    from safetensors.torch import save_file

    for rel, (kind, arch, seed) in WORKFLOW_ASSETS.items():
        path = Path(models_dir) / rel
        if path.exists():
            continue
        if kind == "model":
            save(path, arch, seed)
        elif kind == "lora":
            save_lora(path, glance_lora(arch, seed, std=lora_std))
        elif kind == "arcflow":
            save_lora(path, arcflow_adapter(arch, seed))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tiny_vae_state_dict(arch, seed), str(path))


def write_example_image(input_dir: Path, name: str = "example.png") -> Path:
    """A real photograph (scikit-image's astronaut, bundled in its wheel) as the workflows' input image."""
    from PIL import Image
    from skimage import data

    path = Path(input_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        Image.fromarray(data.astronaut()).save(path)
    return path


def tiny_prompt(api: dict, size: int = 256) -> dict:
    """The API prompt of a shipped workflow, made runnable on the tiny stand-ins: text encoders
    (gigabytes) become the testkit's seeded encoder, and the image size shrinks to ``size``."""
    api = json.loads(json.dumps(api))
    if any(n["class_type"] == "GlanceReferenceLoader" for n in api.values()):
        return api  # the shipped reference model is small already
    arch = None
    for nid, node in list(api.items()):
        if node["class_type"] == "DualCLIPLoader" or (
            node["class_type"] == "CLIPLoader" and node["inputs"].get("type") == "qwen_image"
        ):
            arch = "flux" if node["class_type"] == "DualCLIPLoader" else "qwen_image"
            del api[nid]
    for node in api.values():
        if node["class_type"] == "CLIPTextEncode":
            node["class_type"] = "GlanceTestkitTextEncode"
            node["inputs"] = {"text": node["inputs"]["text"], "arch": arch}
        if node["class_type"] in ("EmptySD3LatentImage", "EmptyLatentImage"):
            node["inputs"].update(width=size, height=size)
        if node["class_type"] == "OneShotTrainer":
            node["inputs"].update(resolution=min(size, 128))
    return api


def _arcflow_targets(arch: str) -> str:
    from glance_core.architectures import ARCHITECTURES

    return ARCHITECTURES[arch].targets["arcflow"]


def arcflow_adapter(
    arch: str,
    seed: int = 0,
    k: int = 4,
    rank: int = 4,
    std: float = 0.02,
    config: dict | None = None,
    shapes_only: bool = False,
) -> dict[str, torch.Tensor]:
    """An adapter in the released ArcFlow layout (as the released adapters): unprefixed PEFT LoRA keys on the
    official targets, plus full ``norm_out.linear`` and the three heads, at this model size.
    ``shapes_only`` gives meta tensors (for full-size layout checks without the memory)."""
    import re

    cfg = config or CONFIGS[arch]
    shapes = diffusers_linear_shapes(arch, cfg)

    def make(name: str, shape: tuple[int, ...], scale: float) -> torch.Tensor:
        return torch.empty(shape, device="meta") if shapes_only else _factor(seed, name, shape, scale)

    sd = {}
    for n, (out_f, in_f) in sorted(shapes.items()):
        if re.fullmatch(_arcflow_targets(arch), n):
            sd[f"{n}.lora_A.weight"] = make(n + ".A", (rank, in_f), 1.0 / in_f**0.5)
            sd[f"{n}.lora_B.weight"] = make(n + ".B", (out_f, rank), std / rank**0.5)
    hidden = shapes["norm_out.linear"][1]
    p2, ch = cfg["patch_size"] ** 2, cfg["out_channels"]
    rows = {
        "norm_out.linear": 2 * hidden,
        "proj_out_means": k * p2 * ch,
        "proj_out_logweights": k * p2,
        "proj_out_loggamma": (k - 1) * p2,
    }
    for name, r in rows.items():
        sd[f"{name}.weight"] = make(name + ".w", (r, hidden), 1.0 / hidden**0.5)
        sd[f"{name}.bias"] = make(name + ".b", (r,), 0.02)
    return sd
