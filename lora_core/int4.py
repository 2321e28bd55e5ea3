"""Int4 base layers for generation: group-wise asymmetric 4-bit weights run by torch's CPU kernel
(aten._weight_int4pack_mm_for_cpu), quantized while the checkpoint loads.

Layout and formula as gpt-fast's quantize.py (and torchao): each group of `group` consecutive input weights of
a row has a scale s = (max - min) / 15 and a zero z = min + 8 s; q = round((w - min) / s) in 0..15 and
w ~ (q - 8) s + z. The kernel needs out_features % 16 == 0 and in_features % group == 0; layers it cannot take
are kept in int8 (lora_core.quant) with a one-line notice per shape.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from .model import PROJECTIONS
from .quant import Int8Linear

GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP = 32  # llama.cpp's Q4_0 / Q4_1 block: SmolLM2's 576 features divide by 32 and 64, not 128
N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu packs rows in blocks of 16
_noted: set[tuple[int, int]] = set()


def why_not_int4(out_features: int, in_features: int, group: int) -> str | None:
    """None when the kernel takes an (out, in) weight with this group size, else why not."""
    if out_features % N_MULTIPLE:
        return f"out_features {out_features} is not a multiple of {N_MULTIPLE}"
    if in_features % group:
        return f"in_features {in_features} is not a multiple of the group size {group}"
    return None


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> (q int32 (N, K) in 0..15, scale fp32 (N, K/group), zero fp32 (N, K/group))."""
    N, K = w.shape
    g = w.detach().float().reshape(N, K // group, group)  # (N, groups, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_(min=1e-6)
    q = ((g - lo) / scale).round_().clamp_(0, 15).to(torch.int32).reshape(N, K)
    zero = lo + 8 * scale
    return q, scale.squeeze(-1), zero.squeeze(-1)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """The plain-torch reference: (q - 8) * scale + zero per group -> (N, K) fp32."""
    N, K = q.shape
    g = q.reshape(N, K // group, group).float()  # (N, groups, group)
    return ((g - 8) * scale[..., None] + zero[..., None]).reshape(N, K)


class Int4Linear(nn.Module):
    """A frozen Linear with group-wise 4-bit weights (no gradient: a generation base); drop-in for nn.Linear."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, in_features: int, group: int):
        super().__init__()
        self.out_features, self.in_features, self.group = scales_zeros.shape[1], in_features, group
        self.register_buffer("packed", packed)  # the kernel's own packing of q (N, K)
        self.register_buffer("scales_zeros", scales_zeros)  # (K/group, N, 2) fp32: scale, zero

    @classmethod
    def from_float(cls, weight: torch.Tensor, group: int = DEFAULT_GROUP) -> Int4Linear:
        N, K = weight.shape
        why = why_not_int4(N, K, group)
        if why:
            raise ValueError(f"int4 weight ({N} x {K}): {why}; keep this layer in int8")
        q, scale, zero = quantize_int4(weight, group)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)  # inner k tiles: ignored on CPU
        scales_zeros = torch.stack((scale, zero), -1).transpose(0, 1).contiguous()  # (K/group, N, 2)
        return cls(packed, scales_zeros, K, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()  # (M, K)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_zeros)  # (M, N)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """(N, K) fp32 weight the kernel multiplies by (from the packed form's scales and zeros)."""
        eye = torch.eye(self.in_features, dtype=torch.float32, device=self.packed.device)
        return self.forward(eye).t().contiguous()

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group}"


def int4_or_int8(weight: torch.Tensor, group: int = DEFAULT_GROUP) -> nn.Module:
    """Int4Linear where the kernel takes the shape, else Int8Linear and a notice (once per shape) on stderr."""
    N, K = weight.shape
    why = why_not_int4(N, K, group)
    if why is None:
        return Int4Linear.from_float(weight, group)
    if (N, K) not in _noted:
        _noted.add((N, K))
        print(f"lora-core: int4 cannot take {N} x {K} weights ({why}); those layers stay int8", file=sys.stderr)
    return Int8Linear.from_float(weight)


def quantize_int4_on_load(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """loader hook: the seven projection weights of each block become Int4Linear (or int8) as they arrive."""
    module_name, _, attr = name.rpartition(".")
    if attr != "weight" or module_name.rpartition(".")[2] not in PROJECTIONS:
        return False
    parent, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent), child, int4_or_int8(tensor))
    return True


def quantize_model_int4(model: nn.Module) -> nn.Module:
    """Replace the projection Linears of an already loaded float model (a merged adapter) by int4 layers."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in PROJECTIONS:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, int4_or_int8(module.weight))
    return model
