"""The training loss: next-token cross-entropy over target tokens only, through lm_head a chunk at a time
with its gradient taken in the forward pass, so the (tokens, vocab) logits never exist at once."""
from __future__ import annotations

import torch

from .data import IGNORE
from .kernels import dispatch
from .kernels.int8_linear import forward_product

LOSS_CHUNK = 256  # target positions whose logits exist at once (256 x 49152 fp32 = 48 MiB for SmolLM2)


def summed_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over the target tokens of a micro-batch.

    Only target positions go through lm_head (masked prompt tokens add nothing to the loss), a chunk
    at a time, so the (B, T, vocab) logits never exist at once (see LinearCrossEntropy). An int8 base
    has an int8 copy of a frozen lm_head (lora_core.quant.add_int8_output_head): its logits run on the
    int8 path, as the projections' do.
    """
    h = model.hidden(ids)[:, :-1].flatten(0, 1)  # (B*(T-1), dim): position t predicts token t+1
    targets = labels[:, 1:].flatten()
    keep = targets != IGNORE
    weight = model.lm_head.weight
    int8 = getattr(model, "lm_head_int8", None)
    quantized = (int8.qweight, int8.scale) if int8 is not None and not weight.requires_grad else (None, None)
    return LinearCrossEntropy.apply(h[keep], weight, targets[keep], torch.is_grad_enabled(), *quantized)


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(h @ W^T, targets)), with its gradients worked out during the forward pass.

    The loss is a scalar, so d loss / d logits = softmax - onehot is known as soon as a chunk's logits
    are: the chunk's share of dh (and of dW when W is trained) is taken then and the logits dropped.
    Backward only scales the stored gradients; nothing is recomputed and no log_softmax is kept.
    Logits are computed in fp32 whatever W's dtype (bf16 matmuls are slow on CPUs without bf16 units),
    or, given W's int8 copy (qweight (vocab, dim), qscale (vocab,)) for a frozen W, on the int8 path
    lora_core.kernels.dispatch chose for this machine (half the time of fp32 on AVX-512 VNNI). dh stays
    softmax @ W in fp32: quantizing (softmax - onehot) per row zeroes the tail of the distribution (the -1
    sets the scale), which moved SmolLM2's LoRA gradients by 49% where the int8 logits move them 7%.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, with_grads: bool, qweight=None, qscale=None):
        int8 = qweight is not None and not weight.requires_grad
        w = weight.float()
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if with_grads and h.requires_grad else None
        grad_w = torch.zeros_like(w) if with_grads and weight.requires_grad else None
        for s in range(0, len(targets), LOSS_CHUNK):
            hc, tc = h[s:s + LOSS_CHUNK].float(), targets[s:s + LOSS_CHUNK]
            if int8:
                path = "triton" if hc.is_cuda else dispatch.forward_path(len(hc))
                logits = forward_product(hc, qweight, qscale, path)  # (n, vocab) fp32
            else:
                logits = hc @ w.t()  # (n, vocab)
            rows = torch.arange(len(tc), device=h.device)
            picked = logits[rows, tc]
            # log-sum-exp by hand, its exp kept as the softmax numerator (torch.logsumexp reads the logits
            # twice more and throws its exp away)
            peak = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            e = logits.sub_(peak).exp_()  # in place of the logits
            norm = e.sum(dim=-1, keepdim=True)  # (n, 1)
            total += (norm.log() + peak).squeeze(1).sub_(picked).sum()
            if grad_h is None and grad_w is None:
                continue  # evaluation: the loss alone
            g = e.div_(norm)  # softmax
            g[rows, tc] -= 1
            if grad_h is not None:
                grad_h[s:s + LOSS_CHUNK] = g @ w
            if grad_w is not None:
                grad_w.addmm_(g.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else (grad_h * grad_out).to(ctx.h_dtype)
        dw = None if grad_w is None else (grad_w * grad_out).to(ctx.w_dtype)
        return dh, dw, None, None, None, None
