"""One forward-LoRA mechanism: named low-rank adapters on a model's Linear layers, applied by one forward hook.

Like peft's LoRA layer (``lora_A[name]``, ``lora_B[name]``, ``set_adapter``) and ComfyUI's bypass mode, an
adapter is never merged: a hook adds ``s·B(A x)`` to the layer's output, so base weights are never written and
switching adapters is a pointer flip. The phase loader's Slow/Fast experts and the trainer's trainable factors
are adapters of this one mechanism (:class:`LoRALayers`), with one row-offset scheme (:class:`ModuleDelta`: a
block of output rows, e.g. q, k or v of a fused qkv, each piece at its own row offset inside it).

Memory: device copies in the compute dtype are cached per (device, dtype) while ComfyUI holds the whole model
on the device and dropped on eject; while the model is partially or dynamically loaded each layer's copy is
made for its call and dropped, like ComfyUI's own offloaded weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from . import GlanceError, architectures


def is_linear(module: torch.nn.Module) -> bool:
    """A Linear layer, including ComfyUI's mixed-precision/quantized Linear classes that are not ``nn.Linear``."""
    if isinstance(module, torch.nn.Linear):
        return True
    return (
        isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
        and getattr(module, "weight", None) is not None
        and not isinstance(module, torch.nn.modules.conv._ConvNd)
    )


@dataclass
class ModuleDelta:
    """What one adapter adds to the output of one Linear layer: ``x A^T U^T`` (+ dense parts).

    ``parts`` are the low-rank pieces on the layer (e.g. q, k, v of a fused qkv), each
    (first output row relative to ``row_start``, A [r, in], B [rows_i, r], scale) with A and B the
    file's own tensors (or the trainer's factors); the stacked device copy is ``down`` [R, in] and a
    block ``up`` [rows, R] pre-scaled by strength·alpha/rank. ``dense`` [rows, in] and ``bias`` [rows] hold non-low-rank
    deltas in float32 on the CPU. Device copies live in ``_cache`` until ``release``. A ``trainable`` delta's
    factors change every step and carry autograd, so its copies are rebuilt per call and never cached.
    """

    row_start: int
    rows: int
    parts: list = field(default_factory=list)
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    trainable: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    def _build(self, device: torch.device, dtype: torch.dtype) -> tuple:
        down = up = None
        if self.parts:
            down = torch.cat([a.to(device=device, dtype=dtype) for _, a, _, _ in self.parts], dim=0)
            # Each B at its output rows, zeros elsewhere, side by side: [rows, R].
            up = torch.cat(
                [
                    torch.nn.functional.pad(
                        (b.to(device=device, dtype=torch.float32) * scale).to(dtype),
                        (0, 0, row, self.rows - row - b.shape[0]),
                    )
                    for row, _, b, scale in self.parts
                ],
                dim=1,
            )
        dense = None if self.dense is None else self.dense.to(device=device, dtype=dtype)
        bias = None if self.bias is None else self.bias.to(device=device, dtype=dtype)
        return down, up, dense, bias

    def _on(self, device: torch.device, dtype: torch.dtype, keep: bool) -> tuple:
        if not keep or self.trainable:
            return self._build(device, dtype)
        key = (device, dtype)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._build(device, dtype)
        return hit

    def add_to(self, x: torch.Tensor, out: torch.Tensor, keep: bool = True) -> torch.Tensor:
        down, up, dense, bias = self._on(out.device, out.dtype, keep)
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
        out.narrow(-1, self.row_start, self.rows).add_(delta)
        return out

    def release(self) -> None:
        """Drop the device copies (the CPU masters stay)."""
        self._cache.clear()

    def cached_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for hit in self._cache.values() for t in hit if t is not None)

    def device_bytes(self, element_size: int) -> int:
        """Size of one device copy at ``element_size`` bytes per value."""
        n = 0
        if self.parts:
            r = sum(a.shape[0] for _, a, _, _ in self.parts)
            n += r * self.parts[0][1].shape[1] + self.rows * r
        n += sum(t.numel() for t in (self.dense, self.bias) if t is not None)
        return n * element_size

    def nbytes(self) -> int:
        """Host memory this delta holds (the low-rank factors are shared with the file's tensors)."""
        tensors = [t for _, a, b, _ in self.parts for t in (a, b)] + [self.dense, self.bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class LoRALayers:
    """Named adapters (``{adapter: {module name: ModuleDelta}}``) on a model, applied by one forward hook per
    targeted layer; ``active`` names the adapter the hooks add (None: the model unchanged). Installed and removed
    by a ModelPatcher injection (:meth:`inject` / :meth:`eject`), so the shared model is never altered."""

    def __init__(self, adapters: dict[str, dict[str, ModuleDelta]]):
        self.adapters = adapters
        self.active: str | None = None
        self.modules = sorted({m for deltas in adapters.values() for m in deltas})
        self._handles: list = []
        self._model = None
        self._dynamic = False

    def set_adapter(self, name: str | None) -> None:
        self.active = name

    def inject(self, patcher) -> None:
        self.eject(patcher)
        model = patcher.model
        self._model = model
        self._dynamic = bool(getattr(patcher, "is_dynamic", lambda: False)())
        for name in self.modules:
            self._handles.append(model.get_submodule(name).register_forward_hook(self.hook_for(name)))

    def eject(self, patcher=None) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._model = None
        self.release()

    def deltas(self):
        return (d for deltas in self.adapters.values() for d in deltas.values())

    def release(self) -> None:
        """Free every device copy (the masters stay)."""
        for d in self.deltas():
            d.release()

    def cached_bytes(self) -> int:
        return sum(d.cached_bytes() for d in self.deltas())

    def device_bytes(self, element_size: int) -> int:
        """What every adapter's device copies take at ``element_size`` bytes per value."""
        return sum(d.device_bytes(element_size) for d in self.deltas())

    def _keep_on_device(self) -> bool:
        # Cache only while ComfyUI holds the whole model on the device; offloaded models copy per call.
        model = self._model
        return not self._dynamic and model is not None and not getattr(model, "model_lowvram", False)

    def hook_for(self, name: str):
        def hook(module, args, out):
            if self.active is None:
                return None
            delta = self.adapters[self.active].get(name)
            if delta is None:
                return None
            keep = self._keep_on_device()
            if not keep and delta._cache:
                delta.release()
            return delta.add_to(args[0], out, keep)

        return hook


def _on_generator(gen: torch.Generator | None, device) -> bool:
    return gen is None or gen.device.type == torch.device(device).type


def random_normal(shape: tuple[int, ...], gen: torch.Generator | None, device) -> torch.Tensor:
    """N(0, 1) values on ``device``: drawn where the generator lives, then moved. A CPU generator gives the same
    values on every device (as ComfyUI's own noise); ``None`` draws on ``device`` with its default generator."""
    if _on_generator(gen, device):
        return torch.randn(shape, generator=gen, device=device)
    return torch.randn(shape, generator=gen, device=gen.device).to(device)


def random_indices(n: int, batch: int, gen: torch.Generator | None, device) -> torch.Tensor:
    """``min(batch, n)`` random indices below ``n`` on ``device`` (where they index); see :func:`random_normal`."""
    if _on_generator(gen, device):
        return torch.randint(n, (min(batch, n),), generator=gen, device=device)
    return torch.randint(n, (min(batch, n),), generator=gen, device=gen.device).to(device)


@dataclass
class _Target:
    name: str  # diffusers name, e.g. transformer_blocks.0.attn.to_q
    module: str  # ComfyUI module, e.g. diffusion_model.double_blocks.0.img_attn.qkv
    row: int
    rows: int
    A: torch.Tensor
    B: torch.Tensor


class TrainableLoRA:
    """Trainable fp32 LoRA factors on the model's target layers: one adapter of :class:`LoRALayers`.

    Initialisation as PEFT's ``gaussian``: A ~ N(0, 1/rank), B = 0 (the model starts unchanged). The factors
    are drawn on the CPU generator (same seed → same LoRA on any device) and live on the model's load device,
    where ComfyUI runs the layers.
    """

    ADAPTER = "trained"

    def __init__(self, model_patcher, targets: str, rank: int, alpha: float, generator: torch.Generator | None):
        import comfy.lora

        arch = architectures.of(model_patcher, "The trainer")
        pattern = arch.targets.get(targets)
        if pattern is None:
            raise GlanceError(f"Unknown target layers {targets!r}; choose one of {sorted(arch.targets)}.")
        key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
        model = model_patcher.model
        device = model_patcher.load_device
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.targets: list[_Target] = []
        skipped: list[str] = []
        for key in sorted(key_map):
            if not key.startswith("transformer.") or not re.fullmatch(pattern, key[len("transformer.") :]):
                continue
            target = key_map[key]
            weight_key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
            module_name = weight_key.rpartition(".")[0]
            module = model.get_submodule(module_name)
            if not is_linear(module):
                skipped.append(f"{module_name} ({type(module).__module__}.{type(module).__qualname__})")
                continue
            row, rows = (offset[1], offset[2]) if offset else (0, module.out_features)
            a = random_normal((rank, module.in_features), generator, device) / rank
            b = torch.zeros(rows, rank, device=device)
            self.targets.append(
                _Target(
                    key[len("transformer.") :], module_name, row, rows, a.requires_grad_(True), b.requires_grad_(True)
                )
            )
        if not self.targets:
            if skipped:
                raise GlanceError(
                    f"The {targets!r} target layers of this model are not Linear layers the trainer can hook "
                    f"(e.g. {skipped[0]}). Load the model with a standard weight_dtype in the diffusion model loader."
                )
            raise GlanceError(f"No layer of this model matches the {targets!r} target preset.")
        self.by_module: dict[str, list[_Target]] = {}
        for t in self.targets:
            self.by_module.setdefault(t.module, []).append(t)
        deltas = {}
        for name, ts in self.by_module.items():
            lo, hi = min(t.row for t in ts), max(t.row + t.rows for t in ts)
            parts = [(t.row - lo, t.A, t.B, self.scale) for t in ts]
            deltas[name] = ModuleDelta(row_start=lo, rows=hi - lo, parts=parts, trainable=True)
        self.layers = LoRALayers({self.ADAPTER: deltas})

    @property
    def enabled(self) -> bool:
        return self.layers.active is not None

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self.layers.set_adapter(self.ADAPTER if on else None)

    def parameters(self) -> list[torch.Tensor]:
        return [p for t in self.targets for p in (t.A, t.B)]

    def inject(self, patcher) -> None:
        self.layers.inject(patcher)

    def eject(self, patcher=None) -> None:
        self.layers.eject(patcher)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """diffusers/PEFT layout with alpha/rank folded into lora_B (strength 1.0 = as trained)."""
        sd = {}
        for t in self.targets:
            # On the CPU, like a LoRA file ComfyUI loads: the outputs are saved and wired to loaders.
            sd[f"transformer.{t.name}.lora_A.weight"] = t.A.detach().to("cpu", torch.float32, copy=True).contiguous()
            sd[f"transformer.{t.name}.lora_B.weight"] = (
                (t.B.detach() * self.scale).to("cpu", torch.float32).contiguous()
            )
        return sd
