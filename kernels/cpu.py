"""The CPU paths for the int8 products; kernels/dispatch.py chooses among them by measurement.

Forward y = x @ dequant(W)^T, W int8 (N, K) with one fp32 scale per output channel:
- int_mm: activations quantized per token, torch._int_mm (oneDNN int8 GEMM on VNNI or AMX units), row x
  column scales after. The only path that quantizes activations (so it also does the LLM.int8 outlier
  split). Without VNNI/AMX torch runs a reference loop: 10-40x slower than fp32 (AMD Zen 3).
- weight_only: torch's _weight_int8pack_mm on bf16 activations with unit kernel scales and our fp32
  channel scales after (the kernel's own scales would be bf16). Needs K % 32 == 0.
- dequant: a block of W rows widened to fp32 at a time, then fp32 GEMM (MKL/oneDNN); the channel scales
  are applied to the output, so no scaled copy of W exists. About fp32 speed for many rows.
- gemv: our C kernel (kernels/int8_gemv.c), int8 weights widened in registers: the few-rows path of
  CPUs without int8 units, where a fp32 GEMV reads four bytes per weight.
Backward grad_out @ dequant(W):
- dequant: W widened a block of rows at a time (fp32 speed).
- int_mm: grad_out * scale quantized per row, then torch._int_mm against W as stored; where int8 units
  exist this is 2-3x fp32 at training sizes, with a relative gradient error near 1% (tests bound it).
"""
from __future__ import annotations

import functools

import torch

from . import native
from .reference import EPS, QMAX  # the one definition of the quantization grid

WEIGHT_ONLY_K = 32  # _weight_int8pack_mm returns garbage unless K is a multiple of this (seen for K=37, 40)
BLOCK_ELEMENTS = 1 << 22  # weights widened to fp32 at once (16 MiB): wide enough for an efficient GEMM


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (q int8, scale fp32 (M,)); same rounding as kernels.reference (our C kernel where it
    builds: one pass for the absmax and one to quantize, where torch takes seven)."""
    if x.dim() == 2 and x.device.type == "cpu" and native.available():
        return native.quantize_rows(x.float(), EPS)
    xf = x.float()
    absmax = torch.maximum(xf.amax(dim=-1, keepdim=True), xf.amin(dim=-1, keepdim=True).neg()).clamp_(min=EPS)
    q = (xf * (QMAX / absmax)).add_(0.5).floor_().clamp_(-QMAX, QMAX).to(torch.int8)
    return q, (absmax / QMAX).squeeze(-1)


def int8_matmul(qa, sa, qw, sw, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """(qa (M, K), sa (M,)) x (qw (N, K), sw (N,)) -> (M, N) in out_dtype, through torch._int_mm."""
    acc = torch._int_mm(qa, qw.t())  # (M, N) int32; the weight as a transposed view of its (N, K) storage
    if native.available():
        out = native.scale_int32(acc, sa, sw)
    else:
        out = acc.float().mul_(sa[:, None]).mul_(sw[None, :])
    if bias is not None:
        out.add_(bias.float())
    return out.to(out_dtype)


def weight_only_applies(K: int) -> bool:
    return K % WEIGHT_ONLY_K == 0


@functools.lru_cache(maxsize=64)
def _unit_scales(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bfloat16)


def weight_only_matmul(x2: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """x2 (M, K) @ dequant(qw, sw)^T -> (M, N) fp32; activations rounded to bf16, not quantized."""
    unit = _unit_scales(qw.shape[0])
    return torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), qw, unit).float().mul_(sw)


def _rows_per_block(K: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(K, 1))


def dequant_matmul(x2: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """x2 (M, K) @ dequant(qw, sw)^T -> (M, N) fp32, W widened to fp32 a block of rows at a time."""
    x2 = x2.float()
    N, K = qw.shape
    rows = _rows_per_block(K)
    if rows >= N:
        return (x2 @ qw.float().t()).mul_(sw)
    out = torch.empty((x2.shape[0], N), dtype=torch.float32)
    for n0 in range(0, N, rows):
        torch.mm(x2, qw[n0:n0 + rows].float().t(), out=out[:, n0:n0 + rows])
    return out.mul_(sw)


def gemv_matmul(x2: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """x2 (M, K) @ dequant(qw, sw)^T -> (M, N) fp32 through our C kernel (kernels/int8_gemv.c)."""
    return native.gemv(x2, qw, sw)


def grad_input(grad_out: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, out_dtype=torch.float32) -> torch.Tensor:
    """grad_out (M, N) @ (qw * sw[:, None]) (N, K) -> (M, K), W widened a block of rows at a time."""
    g = grad_out.float() * sw[None, :]  # fold the per-row weight scale into the gradient's columns
    N, K = qw.shape
    rows = _rows_per_block(K)
    out = g[:, :rows] @ qw[:rows].float()
    for n0 in range(rows, N, rows):
        out.addmm_(g[:, n0:n0 + rows], qw[n0:n0 + rows].float())
    return out.to(out_dtype)


def grad_input_int8(grad_out: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, out_dtype=torch.float32):
    """grad_out (M, N) @ (qw * sw[:, None]) (N, K) -> (M, K) in int8: the rows of grad_out * sw quantized
    (the weight scale sits on the summed dimension, so it is folded in before quantizing), then
    torch._int_mm against W as stored (N, K)."""
    if grad_out.device.type == "cpu" and native.available():
        qg, sg = native.quantize_rows(grad_out.float(), EPS, col_scale=sw)
        return native.scale_int32(torch._int_mm(qg, qw), sg, _ones(qw.shape[1])).to(out_dtype)
    qg, sg = quantize_rowwise(grad_out.float() * sw[None, :])
    return torch._int_mm(qg, qw).float().mul_(sg[:, None]).to(out_dtype)


@functools.lru_cache(maxsize=64)
def _ones(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float32)
