"""ArcFlow heads on a ComfyUI model, attached with ModelPatcher object patches (the base stays untouched).

The released adapters replace the model's output projection with three heads on the final AdaLN-modulated
hidden state: ``proj_out_means`` (K·p²·C), ``proj_out_logweights`` (K·p²) and ``proj_out_loggamma``
((K−1)·p²), plus a new ``norm_out.linear``, plus PEFT LoRA keys.

How the patched model yields the step:
- the output projection (FLUX ``final_layer.linear``, Qwen-Image ``proj_out``) is replaced by
  :class:`PolicyHeads`, which integrates the policy of each token in closed form and returns, in the base
  projection's layout, the policy's mean velocity ū = D/Δ from this call's σ to the next sigma of the run
  (an APPLY_MODEL wrapper reads both from the call and ``sample_sigmas``), or the instantaneous velocity
  u(σ) when the call is not on the run's schedule. The model's own unpatchify then pads/crops odd sizes,
  and ComfyUI mixes several conditionings, areas and masks as for any model;
- any flow (CONST) ``model_sampling`` turns that velocity into x̂0 = x − σ·ū, so a plain Euler step from σ
  lands exactly where the closed form does: KSampler/euler and ArcFlow Sampler give the same step, and a
  ``ModelSampling*`` node placed after the loader only changes the shift of the schedule. The loader's own
  ``model_sampling`` patch is a stock flow sampling with the adapter's fixed shift (3.2).
- the heads and the new norm are ComfyUI cast-capable layers (``comfy.ops.manual_cast``): under partial
  loading ComfyUI moves or casts their weights per call, like the base model's own layers.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import torch

from . import GlanceError, arcflow, architectures, lora_files

HEADS = ("proj_out_means", "proj_out_logweights", "proj_out_loggamma")
STATE_KEY = "glance_arcflow"
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class ArcFlowState:
    """Per-model settings plus the context of the model call in progress (set and cleared by the wrapper)."""

    k: int
    channels: int
    patch: int
    step: float | None = None  # Δ = σ − σ_next of the call in progress (None: off the run's schedule)
    record: bool = False  # distillation: keep the raw policy of the call in ``raw``
    raw: tuple | None = None  # (means, logweights, loggammas) per token, float32, only while ``record``
    evaluations: int = 0
    teacher_mode: bool = False  # distillation: the patched model acts as the frozen base model

    def policy(self, x: torch.Tensor) -> arcflow.ArcFlowPolicy:
        """The recorded policy in latent layout for input ``x`` ([B, C, H, W] or [B, C, T, H, W]); sizes that
        are not a multiple of the patch are padded by the model, so the padding is cropped off here."""
        if self.raw is None:
            raise GlanceError("No ArcFlow policy was recorded: the heads did not run.")
        means, logw, logg = self.raw
        hh, ww = x.shape[-2], x.shape[-1]
        h, w = -(-hh // self.patch), -(-ww // self.patch)
        out = tuple(
            arcflow.unpack_tokens(t, n, c, h, w, self.patch).narrow(-2, 0, hh).narrow(-1, 0, ww)
            for t, n, c in ((means, self.k, self.channels), (logw, self.k, 1), (logg, self.k - 1, 1))
        )
        if x.ndim == 5:  # Qwen-Image latents carry a time axis of length 1
            out = tuple(t.unsqueeze(3) for t in out)
        return arcflow.ArcFlowPolicy(*out)


def _cast_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device=None, trainable: bool = False
) -> torch.nn.Module:
    """A ``comfy.ops.manual_cast.Linear`` holding these tensors: its weights are cast to the input's device and
    dtype per call, so it works wherever ComfyUI's loader leaves it (lowvram offload, fp8 models)."""
    import comfy.ops

    lin = comfy.ops.manual_cast.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = torch.nn.Parameter(weight.detach().to(device=device, dtype=dtype).clone(), requires_grad=trainable)
    lin.bias = (
        None
        if bias is None
        else torch.nn.Parameter(bias.detach().to(device=device, dtype=dtype).clone(), requires_grad=trainable)
    )
    return lin


class PolicyHeads(torch.nn.Module):
    """Replaces the output projection: the three heads, integrated per token (see the module doc)."""

    def __init__(
        self,
        sd: dict[str, torch.Tensor],
        out_features: int,
        state: ArcFlowState,
        dtype: torch.dtype,
        device=None,
        original: torch.nn.Module | None = None,
        trainable: bool = False,
    ):
        super().__init__()
        self.heads = torch.nn.ModuleDict(
            {n: _cast_linear(sd[f"{n}.weight"], sd.get(f"{n}.bias"), dtype, device, trainable) for n in HEADS}
        )
        # The base projection, for teacher mode (distillation): a submodule, so ComfyUI loads it with the rest.
        self.original = original
        self.out_features = out_features
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state.teacher_mode:
            return self.original(x)
        # float32 input: the manual-cast heads then run in float32, as the official pipeline integrates.
        raw = tuple(self.heads[n](x.to(torch.float32)) for n in HEADS)
        if state.record:
            state.raw = raw
        state.evaluations += 1
        return arcflow.token_velocity(*raw, state.k, state.channels, state.patch, state.step)

    def state_dict_adapter(self) -> dict[str, torch.Tensor]:
        return {
            f"{n}.{p}": t.detach().to(torch.float32).clone() for n in HEADS for p, t in self.heads[n].named_parameters()
        }


def _arch(model):
    return architectures.of(model, "ArcFlow")


def split_adapter(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(LoRA part, full-tensor part) as the official loader splits them: by 'lora' in the key."""
    lora = {k: v for k, v in sd.items() if "lora" in k}
    full = {k: v for k, v in sd.items() if "lora" not in k}
    return lora, full


def check_heads(model_patcher, full: dict[str, torch.Tensor], name: str) -> int:
    """Validate the full tensors against the model; returns K. Errors name the tensor and both shapes."""
    refuse_arcflow_model(model_patcher, "ArcFlow Adapter Loader")
    model = model_patcher.model
    arch = _arch(model)
    norm_path, proj_path = arch.norm_path, arch.proj_path
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
    """The adapter's ``norm_out.linear`` (cast-capable); the base model's own in teacher mode (distillation)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        state: ArcFlowState,
        dtype: torch.dtype,
        device=None,
        original: torch.nn.Module | None = None,
        trainable: bool = False,
    ):
        super().__init__()
        self.linear = _cast_linear(weight, bias, dtype, device, trainable)
        self.original = original  # a submodule only when distilling (teacher mode)
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state.teacher_mode:
            return self.original(x)
        return self.linear(x)


def compute_dtype(model) -> torch.dtype:
    """The dtype the model computes in (fp8 / quantized storage computes in its manual-cast dtype)."""
    dtype = getattr(model, "manual_cast_dtype", None) or model.get_dtype()
    return dtype if dtype in FLOATS else torch.float32


#: No trained adapter tensor comes near this (weights and biases are O(1)); beyond it the result is garbage.
IMPLAUSIBLE = 1e6


def apply_arcflow(
    model_patcher, adapter: dict[str, torch.Tensor], name: str, strength: float = 1.0, shift: float = 3.2
):
    """A clone of ``model_patcher`` with the adapter's LoRA merged and its heads attached."""
    from . import experts

    for label, value in (("strength", strength), ("shift", shift)):
        if not math.isfinite(float(value)):
            raise GlanceError(f"ArcFlow Adapter Loader: {label} must be a finite number (got {value}).")
    if not float(shift) > 0:
        raise GlanceError(f"ArcFlow Adapter Loader: shift must be > 0 (got {shift}); the adapters use 3.2.")
    lora, full = split_adapter(adapter)
    k = check_heads(model_patcher, full, name)
    # The LoRA part gets the same check (a LoRA's bound) in parse_lora.
    lora_files.check_values(full, name, IMPLAUSIBLE, "Download the adapter again, or distil a new one.")
    m = model_patcher.clone()
    if lora:
        if _arch(model_patcher).name == "flux":
            lora = {(k_ if k_.startswith("transformer.") else f"transformer.{k_}"): v for k_, v in lora.items()}
        m.add_patches(experts.parse_lora(model_patcher, lora, name), strength)
    attach_heads(m, full, k, shift)
    return m


def attach_heads(m, full: dict[str, torch.Tensor], k: int, shift: float, trainable: bool = False) -> ArcFlowState:
    """Object-patch the heads, the norm and the sampling onto patcher ``m`` (in place); returns the state.

    ``full`` holds ``norm_out.linear.*`` (diffusers order) and the three heads' tensors. For inference the
    weights are kept in the model's compute dtype where they are (ComfyUI moves or casts them on load).
    ``trainable`` (distillation): float32 Parameters on the load device, and the base projection and norm
    kept as submodules for teacher mode.
    """
    import comfy.patcher_extension as pe

    model = m.model
    arch = _arch(model)
    norm_path, proj_path = arch.norm_path, arch.proj_path
    norm = m.get_model_object(norm_path)
    proj = m.get_model_object(proj_path)
    w = arch.to_comfy_norm(full["norm_out.linear.weight"])
    b = arch.to_comfy_norm(full.get("norm_out.linear.bias"))
    cfg = model.model_config.unet_config
    state = ArcFlowState(k=k, channels=cfg.get("out_channels", 16), patch=cfg.get("patch_size", 2))
    if trainable:
        dtype, device, norm_orig, proj_orig = torch.float32, m.load_device, norm, proj
    else:
        dtype, device, norm_orig, proj_orig = compute_dtype(model), None, None, None
    new_norm = SwitchNorm(w, b, state, dtype, device, norm_orig, trainable)
    heads = PolicyHeads(full, proj.out_features, state, dtype, device, proj_orig, trainable)
    m.add_object_patch(norm_path, new_norm)
    m.add_object_patch(proj_path, heads)
    m.add_object_patch("model_sampling", flow_sampling(model.model_config, shift))
    key = f"{STATE_KEY}_{uuid.uuid4().hex[:8]}"
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, key, _call_wrapper(state))
    m.set_attachments(STATE_KEY, state)
    m.set_attachments(STATE_KEY + "_modules", (heads, new_norm))
    return state


def export_heads(m) -> dict[str, torch.Tensor]:
    """The full-tensor part of an adapter (diffusers order, float32) from a patcher made by attach_heads."""
    heads, norm = m.attachments[STATE_KEY + "_modules"]
    arch = _arch(m.model)
    w = arch.to_comfy_norm(norm.linear.weight.detach().to(torch.float32))
    b = arch.to_comfy_norm(norm.linear.bias.detach().to(torch.float32) if norm.linear.bias is not None else None)
    out = {"norm_out.linear.weight": w.clone()}
    if b is not None:
        out["norm_out.linear.bias"] = b.clone()
    out.update(heads.state_dict_adapter())
    return out


def flow_sampling(model_config, shift: float):
    """Stock flow sampling with a fixed shift (σ = sτ/(1+(s−1)τ), the model fed σ), as ModelSamplingAuraFlow."""
    import comfy.model_sampling as ms

    class ArcFlowSampling(ms.ModelSamplingDiscreteFlow, ms.CONST):
        pass

    sampling = ArcFlowSampling(model_config)
    sampling.set_parameters(shift=shift, multiplier=1.0)
    return sampling


def _call_wrapper(state: ArcFlowState):
    """APPLY_MODEL wrapper: tells the heads this call's step, and refuses what would give a silent wrong image."""

    def wrapper(executor, x, t, *args, **kwargs):
        import comfy.model_sampling as ms

        if state.teacher_mode:
            return executor(x, t, *args, **kwargs)
        sampling = getattr(executor.class_obj, "model_sampling", None)
        if not isinstance(sampling, ms.CONST):
            kind = next(
                (c.__name__ for c in type(sampling).__mro__ if c.__module__ == ms.__name__ and c.__name__.isupper()),
                type(sampling).__name__,
            )
            raise GlanceError(
                f"ArcFlow models predict a flow velocity, but a node after the ArcFlow loader set a non-flow "
                f"sampling ({kind} prediction, e.g. ModelSamplingDiscrete): use a flow ModelSampling "
                f"(ModelSamplingAuraFlow / SD3 / Flux) or none after the loader."
            )
        s = t.reshape(-1)
        sigma = float(s[0])
        if float(s.max() - s.min()) > 1e-6:
            raise GlanceError("ArcFlow evaluates one sigma per model call; this call mixes several.")
        opts = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        nxt = next_sigma(opts.get("sample_sigmas"), sigma)
        state.step = sigma - nxt if nxt is not None and nxt < sigma else None
        try:
            out = executor(x, t, *args, **kwargs)
        finally:
            state.step = None
        if not state.record and not bool(torch.isfinite(out).all()):  # distillation checks its own loss
            where = f"the step σ {sigma:.4g} → {nxt:.4g}" if nxt is not None else f"σ {sigma:.4g}"
            raise GlanceError(
                f"ArcFlow: the model's output at {where} is not finite (NaN/inf). Likely cause: the adapter's "
                f"log-γ or means are too large for this model (a corrupt or mismatched adapter, or a diverged "
                f"distillation), or fp16 overflow. Use the adapter made for this model, or load it in bf16/fp32."
            )
        return out

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


def refuse_arcflow_model(model_patcher, node: str) -> None:
    """The heads replace the base projection: a second adapter (or distillation) needs the base model."""
    if state_of(model_patcher) is not None:
        raise GlanceError(
            f"{node}: this model already has ArcFlow heads (from ArcFlow Adapter Loader or Distiller). Connect the "
            f"base model (the loader's input) instead."
        )


def state_of(model_patcher) -> ArcFlowState | None:
    return model_patcher.attachments.get(STATE_KEY) if model_patcher is not None else None
