"""The fast CPU path for the int8 operations (what users on this hardware actually run).

Forward: activations quantized row-wise with a handful of in-place torch ops, then
torch._int_mm (oneDNN; AMX int8 on Sapphire Rapids) with the weight as a transposed view of its
(N, K) storage, then the row x column scales. Backward: grad_out @ dequant(W), dequantizing W a
block of rows at a time so no float copy of the whole weight exists.
Measured against the alternatives in tests/benchmarks/test_int8_kernels.py.
"""
from __future__ import annotations

import torch

QMAX = 127.0
EPS = 1e-8
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


def grad_input(grad_out: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, out_dtype=torch.float32) -> torch.Tensor:
    """grad_out (M, N) @ (qw * sw[:, None]) (N, K) -> (M, K), W dequantized BACKWARD_ROWS rows at a time."""
    g = grad_out.float() * sw[None, :]  # fold the per-row weight scale into the gradient's columns
    N = qw.shape[0]
    out = g[:, :BACKWARD_ROWS] @ qw[:BACKWARD_ROWS].float()
    for n0 in range(BACKWARD_ROWS, N, BACKWARD_ROWS):
        out.addmm_(g[:, n0:n0 + BACKWARD_ROWS], qw[n0:n0 + BACKWARD_ROWS].float())
    return out.to(out_dtype)
