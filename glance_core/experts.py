"""Glance LoRA experts, applied at forward time and switched at a sigma boundary.

Mechanism (why): ComfyUI merges LoRAs into the weights. Switching experts by merging would
rewrite every targeted weight at the switch (two clones re-patch the model; hook keyframes
re-merge every key, reference comfyui_api.md §2.3) and, for Qwen-Image, that is most of a 20B
model. Instead each expert stays low-rank and is added to the output of its Linear layers at
forward time, y = W x + s·B(A x), through forward hooks that are installed and removed by a
ModelPatcher injection. A wrapper around ``apply_model`` reads the evaluation's sigma and
points the hooks at the Slow or the Fast expert, so the switch is a pointer flip inside ONE
sampling run of any sampler. Base weights are never written: the model is bit-identical after
the run, an interrupt or an exception.

The LoRA file is parsed by ComfyUI itself (``model_lora_keys_unet`` + ``load_lora`` and its
weight adapters), so every key layout ComfyUI loads is loaded here, including fused-qkv row
offsets for FLUX. Plain LoRA pairs stay low-rank; other adapters (LoHa, LoKr, DoRA, diffs)
become a dense weight delta computed by ``comfy.lora.calculate_weight``.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field

import torch

from . import GlanceError

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


@dataclass
class ModuleDelta:
    """What one expert adds to the output of one Linear layer: ``x A^T U^T`` (+ dense parts).

    ``down`` [R, in] stacks the LoRA-A factors of every patch on the layer (e.g. q, k, v of a
    fused qkv); ``up`` [rows, R] holds the matching B factors, pre-scaled by strength·alpha/rank,
    placed at their output rows relative to ``row_start``; ``dense`` [rows, in] and ``bias``
    [rows] hold non-low-rank deltas. All in float32 on CPU; per-device copies are cached.
    """

    row_start: int
    rows: int
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def _on(self, device: torch.device, dtype: torch.dtype) -> tuple:
        key = (device, dtype)
        hit = self._cache.get(key)
        if hit is None:
            hit = tuple(
                None if t is None else t.to(device=device, dtype=dtype)
                for t in (self.down, self.up, self.dense, self.bias)
            )
            self._cache[key] = hit
        return hit

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        down, up, dense, bias = self._on(out.device, out.dtype)
        x = x.to(out.dtype)
        delta = None
        if down is not None:
            delta = torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
        if dense is not None:
            d = torch.nn.functional.linear(x, dense, bias)
            delta = d if delta is None else delta + d
        elif bias is not None:
            delta = bias if delta is None else delta + bias
        if torch.is_grad_enabled() and out.requires_grad:
            out = out.clone()
        out[..., self.row_start : self.row_start + self.rows] += delta
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up, self.dense, self.bias) if t is not None)


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


def is_flux(model) -> bool:
    import comfy.model_base

    return isinstance(model, comfy.model_base.Flux)


def parse_lora(model_patcher, lora_sd: dict[str, torch.Tensor], name: str) -> dict:
    """ComfyUI's patch dict for ``lora_sd`` on this model (its own key maps and weight adapters).

    Raises GlanceError naming ``name`` and the count when keys match no layer: a LoRA loaded in part
    silently changes its effect.
    """
    import comfy.lora
    import comfy.lora_convert

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
    return patches


def build_expert(
    model_patcher, lora_sd: dict[str, torch.Tensor], strength: float, name: str, metadata: dict[str, str] | None = None
) -> Expert:
    """Parse ``lora_sd`` with ComfyUI's key maps for ``model_patcher``'s model into forward-time deltas.

    Raises GlanceError naming ``name`` when keys match no layer, or when a patch targets
    something that is not a Linear layer.
    """
    import comfy.lora

    base_model = model_patcher.model
    patches = parse_lora(model_patcher, lora_sd, name)

    # Group patches by Linear module: low-rank pieces and dense pieces.
    grouped: dict[str, list[tuple]] = {}
    for key, patch in patches.items():
        weight_key, offset, function = (key, None, None) if isinstance(key, str) else (tuple(key) + (None, None))[:3]
        module_name, module, param = _module_of(base_model, weight_key)
        if not isinstance(module, torch.nn.Linear):
            raise GlanceError(
                f"LoRA {name!r} patches {weight_key} ({type(module).__name__}); the phase-aware loader applies LoRAs "
                f"to Linear layers only. Use LoraLoaderModelOnly for this file."
            )
        grouped.setdefault(module_name, []).append((param, weight_key, offset, function, patch))

    deltas: dict[str, ModuleDelta] = {}
    for module_name, items in grouped.items():
        module = base_model.get_submodule(module_name)
        out_features = module.weight.shape[0]
        low: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (row offset, down, scaled up)
        dense = torch.zeros(0)
        bias = torch.zeros(0)
        for param, weight_key, offset, function, patch in items:
            lowrank = _as_lowrank(patch, offset, function, param)
            if lowrank is not None:
                row, down, up = lowrank
                rows = offset[2] if offset is not None else out_features
                if down.shape[1] != module.in_features or up.shape[0] != rows:
                    raise GlanceError(
                        f"LoRA {name!r} does not fit {weight_key}: its factors give a [{up.shape[0]}, {down.shape[1]}] "
                        f"delta, the layer needs [{rows}, {module.in_features}]. It was made for another model size."
                    )
                low.append((row, down, up * strength))
                continue
            base = getattr(module, param).detach().to("cpu", torch.float32)
            patched = comfy.lora.calculate_weight([(strength, patch, 1.0, offset, function)], base.clone(), weight_key)
            diff = patched.to(torch.float32) - base
            if param == "weight":
                dense = diff if dense.numel() == 0 else dense + diff
            else:
                bias = diff if bias.numel() == 0 else bias + diff
        rows = [(r, u.shape[0]) for r, _, u in low]
        lo = min([r for r, _ in rows], default=0)
        hi = max([r + n for r, n in rows], default=0)
        if dense.numel() or bias.numel():
            lo, hi = 0, out_features
        d = ModuleDelta(row_start=lo, rows=hi - lo)
        if low:
            d.down = torch.cat([dn for _, dn, _ in low], dim=0)
            d.up = torch.zeros(hi - lo, d.down.shape[0])
            col = 0
            for r, dn, up in low:
                d.up[r - lo : r - lo + up.shape[0], col : col + dn.shape[0]] = up
                col += dn.shape[0]
        if dense.numel():
            d.dense = dense
        if bias.numel():
            d.bias = bias
        deltas[module_name] = d
    return Expert(name=name, strength=strength, deltas=deltas, patched_keys=len(patches), metadata=dict(metadata or {}))


def _as_lowrank(patch, offset, function, param: str) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """(first output row, A [r, in], B·alpha/r [rows, r]) for a plain LoRA patch, else None."""
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
    return row, down.detach().to(torch.float32), up.detach().to(torch.float32) * scale


class PhaseLoRA:
    """Two experts on one model, chosen per model evaluation by its sigma.

    sigma >= boundary → Slow, sigma < boundary → Fast. Either expert may be None (no change).
    """

    def __init__(self, slow: Expert | None, fast: Expert | None, boundary: float):
        if not math.isfinite(boundary) or boundary < 0:
            raise GlanceError(f"boundary_sigma must be a finite number >= 0 (got {boundary}).")
        self.slow, self.fast, self.boundary = slow, fast, float(boundary)
        self.active: Expert | None = None
        self.counts = {"slow": 0, "fast": 0}
        self._handles: list = []
        modules = set(slow.deltas if slow else ()) | set(fast.deltas if fast else ())
        self.modules = sorted(modules)

    # --- ModelPatcher injection: forward hooks on the targeted Linear layers ---------------
    def inject(self, patcher) -> None:
        self.eject(patcher)
        model = patcher.model
        for name in self.modules:
            self._handles.append(model.get_submodule(name).register_forward_hook(self._hook_for(name)))

    def eject(self, patcher=None) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook_for(self, name: str):
        def hook(module, args, out):
            expert = self.active
            if expert is None:
                return None
            delta = expert.deltas.get(name)
            if delta is None:
                return None
            return delta.add_to(args[0], out)

        return hook

    # --- Wrappers ------------------------------------------------------------------------
    def select(self, sigma: torch.Tensor) -> Expert | None:
        lo, hi = float(sigma.min()), float(sigma.max())
        if (hi >= self.boundary) != (lo >= self.boundary):
            raise GlanceError(
                f"One model call mixes sigmas {lo:.5f}..{hi:.5f} on both sides of boundary_sigma {self.boundary:.5f}; "
                f"the phase-aware loader needs one sigma per model evaluation."
            )
        phase = "slow" if hi >= self.boundary else "fast"
        self.counts[phase] += 1
        return self.slow if phase == "slow" else self.fast

    def apply_model_wrapper(self, executor, x, t, *args, **kwargs):
        self.active = self.select(t)
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            self.active = None

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        self.counts = {"slow": 0, "fast": 0}
        try:
            return executor(*args, **kwargs)
        finally:
            self.active = None
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
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, key, phase.apply_model_wrapper)
    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, key, phase.outer_sample_wrapper)
    m.set_attachments(key, phase)
    return m


def phase_loras(model_patcher) -> list[PhaseLoRA]:
    """The PhaseLoRA objects attached to a patcher (in the order they were applied)."""
    return [v for k, v in model_patcher.attachments.items() if k.startswith(INJECTION_KEY)]
