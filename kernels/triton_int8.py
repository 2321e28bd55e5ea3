"""Triton int8 kernels: row-wise activation quantization, int8 matmul with a fused dequantizing
epilogue, and the backward product grad_out @ W that dequantizes W tile by tile.

On a GPU the launchers autotune over the configurations below; under TRITON_INTERPRET=1 (how the
CPU-only tests check these kernels) they use one small fixed configuration instead.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import EPS, QMAX  # the one definition of the quantization grid


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---- (a) row-wise dynamic quantization -------------------------------------------------------
@triton.jit
def _quantize_rowwise_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(x), axis=0), EPS)
    q = tl.floor(x * (QMAX / absmax) + 0.5)
    q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    tl.store(q_ptr + row * stride_q + offs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, absmax / QMAX)


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (q int8 (M, K), scale fp32 (M,))."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rowwise takes a 2-D tensor, got shape {tuple(x.shape)}")
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    _quantize_rowwise_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), BLOCK_K=triton.next_power_of_2(K))
    return q, s


# ---- (b) int8 x int8 -> int32 matmul, dequantized in the epilogue ------------------------------
_MATMUL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                             (64, 64, 128, 4, 3), (32, 64, 64, 4, 4), (16, 128, 128, 4, 3)]
]


@triton.jit
def _int8_matmul_kernel(a_ptr, sa_ptr, w_ptr, sw_ptr, bias_ptr, c_ptr, M, N, K,
                        stride_am, stride_ak, stride_wn, stride_wk, stride_cm, stride_cn,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)  # (BLOCK_K, BLOCK_N): W^T tile
        acc += tl.dot(a, w, out_dtype=tl.int32)
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sw[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c, out.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


_int8_matmul_tuned = triton.autotune(_MATMUL_CONFIGS, key=["M", "N", "K"])(_int8_matmul_kernel)


def int8_matmul(qa, sa, qw, sw, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """(qa (M, K) int8, sa (M,)) x (qw (N, K) int8, sw (N,)) -> (M, N) = sa*sw * (qa @ qw^T) + bias."""
    M, K = qa.shape
    N, K2 = qw.shape
    if K != K2 or qa.dtype != torch.int8 or qw.dtype != torch.int8:
        raise ValueError(f"int8_matmul needs int8 (M, K) and (N, K); got {qa.dtype}{tuple(qa.shape)}, "
                         f"{qw.dtype}{tuple(qw.shape)}")
    c = torch.empty((M, N), dtype=out_dtype, device=qa.device)
    sa, sw = sa.float().contiguous(), sw.float().contiguous()
    bias_arg = bias.contiguous() if bias is not None else sw  # unused pointer when HAS_BIAS is False
    args = (qa, sa, qw, sw, bias_arg, c, M, N, K, qa.stride(0), qa.stride(1), qw.stride(0), qw.stride(1),
            c.stride(0), c.stride(1))
    if interpreting():
        grid = (triton.cdiv(M, 16), triton.cdiv(N, 32))
        _int8_matmul_kernel[grid](*args, HAS_BIAS=bias is not None, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _int8_matmul_tuned[grid](*args, HAS_BIAS=bias is not None)
    return c


# ---- (c) backward: grad_out @ dequant(W), W dequantized one tile at a time ---------------------
_BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bk, bn, w, s in [(128, 128, 32, 8, 3), (64, 128, 32, 4, 4), (128, 64, 64, 4, 3), (32, 64, 64, 4, 4)]
]


@triton.jit
def _grad_input_kernel(g_ptr, w_ptr, sw_ptr, out_ptr, M, N, K, stride_gm, stride_gn, stride_wn, stride_wk,
                       stride_om, stride_ok, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn_ = n0 + rn
        g = tl.load(g_ptr + rm[:, None] * stride_gm + nn_[None, :] * stride_gn,
                    mask=(rm[:, None] < M) & (nn_[None, :] < N), other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_N)
        w = tl.load(w_ptr + nn_[:, None] * stride_wn + rk[None, :] * stride_wk,
                    mask=(nn_[:, None] < N) & (rk[None, :] < K), other=0)  # (BLOCK_N, BLOCK_K) int8
        sw = tl.load(sw_ptr + nn_, mask=nn_ < N, other=0.0)
        acc += tl.dot(g, w.to(tl.float32) * sw[:, None])  # the dequantized tile lives only in registers
    out = out_ptr + rm[:, None] * stride_om + rk[None, :] * stride_ok
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rk[None, :] < K))


_grad_input_tuned = triton.autotune(_BACKWARD_CONFIGS, key=["M", "N", "K"])(_grad_input_kernel)


def grad_input(grad_out: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, out_dtype=torch.float32) -> torch.Tensor:
    """grad_out (M, N) @ (qw (N, K) int8 * sw[:, None]) -> (M, K)."""
    M, N = grad_out.shape
    N2, K = qw.shape
    if N != N2:
        raise ValueError(f"grad_input: grad_out has {N} columns, the weight {N2} rows")
    out = torch.empty((M, K), dtype=out_dtype, device=grad_out.device)
    sw = sw.float().contiguous()
    args = (grad_out, qw, sw, out, M, N, K, grad_out.stride(0), grad_out.stride(1), qw.stride(0), qw.stride(1),
            out.stride(0), out.stride(1))
    if interpreting():
        _grad_input_kernel[(triton.cdiv(M, 16), triton.cdiv(K, 32))](*args, BLOCK_M=16, BLOCK_K=32, BLOCK_N=32)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]))  # noqa: E731
        _grad_input_tuned[grid](*args)
    return out
