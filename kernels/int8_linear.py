"""The autograd Function for y = x @ dequant(W)^T + b with an int8 weight, and backend dispatch:
CUDA tensors -> Triton kernels, CPU tensors -> the CPU path; tests can force "triton" (interpreted).

LLM.int8 outlier decomposition (arXiv 2208.07339): input features where any |x| exceeds the threshold
(6.0 in the paper) are zeroed before the activations are quantized and multiplied in float against the
matching dequantized weight columns instead. On SmolLM2 it brings the int8 perplexity from +3.2% to
+1.6% of fp32 (tests/benchmarks/test_int8_accuracy.py measures it).
"""
from __future__ import annotations

import torch

from . import cpu

BACKENDS = ("auto", "cpu", "triton")
OUTLIER_THRESHOLD = 6.0


def ops_for(x: torch.Tensor, backend: str = "auto"):
    if backend not in BACKENDS:
        raise ValueError(f"int8 backend {backend!r} is not one of {BACKENDS}")
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        from . import triton_int8  # imported lazily: only GPU runs and interpreter tests need it

        return triton_int8
    return cpu


def _forward(x, qweight, scale, bias, backend, threshold) -> torch.Tensor:
    ops = ops_for(x, backend)
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if ops is cpu and cpu.weight_only_applies(x2):  # decoding: see kernels/cpu.py
        y = cpu.weight_only_matmul(x2, qweight, scale, bias)
    else:
        outliers = (x2.abs() > threshold).any(0).nonzero().squeeze(1) if threshold > 0 else x2.new_empty(0)
        if outliers.numel():
            x_out = x2[:, outliers].float()  # (M, n_outliers), kept in float
            x2 = x2.index_fill(1, outliers, 0)
        qx, sx = ops.quantize_rowwise(x2)
        y = ops.int8_matmul(qx, sx, qweight, scale, bias, out_dtype=torch.float32)  # (M, N)
        if outliers.numel():
            y.addmm_(x_out, (qweight[:, outliers].float() * scale[:, None]).t())
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


class Int8LinearFunction(torch.autograd.Function):
    """Activations quantized per row on the fly; the weight gets no gradient, the input does."""

    @staticmethod
    def forward(ctx, x, qweight, scale, bias, backend, threshold):
        ctx.save_for_backward(qweight, scale)
        ctx.backend, ctx.x_shape, ctx.x_dtype = backend, x.shape, x.dtype
        return _forward(x, qweight, scale, bias, backend, threshold)

    @staticmethod
    def backward(ctx, grad_y):
        qweight, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        ops = ops_for(grad_y, ctx.backend)
        g2 = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()  # (M, N)
        gx = ops.grad_input(g2, qweight, scale, out_dtype=ctx.x_dtype)
        return gx.reshape(ctx.x_shape), None, None, None, None, None


def int8_linear(x, qweight, scale, bias=None, backend: str = "auto", threshold: float = OUTLIER_THRESHOLD):
    """x (..., K) @ dequant(qweight (N, K), scale (N,))^T + bias -> (..., N) in x's dtype.

    Goes through autograd only when x needs a gradient (LoRA training); decoding skips its overhead.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return Int8LinearFunction.apply(x, qweight, scale, bias, backend, threshold)
    return _forward(x, qweight, scale, bias, backend, threshold)
