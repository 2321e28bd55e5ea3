"""Int4 base layers for generation: group-wise asymmetric 4-bit weights, quantized while the checkpoint loads,
multiplied by our own kernel (kernels/decode_step.c).

Each group of `group` consecutive input weights of a row has a scale s = (max - min) / 15 and a minimum lo;
q = round((w - lo) / s) in 0..15 and w ~ q s + lo (llama.cpp's Q4_1, with fp32 s and lo). Storage: each 32
weights of a row in 16 bytes, byte j holding weight j in its low nibble and weight 16 + j in its high nibble
(Q4_1's layout), so the kernel widens them with one mask and one shift. Products for few rows (decoding, short
prompts) quantize the activations per 32 (as llama.cpp's Q8 blocks) and run in C with AVX2 or AVX-512 VNNI;
longer inputs, and machines where the C library cannot be built, dequantize a block of rows at a time and run
an fp32 GEMM. Layers whose in_features is not a multiple of the group size stay int8 with a one-line notice.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from .kernels import native
from .kernels.reference import EPS
from .model import PROJECTIONS
from .quant import Int8Linear

GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP = 32  # llama.cpp's Q4_0 / Q4_1 block: SmolLM2's 576 features divide by 32 and 64, not 128
KERNEL_MAX_M = 128  # rows up to which the C kernel runs (measured faster than dequantize + GEMM up to here)
BLOCK_ROWS = 4096  # weight rows dequantized at once for the GEMM path
_noted: set[tuple[int, int]] = set()


def why_not_int4(out_features: int, in_features: int, group: int) -> str | None:
    """None when an (out, in) weight can be stored in int4 groups of this size, else why not."""
    if group % 32 or group not in GROUP_SIZES:
        return f"the group size {group} is not one of {', '.join(map(str, GROUP_SIZES))}"
    if in_features % group:
        return f"in_features {in_features} is not a multiple of the group size {group}"
    return None


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> (q uint8 (N, K) in 0..15, scale fp32 (N, K/group), lo fp32 (N, K/group))."""
    N, K = w.shape
    g = w.detach().float().reshape(N, K // group, group)  # (N, groups, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_(min=1e-6)
    q = ((g - lo) / scale).round_().clamp_(0, 15).to(torch.uint8).reshape(N, K)
    return q, scale.squeeze(-1), lo.squeeze(-1)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group: int) -> torch.Tensor:
    """The plain-torch reference: q * scale + lo per group -> (N, K) fp32."""
    N, K = q.shape
    g = q.reshape(N, K // group, group).float()  # (N, groups, group)
    return (g * scale[..., None] + lo[..., None]).reshape(N, K)


def pack(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) in 0..15 -> (N, K/2) uint8: per 32 weights, weight j in the low nibble of byte j, 16 + j high."""
    N, K = q.shape
    blocks = q.to(torch.uint8).reshape(N, K // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, K // 2)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack: (N, K/2) uint8 -> q (N, K) uint8."""
    N, half = packed.shape
    blocks = packed.reshape(N, half // 16, 1, 16)
    return torch.cat((blocks & 15, blocks >> 4), 2).reshape(N, 2 * half)


class Int4Linear(nn.Module):
    """A frozen Linear with group-wise 4-bit weights (no gradient: a generation base); drop-in for nn.Linear."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group: int):
        super().__init__()
        self.out_features, self.in_features, self.group = packed.shape[0], 2 * packed.shape[1], group
        self.register_buffer("packed", packed)  # (N, K/2) uint8, see pack()
        self.register_buffer("scale", scale)  # (N, K/group) fp32
        self.register_buffer("lo", lo)  # (N, K/group) fp32

    @classmethod
    def from_float(cls, weight: torch.Tensor, group: int = DEFAULT_GROUP) -> Int4Linear:
        N, K = weight.shape
        why = why_not_int4(N, K, group)
        if why:
            raise ValueError(f"int4 weight ({N} x {K}): {why}; keep this layer in int8")
        q, scale, lo = quantize_int4(weight, group)
        return cls(pack(q), scale.contiguous(), lo.contiguous(), group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()  # (M, K)
        lib = native.decode_library()[0]
        if lib is not None and x2.shape[0] <= KERNEL_MAX_M and x2.device.type == "cpu" and self.kernel_ready():
            y = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32)
            if lib.int4_product(x2.data_ptr(), x2.shape[0], self.in_features, self.packed.data_ptr(),
                                self.scale.data_ptr(), self.lo.data_ptr(), self.out_features, self.group,
                                y.data_ptr(), EPS, native.dot_isa()):
                raise MemoryError(f"the int4 kernel could not allocate {x2.shape[0]} x {self.in_features} "
                                  "quantized activations")
        else:
            y = torch.cat([x2 @ self.dequantize(rows).t() for rows in self.row_blocks()], -1)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def kernel_ready(self) -> bool:
        """Are the buffers as the C kernel reads them (after a .to(dtype), scale and lo may not be)?"""
        return (self.packed.dtype == torch.uint8 and self.scale.dtype == self.lo.dtype == torch.float32
                and all(t.is_contiguous() and t.device.type == "cpu" for t in (self.packed, self.scale, self.lo)))

    def row_blocks(self) -> list[slice]:
        return [slice(n, n + BLOCK_ROWS) for n in range(0, self.out_features, BLOCK_ROWS)]

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        """(N, K) fp32 weight (or those rows), in plain torch ops (also what a compiled decode step traces)."""
        return dequantize_int4(unpack(self.packed[rows]), self.scale[rows].float(), self.lo[rows].float(), self.group)

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


def quantize_model_int4(model: nn.Module, group: int = DEFAULT_GROUP) -> nn.Module:
    """Replace the projection Linears of an already loaded float model (a merged adapter) by int4 layers."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in PROJECTIONS:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, int4_or_int8(module.weight, group))
    return model
