"""ArcFlow heads on a ComfyUI model, attached with ModelPatcher object patches (the base stays untouched).

The released adapters (reference arcflow.md §5) replace the model's output projection with three
heads on the final AdaLN-modulated hidden state: ``proj_out_means`` (K·p²·C), ``proj_out_logweights``
(K·p²) and ``proj_out_loggamma`` ((K−1)·p²), plus a new ``norm_out.linear``, plus PEFT LoRA keys.

How the patched model yields the policy:
- the output projection (FLUX ``final_layer.linear``, Qwen-Image ``proj_out``) is replaced by
  :class:`PolicyHeads`, which stores the raw head outputs in an :class:`ArcFlowState` and returns
  zeros of the old shape (so ComfyUI's unpatchify code runs unchanged);
- ``model_sampling`` is replaced by an ArcFlow sampling (flow, fixed shift 3.2) whose
  ``calculate_denoised`` turns the stored policy into the *equivalent denoised* x̂0 = x − σ·ū, where
  ū = D/Δ is the policy's mean velocity from σ to the next sigma of the run (an APPLY_MODEL wrapper
  reads it from ``sample_sigmas``). A plain Euler step from σ then lands exactly where the closed form
  does, so a stock KSampler/euler works; ArcFlowSampler applies the closed form D directly.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import torch

from . import GlanceError, arcflow

HEADS = ("proj_out_means", "proj_out_logweights", "proj_out_loggamma")
STATE_KEY = "glance_arcflow"


@dataclass
class ArcFlowState:
    k: int
    channels: int
    patch: int
    raw: tuple | None = None  # (means, logweights, loggammas) per token, float32
    sigma_next: float | None = None
    last_displacement: torch.Tensor | None = None
    evaluations: int = 0
    teacher_mode: bool = False  # distillation: the patched model acts as the frozen base model
    extra: dict = field(default_factory=dict)

    def policy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored policy in latent layout for input ``x`` ([B, C, H, W] or [B, C, T, H, W])."""
        if self.raw is None:
            raise GlanceError("No ArcFlow policy was computed: the heads did not run.")
        means, logw, logg = self.raw
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        out = (
            arcflow.unpack_tokens(means, self.k, self.channels, h, w, self.patch),
            arcflow.unpack_tokens(logw, self.k, 1, h, w, self.patch),
            arcflow.unpack_tokens(logg, self.k - 1, 1, h, w, self.patch),
        )
        if x.ndim == 5:  # Qwen-Image latents carry a time axis of length 1
            out = tuple(t.unsqueeze(3) for t in out)
        return out


class PolicyHeads(torch.nn.Module):
    """Replaces the output projection: computes the three heads (float32) and stores them."""

    def __init__(
        self,
        sd: dict[str, torch.Tensor],
        out_features: int,
        state: ArcFlowState,
        original: torch.nn.Module | None = None,
    ):
        super().__init__()
        self.original = [original]  # the base projection, used in teacher mode (not a submodule)
        self.heads = torch.nn.ModuleDict()
        for name in HEADS:
            w, b = sd[f"{name}.weight"], sd.get(f"{name}.bias")
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=torch.float32)
            with torch.no_grad():
                lin.weight.copy_(w.to(torch.float32))
                if b is not None:
                    lin.bias.copy_(b.to(torch.float32))
            self.heads[name] = lin.requires_grad_(False)
        self.out_features = out_features
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state.teacher_mode:
            return self.original[0](x)
        xf = x.to(torch.float32)
        self.state.raw = tuple(self.heads[n](xf) for n in HEADS)
        return x.new_zeros(*x.shape[:-1], self.out_features)

    def state_dict_adapter(self) -> dict[str, torch.Tensor]:
        return {
            f"{n}.{p}": t.detach().to(torch.float32).clone() for n in HEADS for p, t in self.heads[n].named_parameters()
        }


def _layout(model) -> tuple[str, str, bool]:
    """(norm module path, projection module path, swap scale/shift) for FLUX or Qwen-Image."""
    import comfy.model_base

    if isinstance(model, comfy.model_base.QwenImage):
        return "diffusion_model.norm_out.linear", "diffusion_model.proj_out", False
    if isinstance(model, comfy.model_base.Flux):
        # diffusers' AdaLayerNormContinuous emits (scale, shift); ComfyUI's FLUX LastLayer chunks (shift, scale).
        return "diffusion_model.final_layer.adaLN_modulation.1", "diffusion_model.final_layer.linear", True
    raise GlanceError(f"ArcFlow adapters exist for FLUX and Qwen-Image; the model is {type(model).__name__}.")


def split_adapter(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(LoRA part, full-tensor part) as the official loader splits them: by 'lora' in the key."""
    lora = {k: v for k, v in sd.items() if "lora" in k}
    full = {k: v for k, v in sd.items() if "lora" not in k}
    return lora, full


def check_heads(model_patcher, full: dict[str, torch.Tensor], name: str) -> int:
    """Validate the full tensors against the model; returns K. Errors name the tensor and both shapes."""
    model = model_patcher.model
    norm_path, proj_path, _ = _layout(model)
    # get_model_object: the base modules even while another clone has its object patches applied
    proj = model_patcher.get_model_object(proj_path)
    norm = model_patcher.get_model_object(norm_path)
    hidden = proj.in_features
    patch = model.model_config.unet_config.get("patch_size", 2)
    channels = model.model_config.unet_config.get("out_channels", 16)
    for key in (*[f"{h}.weight" for h in HEADS], "norm_out.linear.weight"):
        if key not in full:
            raise GlanceError(f"{name} is not an ArcFlow adapter: it has no {key!r} tensor.")
    k, rem = divmod(full["proj_out_logweights.weight"].shape[0], patch * patch)
    if rem or k < 1:
        raise GlanceError(
            f"{name}: proj_out_logweights.weight has {full['proj_out_logweights.weight'].shape[0]} "
            f"rows, not a multiple of {patch * patch} (patch²)."
        )
    expected = {
        "proj_out_means.weight": (k * patch * patch * channels, hidden),
        "proj_out_means.bias": (k * patch * patch * channels,),
        "proj_out_logweights.weight": (k * patch * patch, hidden),
        "proj_out_logweights.bias": (k * patch * patch,),
        "proj_out_loggamma.weight": ((k - 1) * patch * patch, hidden),
        "proj_out_loggamma.bias": ((k - 1) * patch * patch,),
        "norm_out.linear.weight": tuple(norm.weight.shape),
        "norm_out.linear.bias": tuple(norm.bias.shape) if norm.bias is not None else None,
    }
    for key, t in full.items():
        if key not in expected:
            raise GlanceError(f"{name}: tensor {key!r} matches nothing of an ArcFlow adapter for this model.")
        if expected[key] is not None and tuple(t.shape) != expected[key]:
            raise GlanceError(f"{name}: {key} has shape {list(t.shape)}, this model needs {list(expected[key])}.")
    return k


class SwitchNorm(torch.nn.Module):
    """The adapter's ``norm_out.linear``; the base model's own in teacher mode (distillation)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, original: torch.nn.Module, state: ArcFlowState):
        super().__init__()
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            if bias is not None:
                self.linear.bias.copy_(bias)
        self.linear.requires_grad_(False)
        self.original = [original]  # a list: not a submodule (it belongs to the base model)
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state.teacher_mode:
            return self.original[0](x)
        return self.linear(x.to(self.linear.weight.dtype)).to(x.dtype)


def apply_arcflow(
    model_patcher, adapter: dict[str, torch.Tensor], name: str, strength: float = 1.0, shift: float = 3.2
):
    """A clone of ``model_patcher`` with the adapter's LoRA merged and its heads attached."""
    from . import experts

    lora, full = split_adapter(adapter)
    k = check_heads(model_patcher, full, name)
    m = model_patcher.clone()
    if lora:
        if experts.is_flux(model_patcher.model):
            lora = {(k_ if k_.startswith("transformer.") else f"transformer.{k_}"): v for k_, v in lora.items()}
        m.add_patches(experts.parse_lora(model_patcher, lora, name), strength)
    attach_heads(m, full, k, shift)
    return m


def attach_heads(m, full: dict[str, torch.Tensor], k: int, shift: float) -> ArcFlowState:
    """Object-patch the heads, the norm and the sampling onto patcher ``m`` (in place); returns the state.

    ``full`` holds ``norm_out.linear.*`` (diffusers order) and the three heads' tensors.
    """
    import comfy.patcher_extension as pe

    model = m.model
    norm_path, proj_path, swap = _layout(model)
    norm = m.get_model_object(norm_path)
    w, b = full["norm_out.linear.weight"], full.get("norm_out.linear.bias")
    if swap:
        w = torch.cat(w.chunk(2, 0)[::-1], 0)
        b = torch.cat(b.chunk(2, 0)[::-1], 0) if b is not None else None
    cfg = model.model_config.unet_config
    state = ArcFlowState(k=k, channels=cfg.get("out_channels", 16), patch=cfg.get("patch_size", 2))
    dtype = (
        torch.float32 if norm.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16) else norm.weight.dtype
    )
    new_norm = SwitchNorm(w.to(dtype), None if b is None else b.to(dtype), norm, state)
    proj = m.get_model_object(proj_path)
    heads = PolicyHeads(full, proj.out_features, state, original=proj)
    m.add_object_patch(norm_path, new_norm)
    m.add_object_patch(proj_path, heads)
    m.add_object_patch("model_sampling", arcflow_sampling(model.model_config, state, shift))
    key = f"{STATE_KEY}_{uuid.uuid4().hex[:8]}"
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, key, _next_sigma_wrapper(state))
    m.set_attachments(STATE_KEY, state)
    m.set_attachments(STATE_KEY + "_modules", (heads, new_norm))
    return state


def export_heads(m) -> dict[str, torch.Tensor]:
    """The full-tensor part of an adapter (diffusers order, float32) from a patcher made by attach_heads."""
    heads, norm = m.attachments[STATE_KEY + "_modules"]
    _, _, swap = _layout(m.model)
    w = norm.linear.weight.detach().to(torch.float32)
    b = norm.linear.bias.detach().to(torch.float32) if norm.linear.bias is not None else None
    if swap:
        w = torch.cat(w.chunk(2, 0)[::-1], 0)
        b = torch.cat(b.chunk(2, 0)[::-1], 0) if b is not None else None
    out = {"norm_out.linear.weight": w.clone()}
    if b is not None:
        out["norm_out.linear.bias"] = b.clone()
    out.update(heads.state_dict_adapter())
    return out


def arcflow_sampling(model_config, state: ArcFlowState, shift: float):
    """Flow sampling with a fixed shift (σ = sτ/(1+(s−1)τ), model fed σ) that decodes the policy."""
    import comfy.model_sampling as ms

    class ArcFlowSampling(ms.ModelSamplingDiscreteFlow, ms.CONST):
        def calculate_denoised(self, sigma, model_output, model_input):
            if state.teacher_mode:
                return super().calculate_denoised(sigma, model_output, model_input)
            s = sigma.reshape(-1)
            if float(s.max() - s.min()) > 1e-6:
                raise GlanceError("ArcFlow evaluates one sigma per model call; this call mixes several.")
            sa = float(s[0])
            means, logw, logg = state.policy(model_input)
            state.evaluations += 1
            if state.sigma_next is None or state.sigma_next >= sa:
                u = arcflow.velocity(means, logw, logg, 0.0)  # no step known: the instantaneous velocity
                state.last_displacement = None
            else:
                d = arcflow.displacement(means, logw, logg, sa, state.sigma_next)
                state.last_displacement = d
                u = d / (sa - state.sigma_next)
            return model_input - u.to(model_input.dtype) * sa

    sampling = ArcFlowSampling(model_config)
    sampling.set_parameters(shift=shift, multiplier=1.0)
    return sampling


def _next_sigma_wrapper(state: ArcFlowState):
    def wrapper(executor, x, t, *args, **kwargs):
        opts = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        state.sigma_next = next_sigma(opts.get("sample_sigmas"), float(t.reshape(-1)[0]))
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            state.sigma_next = None

    return wrapper


def next_sigma(sample_sigmas, sigma: float) -> float | None:
    """The sigma after ``sigma`` in the run's schedule (None when ``sigma`` is not on it)."""
    if sample_sigmas is None:
        return None
    values = [float(v) for v in sample_sigmas]
    for i, v in enumerate(values[:-1]):
        if abs(v - sigma) <= 1e-6 * max(1.0, abs(v)):
            return values[i + 1]
    return None


def state_of(model_patcher) -> ArcFlowState | None:
    return model_patcher.attachments.get(STATE_KEY) if model_patcher is not None else None
