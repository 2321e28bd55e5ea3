"""SwiGLU's elementwise half, silu(gate) * up, as one autograd Function that keeps only gate and up for
backward (autograd of the plain formula also keeps silu(gate): a third more bytes, and the MLP's
intermediates are over half of what a training step keeps per token). silu is recomputed in backward.

model.py's FeedForward stays the plain formula; fuse_swiglu() swaps SwiGLUFeedForward in for it, with the
same three child modules, so parameter names, LoRA targets and checkpoints do not change.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import FeedForward


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up. d up = gy * silu(gate); d gate = gy * up * silu'(gate), silu' = s * (1 + gate * (1 - s)),
    s = sigmoid(gate) (aten's fused silu_backward)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, gy):
        gate, up = ctx.saved_tensors
        d_gate = d_up = None
        if ctx.needs_input_grad[1]:
            d_up = F.silu(gate).mul_(gy)
        if ctx.needs_input_grad[0]:
            d_gate = torch.ops.aten.silu_backward(gy * up, gate)
        return d_gate, d_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; through SwiGLUFunction when a gradient is wanted."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLUFunction.apply(gate, up)
    return F.silu(gate).mul_(up)


class SwiGLUFeedForward(nn.Module):
    """model.FeedForward's computation with the same gate_proj / up_proj / down_proj modules (plain, int8 or
    LoRA-wrapped), its elementwise part through SwiGLUFunction."""

    def __init__(self, plain: FeedForward):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = plain.gate_proj, plain.up_proj, plain.down_proj

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def fuse_swiglu(model: nn.Module) -> int:
    """Swap SwiGLUFeedForward in for every plain FeedForward of the model; returns how many were swapped
    (0 when already done: it is cheap to call again)."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is FeedForward:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, SwiGLUFeedForward(module))
            swapped += 1
    return swapped
