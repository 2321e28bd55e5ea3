"""The autograd Function for y = x @ dequant(W)^T + b with an int8 weight, running each product on the
path kernels/dispatch.py chose for this machine (CUDA tensors: the Triton kernels).

LLM.int8 outlier decomposition (arXiv 2208.07339), for the paths that quantize activations (int_mm,
triton, reference): input features where any |x| exceeds the threshold (6.0 in the paper) are zeroed
before quantizing and multiplied in float against the matching dequantized weight columns instead. On
SmolLM2 it brings the int8 perplexity from +3.2% to +1.6% of fp32 (tests/benchmarks/test_int8_accuracy.py).
The weight-only paths (gemv, weight_only, dequant) keep activations in float and need no split.
"""
from __future__ import annotations

import sys

import torch

from . import cpu, dispatch, reference

OUTLIER_THRESHOLD = 6.0
_noted: set[str] = set()


def _triton():
    from . import triton_int8  # imported lazily: only CUDA runs and interpreter tests need it

    return triton_int8


def _activation_quantized(x2, qw, sw, threshold, quantize, matmul) -> torch.Tensor:
    if threshold > 0:  # column max and min: no |x| tensor made (6x faster than (|x| > t).any(0) on CPU)
        outliers = ((x2.amax(0) > threshold) | (x2.amin(0) < -threshold)).nonzero().squeeze(1)
    else:
        outliers = x2.new_empty(0, dtype=torch.long)
    if outliers.numel():
        x_out = x2[:, outliers].float()  # (M, n_outliers), kept in float
        x2 = x2.index_fill(1, outliers, 0)
    qx, sx = quantize(x2)
    y = matmul(qx, sx, qw, sw)  # (M, N) fp32
    if outliers.numel():
        y.addmm_(x_out, (qw[:, outliers].float() * sw[:, None]).t())
    return y


def forward_product(x2: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, path: str,
                    threshold: float = OUTLIER_THRESHOLD) -> torch.Tensor:
    """x2 (M, K) @ dequant(qw, sw)^T -> (M, N) fp32 on the named path."""
    if path == "weight_only" and not cpu.weight_only_applies(qw.shape[1]):
        if "weight_only" not in _noted:
            _noted.add("weight_only")
            print(f"lora-core: int8 path weight_only needs in_features divisible by {cpu.WEIGHT_ONLY_K}; layers "
                  f"with {qw.shape[1]} use dequant", file=sys.stderr)
        path = "dequant"
    if path == "int_mm":
        return _activation_quantized(x2, qw, sw, threshold, cpu.quantize_rowwise, cpu.int8_matmul)
    if path == "weight_only":
        return cpu.weight_only_matmul(x2, qw, sw)
    if path == "dequant":
        return cpu.dequant_matmul(x2, qw, sw)
    if path == "gemv":
        return cpu.gemv_matmul(x2, qw, sw)
    if path == "triton":
        t = _triton()
        return _activation_quantized(x2, qw, sw, threshold, t.quantize_rowwise, t.int8_matmul)
    if path == "reference":
        return _activation_quantized(x2, qw, sw, threshold, reference.quantize_rowwise, reference.int8_matmul)
    raise ValueError(f"unknown int8 forward path {path!r}")


def backward_product(g2: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, path: str,
                     out_dtype=torch.float32) -> torch.Tensor:
    """g2 (M, N) @ dequant(qw, sw) -> (M, K) on the named path."""
    if path == "dequant":
        return cpu.grad_input(g2, qw, sw, out_dtype)
    if path == "int_mm":
        return cpu.grad_input_int8(g2, qw, sw, out_dtype)
    if path == "triton":
        return _triton().grad_input(g2, qw, sw, out_dtype)
    if path == "reference":
        return reference.grad_input(g2, qw, sw).to(out_dtype)
    raise ValueError(f"unknown int8 backward path {path!r}")


def _forward(x, qweight, scale, bias, threshold) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    path = "triton" if x.is_cuda else dispatch.forward_path(x2.shape[0])
    y = forward_product(x2, qweight, scale, path, threshold)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


class Int8LinearFunction(torch.autograd.Function):
    """Activations quantized (or not) per the chosen path; the weight gets no gradient, the input does."""

    @staticmethod
    def forward(ctx, x, qweight, scale, bias, threshold):
        ctx.save_for_backward(qweight, scale)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return _forward(x, qweight, scale, bias, threshold)

    @staticmethod
    def backward(ctx, grad_y):
        qweight, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        g2 = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()  # (M, N)
        path = "triton" if grad_y.is_cuda else dispatch.backward_path()
        gx = backward_product(g2, qweight, scale, path, out_dtype=ctx.x_dtype)
        return gx.reshape(ctx.x_shape), None, None, None, None


def int8_linear(x, qweight, scale, bias=None, threshold: float = OUTLIER_THRESHOLD):
    """x (..., K) @ dequant(qweight (N, K), scale (N,))^T + bias -> (..., N) in x's dtype.

    Goes through autograd only when x needs a gradient (LoRA training); decoding skips its overhead.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return Int8LinearFunction.apply(x, qweight, scale, bias, threshold)
    return _forward(x, qweight, scale, bias, threshold)
