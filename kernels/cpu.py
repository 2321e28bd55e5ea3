"""The fast CPU path for the int8 operations (what users on this hardware actually run).

Forward, M >= SMALL_M rows (training, prefill): activations quantized row-wise with a handful of
in-place torch ops, then torch._int_mm (oneDNN int8 GEMM: AVX-512 VNNI on this machine, AMX where the
CPU exposes it) with the weight as a transposed view of its (N, K) storage, then the row x column scales.
Forward, M < SMALL_M (decoding): the per-op overhead of quantizing one row costs more than the product,
so the activations stay bf16 and torch's weight-only int8 kernel (_weight_int8pack_mm) is used with unit
scales, the fp32 channel scales applied after. The crossover (about 8 rows) was measured on SmolLM2 and
LLaMA-7B shapes. Backward: grad_out @ dequant(W), dequantizing W a block of rows at a time so no float
copy of the whole weight exists.
Measured against the alternatives in tests/benchmarks/test_int8_kernels.py.
"""
from __future__ import annotations

import functools

import torch

from .reference import EPS, QMAX  # the one definition of the quantization grid
SMALL_M = 8  # below this many rows the weight-only kernel is faster (tests/benchmarks/test_int8_kernels.py)
WEIGHT_ONLY_K = 32  # _weight_int8pack_mm returns garbage unless K is a multiple of this (seen for K=37, 40)
BACKWARD_ROWS = 1024  # rows of W dequantized at once in the backward pass (1024 x 4096 fp32 = 16 MiB)


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (q int8, scale fp32 (M,)); same rounding as kernels.reference."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=EPS)  # (M, 1)
    q = (xf * (QMAX / absmax)).add_(0.5).floor_().clamp_(-QMAX, QMAX).to(torch.int8)
    return q, (absmax / QMAX).squeeze(-1)


def int8_matmul(qa, sa, qw, sw, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """(qa (M, K), sa (M,)) x (qw (N, K), sw (N,)) -> (M, N) in out_dtype."""
    acc = torch._int_mm(qa, qw.t())  # (M, N) int32
    out = acc.float().mul_(sa[:, None]).mul_(sw[None, :])
    if bias is not None:
        out.add_(bias.float())
    return out.to(out_dtype)


def weight_only_applies(x2: torch.Tensor) -> bool:
    return x2.shape[0] < SMALL_M and x2.shape[1] % WEIGHT_ONLY_K == 0


@functools.lru_cache(maxsize=64)
def _unit_scales(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bfloat16)


def weight_only_matmul(x2: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, bias=None) -> torch.Tensor:
    """x2 (M, K) float @ dequant(qw, sw)^T -> (M, N) fp32, activations rounded to bf16, not quantized.
    The kernel's own scales would be bf16; unit scales there and the fp32 ones after keep them exact."""
    unit = _unit_scales(qw.shape[0])
    out = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), qw, unit).float().mul_(sw)
    return out.add_(bias.float()) if bias is not None else out


def grad_input(grad_out: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, out_dtype=torch.float32) -> torch.Tensor:
    """grad_out (M, N) @ (qw * sw[:, None]) (N, K) -> (M, K), W dequantized BACKWARD_ROWS rows at a time."""
    g = grad_out.float() * sw[None, :]  # fold the per-row weight scale into the gradient's columns
    N = qw.shape[0]
    out = g[:, :BACKWARD_ROWS] @ qw[:BACKWARD_ROWS].float()
    for n0 in range(BACKWARD_ROWS, N, BACKWARD_ROWS):
        out.addmm_(g[:, n0:n0 + BACKWARD_ROWS], qw[n0:n0 + BACKWARD_ROWS].float())
    return out.to(out_dtype)
