"""Making a frozen ComfyUI model trainable without touching it: autograd outside ComfyUI's inference mode, core's
training switch, a checkpoint per transformer block and a short swap of inference-mode weights.

ComfyUI's FLUX blocks add residuals in place, which breaks autograd; each transformer block is therefore run
through a checkpoint (``dit`` block-replace patch) that recomputes it in backward with its inputs cloned and every
saved tensor copied, which is both correct and memory-saving. ComfyUI loads weights under ``torch.inference_mode``;
such tensors cannot be saved for backward, so they are swapped for normal copies only while one step (or one
block's recompute) runs.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable

import torch


def outside_inference_mode(grad: bool | None):
    """Run the function outside ComfyUI's inference mode (node execution runs inside it), with autograd on
    (True), off (False) or as the caller has it (None)."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            mode = contextlib.nullcontext() if grad is None else torch.enable_grad() if grad else torch.no_grad()
            with torch.inference_mode(False), mode:
                return fn(*args, **kwargs)

        return inner

    return deco


@contextlib.contextmanager
def training_mode():
    """ComfyUI's own "a trainer is running" switch, set for the duration and restored on exit, error and Stop.

    Releases that have ``comfy.model_management.in_training`` (core's trainer sets it) route attention, RoPE
    and quantized matmuls through autograd-capable code only while it is True; older releases lack the flag
    and need nothing. The previous value is restored, so nesting and a concurrent reader see the truth."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    previous = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = previous


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


class _BlockCheckpoint(torch.autograd.Function):
    """Run a transformer block without keeping its activations; recompute it in backward.

    Inputs are cloned before the block runs (it adds residuals into them in place) and, during the
    recompute, every tensor autograd saves is copied, so later in-place writes cannot corrupt it.
    """

    @staticmethod
    def forward(ctx, run, block, names, n_inputs, *tensors):
        inputs = tensors[:n_inputs]
        ctx.run, ctx.block, ctx.names, ctx.n_inputs = run, block, names, n_inputs
        ctx.save_for_backward(*inputs)
        ctx.params = tensors[n_inputs:]
        with torch.no_grad():
            out = run({k: t.clone() for k, t in zip(names, inputs)})
        ctx.out_keys = list(out)
        return tuple(out[k] for k in ctx.out_keys)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with normal_weights(ctx.block.modules() if ctx.block is not None else []):
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_copy, _same):
                out = ctx.run({k: t.clone() for k, t in zip(ctx.names, inputs)})
            pairs = [(out[k], g) for k, g in zip(ctx.out_keys, grads) if g is not None and out[k].requires_grad]
            wrt = [t for t in inputs if t.requires_grad] + [p for p in ctx.params]
            got = (
                torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                if pairs
                else [None] * len(wrt)
            )
        got = list(got)
        input_grads = [got.pop(0) if t.requires_grad else None for t in inputs]
        return (None, None, None, None, *input_grads, *got)


def _frozen(fn: Callable) -> Callable:
    """``fn`` with its closure captured now. ComfyUI's ``block_wrap`` closes over the loop variable
    ``block``; the recompute in backward runs after the loop has moved on to other blocks."""
    if not getattr(fn, "__closure__", None):
        return fn
    cells = []
    for c in fn.__closure__:
        try:
            cells.append(types.CellType(c.cell_contents))
        except ValueError:  # an empty cell
            cells.append(c)
    return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))


def _checkpoint_patch(params: list[torch.Tensor], block: torch.nn.Module | None = None) -> Callable:
    """A ``dit`` block-replace patch that runs the original block through :class:`_BlockCheckpoint`; ``block``
    is the module whose weights are swapped for normal tensors while it is recomputed with gradients."""

    def patch(args: dict, extra: dict) -> dict:
        names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
        others = {k: v for k, v in args.items() if k not in names}
        original = _frozen(extra["original_block"])
        keys: list[str] = []

        def run(tensors: dict) -> dict:
            out = original({**others, **tensors})
            keys[:] = list(out)
            return out

        outs = _BlockCheckpoint.apply(run, block, names, len(names), *[args[k] for k in names], *params)
        return dict(zip(keys, outs))

    return patch


_BLOCK_LISTS = ("double_blocks", "single_blocks", "transformer_blocks")


def _outside_blocks(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of the diffusion model that are not inside a transformer block (embedders, final layer)."""
    inside = {id(m) for attr in _BLOCK_LISTS for m in getattr(diffusion_model, attr, torch.nn.ModuleList()).modules()}
    return [m for m in diffusion_model.modules() if id(m) not in inside]


@contextlib.contextmanager
def normal_weights(modules):
    """Tensors made under ``torch.inference_mode`` (ComfyUI loads models in it) cannot be saved for backward.
    While the context is open, the parameters and buffers of ``modules`` (each module's own, not its
    children's) that are such tensors are replaced by normal copies with the same values, on the same device;
    the original objects are put back on exit. The swap is short (one step, or one block's recompute), so
    ComfyUI cannot load, move or patch the shared model in between, and every other clone sees it unchanged;
    at most one block's weights are copied at a time."""
    swapped: list[tuple[torch.nn.Module, str, str, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for mod in {id(m): m for m in modules}.values():
                for kind in ("_parameters", "_buffers"):
                    for name, t in list(getattr(mod, kind).items()):
                        if t is None or not t.is_inference():
                            continue
                        copy = t.detach().clone()
                        getattr(mod, kind)[name] = (
                            torch.nn.Parameter(copy, requires_grad=False) if kind == "_parameters" else copy
                        )
                        swapped.append((mod, kind, name, t))
        yield
    finally:
        for mod, kind, name, original in reversed(swapped):
            getattr(mod, kind)[name] = original


def block_patches(model_patcher, params: list[torch.Tensor]) -> None:
    """Install the block checkpoint on every FLUX double/single or Qwen-Image block of a clone."""
    dm = model_patcher.model.diffusion_model
    for attr, kind in (
        ("double_blocks", "double_block"),
        ("single_blocks", "single_block"),
        ("transformer_blocks", "double_block"),
    ):
        for i, block in enumerate(getattr(dm, attr, [])):
            model_patcher.set_model_patch_replace(_checkpoint_patch(params, block), "dit", kind, i)
