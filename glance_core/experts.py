"""Glance LoRA experts, applied at forward time and switched at a sigma boundary.

Mechanism (why): ComfyUI merges LoRAs into the weights. Switching experts by merging would
rewrite every targeted weight at the switch (two clones re-patch the model; hook keyframes
re-merge every key) and, for Qwen-Image, that is most of a 20B model. Instead each expert
stays low-rank and is an adapter of ``lora_layer.LoRALayers``, added to the output of its Linear
layers at forward time, y = W x + s·B(A x), by hooks that a ModelPatcher injection installs
and removes. A wrapper around ``apply_model`` reads the evaluation's sigma and
points the hooks at the Slow or the Fast expert, so the switch is a pointer flip inside ONE
sampling run of any sampler. Base weights are never written: the model is bit-identical after
the run, an interrupt or an exception.

The LoRA file is parsed by ComfyUI itself (``model_lora_keys_unet`` + ``load_lora`` and its
weight adapters), so every key layout ComfyUI loads is loaded here, including fused-qkv row
offsets for FLUX. Plain LoRA pairs stay low-rank; other adapters (LoHa, LoKr, DoRA, diffs)
become a dense weight delta computed by ``comfy.lora.calculate_weight``, up to a size limit.

Memory: the factors stay in the file's own tensors (no copy) on the CPU. Copies in the compute
dtype on the compute device are made at the first evaluation and freed when ComfyUI ejects the
model (unload, eject, partial unload to the CPU); their size is added to the patcher's
``model_size`` so that ComfyUI frees room for them. While the model is partially loaded
(lowvram) or dynamically loaded, nothing is cached: each layer's factors are copied for its
call and dropped, like ComfyUI's own offloaded weights.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field

import torch

from . import GlanceError, architectures, lora_files, schedules
from .lora_layer import LoRALayers, ModuleDelta, is_linear

log = logging.getLogger("comfyui-glance")

INJECTION_KEY = "glance_phase_lora"
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "lora_te1_", "lora_te2_", "te1.", "te2.")


class _RecordingDict(dict):
    """A state dict that remembers which keys ComfyUI's loader read (to count unmatched keys)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.used: set[str] = set()

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.used.add(key)
        return value

    def get(self, key, default=None):
        if key in self:
            self.used.add(key)
        return super().get(key, default)


#: Largest value accepted in a LoRA file: beyond it half-precision compute overflows to inf.
MAX_ABS_VALUE = 65504.0
#: Dense deltas (LoHa, LoKr, DoRA, diffs) are full weight-sized float32 tensors per layer: cap them per expert.
MAX_DENSE_BYTES = 1 << 30


@dataclass
class Expert:
    """One LoRA file turned into per-module output deltas for a specific model."""

    name: str
    strength: float
    deltas: dict[str, ModuleDelta]
    patched_keys: int
    metadata: dict[str, str] = field(default_factory=dict)


def _module_of(model: torch.nn.Module, weight_key: str) -> tuple[str, torch.nn.Module, str]:
    module_name, _, param = weight_key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise GlanceError(f"LoRA key maps to {weight_key}, which this model does not have.") from None
    return module_name, module, param


def parse_lora(model_patcher, lora_sd: dict[str, torch.Tensor], name: str) -> dict:
    """ComfyUI's patch dict for ``lora_sd`` on this model (its own key maps and weight adapters).

    Raises GlanceError naming ``name`` (and the key) for NaN/inf/overflowing values, when keys match
    no layer (a LoRA loaded in part silently changes its effect), and when a patch on a Linear layer
    does not fit it (ComfyUI would log it and leave the weight unchanged).
    """
    import comfy.lora
    import comfy.lora_convert

    lora_files.check_values(lora_sd, f"LoRA {name!r}", MAX_ABS_VALUE, "Re-export or retrain it, or pick another file.")
    base_model = model_patcher.model
    key_map = comfy.lora.model_lora_keys_unet(base_model, {})
    sd = _RecordingDict(comfy.lora_convert.convert_lora(dict(lora_sd)))
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)

    ignored_te = [k for k in sd if k not in sd.used and k.startswith(_TEXT_ENCODER_PREFIXES)]
    unmatched = [k for k in sd if k not in sd.used and k not in ignored_te]
    if not patches:
        raise GlanceError(
            f"LoRA {name!r} matches no layer of this {type(base_model).__name__} model: "
            f"{len(unmatched)} of {len(sd)} keys unmatched (e.g. {unmatched[:3]}). "
            f"Is it a LoRA for another architecture? Pick a LoRA made for this model."
        )
    if unmatched:
        raise GlanceError(
            f"LoRA {name!r}: {len(unmatched)} of {len(sd)} keys match no layer of this {type(base_model).__name__} "
            f"model (e.g. {unmatched[:3]}); loading it partly would silently change its effect. "
            f"Use the LoRA made for this model, or remove those keys from the file."
        )
    if ignored_te:
        log.info(
            "Glance: %s has %d text-encoder keys; this loader patches the diffusion model only.", name, len(ignored_te)
        )
    for key, patch in patches.items():
        weight_key, offset = (key, None) if isinstance(key, str) else (key[0], key[1] if len(key) > 1 else None)
        _, module, param = _module_of(base_model, weight_key)
        if is_linear(module):
            _check_fit(patch, name, weight_key, param, module, offset)
    return patches


def _patch_tensors(patch) -> list[torch.Tensor]:
    """The tensors of one ComfyUI patch (an adapter object or a ("diff"/"set", (tensors…)) tuple)."""
    weights = getattr(patch, "weights", None)
    if weights is None and isinstance(patch, tuple) and len(patch) == 2 and isinstance(patch[1], (tuple, list)):
        weights = patch[1]
    return [t for t in (weights or ()) if isinstance(t, torch.Tensor)]


def _check_fit(patch, name: str, weight_key: str, param: str, module: torch.nn.Module, offset) -> None:
    """Raise a GlanceError when a patch cannot apply to this layer (ComfyUI would log it and skip it)."""
    import comfy.weight_adapter

    rows = offset[2] if offset is not None else module.out_features
    need = (rows, module.in_features) if param == "weight" else (rows,)
    fix = "It was made for another model (or size): pick the LoRA made for this model."
    if isinstance(patch, comfy.weight_adapter.LoRAAdapter):
        up, down, _alpha, mid = patch.weights[:4]
        if up.ndim < 2 or down.ndim < 2:
            raise GlanceError(
                f"LoRA {name!r} does not fit {weight_key}: its factors have shapes {list(up.shape)} and "
                f"{list(down.shape)}; LoRA factors must be matrices. The file is broken or not a LoRA: pick another."
            )
        if mid is None and up.shape[1] != down.shape[0]:
            raise GlanceError(
                f"LoRA {name!r} on {weight_key}: its up factor {list(up.shape)} has rank {up.shape[1]} but its down "
                f"factor {list(down.shape)} has rank {down.shape[0]}; both must have the same rank. The file is "
                f"broken: re-export it, or pick another."
            )
        if param == "weight" and down.ndim == 2 and (up.shape[0] != rows or down.shape[1] != module.in_features):
            raise GlanceError(
                f"LoRA {name!r} does not fit {weight_key}: its factors give a [{up.shape[0]}, {down.shape[1]}] "
                f"delta, the layer needs [{rows}, {module.in_features}]. {fix}"
            )
    elif isinstance(patch, tuple) and patch and patch[0] in ("diff", "set"):
        t = _patch_tensors(patch)
        if t and tuple(t[0].shape) != need:
            raise GlanceError(
                f"LoRA {name!r} does not fit {weight_key}: its {patch[0]} tensor is {list(t[0].shape)}, the layer "
                f"needs {list(need)}. {fix}"
            )


def build_expert(
    model_patcher, lora_sd: dict[str, torch.Tensor], strength: float, name: str, metadata: dict[str, str] | None = None
) -> Expert:
    """Parse ``lora_sd`` with ComfyUI's key maps for ``model_patcher``'s model into forward-time deltas.

    Raises GlanceError naming ``name`` (and the key) for non-finite values, keys that match no
    layer, patches that do not fit their layer or target something that is not a Linear layer,
    and dense adapters past ``MAX_DENSE_BYTES``. Everything is checked before any delta is computed.
    """
    import comfy.lora

    if not math.isfinite(strength):
        raise GlanceError(f"LoRA {name!r}: strength must be a finite number (got {strength}).")
    base_model = model_patcher.model
    patches = parse_lora(model_patcher, lora_sd, name)

    # Group patches by Linear module: low-rank pieces and dense pieces (parse_lora checked every fit).
    grouped: dict[str, list[tuple]] = {}
    dense_bytes: dict[str, int] = {}
    for key, patch in patches.items():
        weight_key, offset, function = (key, None, None) if isinstance(key, str) else (tuple(key) + (None, None))[:3]
        module_name, module, param = _module_of(base_model, weight_key)
        if not is_linear(module):
            raise GlanceError(
                f"LoRA {name!r} patches {weight_key} ({type(module).__name__}); the phase-aware loader applies LoRAs "
                f"to Linear layers only. Use LoraLoaderModelOnly for this file."
            )
        lowrank = _as_lowrank(patch, offset, function, param)
        if lowrank is None:
            dense_bytes[module_name] = module.out_features * (module.in_features + 1) * 4
        grouped.setdefault(module_name, []).append((param, weight_key, offset, function, patch, lowrank))
    total_dense = sum(dense_bytes.values())
    if total_dense > MAX_DENSE_BYTES:
        raise GlanceError(
            f"LoRA {name!r}: {len(dense_bytes)} layers use adapters that are not plain low-rank pairs (LoHa, LoKr, "
            f"DoRA, full diffs); kept as dense weight deltas they would take {total_dense / 2**20:.1f} MiB, more "
            f"than the {MAX_DENSE_BYTES / 2**20:.0f} MiB this loader allows per expert. Load this file with "
            f"LoraLoaderModelOnly (ComfyUI merges it into the weights), or convert it to a plain LoRA."
        )

    deltas: dict[str, ModuleDelta] = {}
    for module_name, items in grouped.items():
        module = base_model.get_submodule(module_name)
        out_features = module.out_features
        low: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []  # (row offset, down, up, scale)
        dense = torch.zeros(0, device="cpu")  # staged on the CPU, like the patched weights below
        bias = torch.zeros(0, device="cpu")
        for param, weight_key, offset, function, patch, lowrank in items:
            if lowrank is not None:
                row, down, up, scale = lowrank
                low.append((row, down, up, scale * strength))
                continue
            base = getattr(module, param)
            if param == "weight" and hasattr(module, "convert_weight"):
                base = module.convert_weight(base)  # quantized checkpoints: the dequantized weight
            base = base.detach().to("cpu", torch.float32)
            patched = comfy.lora.calculate_weight([(strength, patch, 1.0, offset, function)], base.clone(), weight_key)
            diff = patched.to(torch.float32) - base
            if not bool(diff.any()) and any(bool(t.any()) for t in _patch_tensors(patch)):
                # ComfyUI logs a patch it cannot apply and returns the weight unchanged.
                raise GlanceError(
                    f"LoRA {name!r} does not fit {weight_key} (layer {list(base.shape)}): ComfyUI could not apply its "
                    f"{type(patch).__name__ if not isinstance(patch, tuple) else patch[0]} patch (see its log for the "
                    f"shapes). It was made for another model (or size): pick the LoRA made for this model."
                )
            if not bool(torch.isfinite(diff).all()):
                raise GlanceError(
                    f"LoRA {name!r}: the delta it gives {weight_key} is not finite (overflow at strength {strength}). "
                    f"Lower the strength or pick another file."
                )
            if param == "weight":
                dense = diff if dense.numel() == 0 else dense + diff
            else:
                bias = diff if bias.numel() == 0 else bias + diff
        rows = [(r, u.shape[0]) for r, _, u, _ in low]
        lo = min([r for r, _ in rows], default=0)
        hi = max([r + n for r, n in rows], default=0)
        if dense.numel() or bias.numel():
            lo, hi = 0, out_features
        d = ModuleDelta(row_start=lo, rows=hi - lo)
        d.parts = [(r - lo, dn, up, scale) for r, dn, up, scale in low]
        if dense.numel():
            d.dense = dense
        if bias.numel():
            d.bias = bias
        deltas[module_name] = d
    return Expert(name=name, strength=strength, deltas=deltas, patched_keys=len(patches), metadata=dict(metadata or {}))


def _as_lowrank(patch, offset, function, param: str) -> tuple[int, torch.Tensor, torch.Tensor, float] | None:
    """(first output row, A [r, in], B [rows, r], alpha/r) for a plain LoRA patch, else None."""
    import comfy.weight_adapter

    if param != "weight" or function is not None or not isinstance(patch, comfy.weight_adapter.LoRAAdapter):
        return None
    up, down, alpha, mid, dora_scale, reshape = patch.weights
    if mid is not None or dora_scale is not None or reshape is not None or up.ndim != 2 or down.ndim != 2:
        return None
    row = 0
    if offset is not None:
        dim, row, length = offset
        if dim != 0 or length != up.shape[0]:
            return None
    scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
    if not math.isfinite(scale):
        raise GlanceError(f"LoRA alpha {alpha} gives a non-finite scale; the file is broken: pick another file.")
    return row, down.detach(), up.detach(), scale


#: boundary_sigma value meaning "the connected model's official Glance preset boundary".
AUTO_BOUNDARY = -1.0


def resolve_boundary(model, boundary_sigma: float) -> float:
    """``boundary_sigma``, or for AUTO the official preset boundary of the connected model's architecture."""
    if not isinstance(boundary_sigma, (int, float)) or not math.isfinite(boundary_sigma):
        raise GlanceError(
            f"boundary_sigma must be a finite number (got {boundary_sigma!r}); wire it from the scheduler."
        )
    if boundary_sigma == AUTO_BOUNDARY:
        arch = architectures.find(model)
        if arch is not None:
            return schedules.preset(arch.preset).boundary
        raise GlanceError(
            f"boundary_sigma -1 (auto) knows the official boundary of FLUX.1 and Qwen-Image only, not of this "
            f"{type(model.model).__name__} model: wire boundary_sigma from Glance Slow/Fast Scheduler, or type it."
        )
    if boundary_sigma < 0:
        raise GlanceError(
            f"boundary_sigma must be a finite number >= 0, or -1 for auto (got {boundary_sigma}); wire it from "
            f"Glance Slow/Fast Scheduler."
        )
    return boundary_sigma


def expert_for(sigma: float, boundary: float) -> str:
    """The Glance rule: "slow" at sigma >= boundary, "fast" below (the loader, the trainer and presets agree)."""
    return "slow" if sigma >= boundary else "fast"


class PhaseLoRA:
    """Two experts on one model as two adapters of :class:`LoRALayers`, chosen per model evaluation by its
    sigma with :func:`expert_for`. Either expert may be None (no change)."""

    def __init__(self, slow: Expert | None, fast: Expert | None, boundary: float):
        if not math.isfinite(boundary) or boundary < 0:
            raise GlanceError(f"boundary_sigma must be a finite number >= 0 (got {boundary}).")
        self.slow, self.fast, self.boundary = slow, fast, float(boundary)
        self.counts = {"slow": 0, "fast": 0}
        self.layers = LoRALayers({n: e.deltas for n, e in (("slow", slow), ("fast", fast)) if e is not None})
        self.modules = self.layers.modules

    @property
    def active(self) -> Expert | None:
        return {"slow": self.slow, "fast": self.fast}.get(self.layers.active)

    # --- ModelPatcher injection: the adapters' forward hooks on the targeted Linear layers ----
    def inject(self, patcher) -> None:
        self.layers.inject(patcher)

    def eject(self, patcher=None) -> None:
        self.layers.eject(patcher)

    def release(self) -> None:
        """Free every device copy of both experts."""
        self.layers.release()

    def cached_bytes(self) -> int:
        return self.layers.cached_bytes()

    def device_bytes(self, element_size: int) -> int:
        """What both experts' device copies take at ``element_size`` bytes per value."""
        return self.layers.device_bytes(element_size)

    # --- Wrappers ------------------------------------------------------------------------
    def select(self, sigma: torch.Tensor) -> str | None:
        """The adapter for one model evaluation (None: that expert is not loaded)."""
        lo, hi = float(sigma.min()), float(sigma.max())
        phase = expert_for(hi, self.boundary)
        if expert_for(lo, self.boundary) != phase:
            raise GlanceError(
                f"One model call mixes sigmas {lo:.5f}..{hi:.5f} on both sides of boundary_sigma {self.boundary:.5f}; "
                f"the phase-aware loader needs one sigma per model evaluation."
            )
        self.counts[phase] += 1
        return phase if phase in self.layers.adapters else None

    def apply_model_wrapper(self, executor, x, t, *args, **kwargs):
        self.layers.set_adapter(self.select(t))
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            self.layers.set_adapter(None)

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        self.counts = {"slow": 0, "fast": 0}
        try:
            return executor(*args, **kwargs)
        finally:
            self.layers.set_adapter(None)
            log.info(
                "Glance: %d evaluations with the Slow expert, %d with the Fast expert (boundary sigma %.5f).",
                self.counts["slow"],
                self.counts["fast"],
                self.boundary,
            )


def apply_phase_lora(model_patcher, slow: Expert | None, fast: Expert | None, boundary: float):
    """A clone of ``model_patcher`` whose evaluations use Slow above ``boundary`` and Fast below."""
    import comfy.patcher_extension as pe

    phase = PhaseLoRA(slow, fast, boundary)
    # A key per instance, so that two phase-aware loaders on one model stack instead of replacing.
    key = f"{INJECTION_KEY}_{uuid.uuid4().hex[:8]}"
    m = model_patcher.clone()
    if phase.modules:
        m.set_injections(key, [pe.PatcherInjection(inject=phase.inject, eject=phase.eject)])
        # ComfyUI sizes what it frees before loading by model_size(): count the experts' device copies.
        m.size = m.model_size() + phase.device_bytes(compute_element_size(m))
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, key, phase.apply_model_wrapper)
    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, key, phase.outer_sample_wrapper)
    m.set_attachments(key, phase)
    return m


def compute_element_size(model_patcher) -> int:
    """Bytes per value of the dtype the model computes in (its manual-cast dtype for fp8/quantized weights)."""
    model = model_patcher.model
    dtype = getattr(model, "manual_cast_dtype", None) or model.get_dtype()
    if not dtype.is_floating_point or dtype.itemsize < 2:
        dtype = torch.float32
    return torch.empty(0, dtype=dtype, device="cpu").element_size()


def phase_loras(model_patcher) -> list[PhaseLoRA]:
    """The PhaseLoRA objects attached to a patcher (in the order they were applied)."""
    return [v for k, v in model_patcher.attachments.items() if k.startswith(INJECTION_KEY)]
