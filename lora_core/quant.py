"""Int8 base layers: weights stored as int8 with one fp32 scale per output channel (symmetric absmax),
quantized while the checkpoint loads, frozen; each product runs on the path lora_core.kernels.dispatch
measured for this machine."""
from __future__ import annotations

import torch
from torch import nn

from .kernels.cpu import quantize_rowwise
from .kernels.int8_linear import OUTLIER_THRESHOLD, int8_linear
from .kernels.reference import dequantize_rowwise
from .model import PROJECTIONS

QUANT_ROWS = 4096  # rows quantized at once while loading, to bound temporaries


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), fp32 scale (N,)), a block of rows at a time."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    s = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r0 in range(0, w.shape[0], QUANT_ROWS):
        q[r0:r0 + QUANT_ROWS], s[r0:r0 + QUANT_ROWS] = quantize_rowwise(w[r0:r0 + QUANT_ROWS])
    return q, s


class Int8Linear(nn.Module):
    """A frozen Linear with int8 weights; drop-in for nn.Linear (bias-free LLaMA layers)."""

    threshold = OUTLIER_THRESHOLD  # LLM.int8 outlier threshold; 0 quantizes every input feature

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        q, s = quantize_weight(weight.detach())
        return cls(q, s, None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.scale, self.bias, self.threshold)

    def dequantize(self) -> torch.Tensor:
        return dequantize_rowwise(self.qweight, self.scale)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_on_load(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """loader hook: the seven projection weights of each block become Int8Linear as they arrive."""
    module_name, _, attr = name.rpartition(".")
    if attr != "weight" or module_name.rpartition(".")[2] not in PROJECTIONS:
        return False
    parent, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent), child, Int8Linear.from_float(tensor))
    return True


def quantize_model(model: nn.Module) -> nn.Module:
    """Replace the projection Linears of an already loaded float model by Int8Linear."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in PROJECTIONS:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Int8Linear.from_float(module.weight, module.bias))
    return model


def add_int8_output_head(model: nn.Module):
    """An int8 weight-only copy of lm_head for decoding (model.lm_head_int8), made when an int8 base is loaded
    (after its adapter, so a trained lm_head is the one copied). One token per step reads all of lm_head:
    in fp32, SmolLM2's 49152 x 576 matrix is a third of the bytes read per token. Training keeps the float
    lm_head; generation uses this copy where it exists (lora_core.generation.output_head)."""
    model.lm_head_int8 = Int8Linear.from_float(model.lm_head.weight)
