"""Plain-torch references for the int8 operations, used by the tests and the benchmarks.

Quantization is symmetric absmax: q = floor(x * 127 / absmax + 0.5) clamped to [-127, 127], and
scale = absmax / 127, one scale per row (per token for activations, per output channel for weights).
"""
from __future__ import annotations

import torch

QMAX = 127.0
EPS = 1e-8  # absmax floor: an all-zero row quantizes to zeros instead of NaN


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (q (M, K) int8, scale (M,) fp32) with x ~= q * scale[:, None]."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1).clamp(min=EPS)  # (M,)
    q = torch.floor(xf * (QMAX / absmax)[:, None] + 0.5).clamp(-QMAX, QMAX).to(torch.int8)
    return q, absmax / QMAX


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def int8_matmul(qa, sa, qw, sw, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """(qa (M, K) int8, sa (M,)) @ (qw (N, K) int8, sw (N,))^T -> (M, N): exact int32 products, then
    scaled by sa[m] * sw[n], plus bias."""
    acc = qa.to(torch.int64) @ qw.to(torch.int64).t()  # exact integer accumulation
    out = acc.double() * sa.double()[:, None] * sw.double()[None, :]
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)


def grad_input(grad_out: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """dL/dx = grad_out (M, N) @ dequant(W) (N, K), in fp32."""
    return grad_out.float() @ dequantize_rowwise(qw, sw)
