"""Our LoRA layers: y = base(x) + (alpha / r) * B(A(dropout(x))), swapped in for the model's Linear layers.

The base layer (dense or int8) stays frozen; A and B are kept in fp32 whatever the base dtype.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .model import PROJECTIONS

# Meta's names for the same layers
META_ALIASES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w3": "up_proj",
                "w2": "down_proj"}


class LoRADropout(nn.Dropout):
    """Dropout on the LoRA input, drawing 16 random bits per element four to a 64-bit word (one RNG call per
    four elements; bernoulli_ makes one per element and took a quarter of a CPU training step). p is
    rounded to a multiple of 1/65536 (0.05 -> 0.050003). Kept elements are scaled by 1 / (1 - p)."""

    def __init__(self, p: float):
        if not 0 <= p < 1:
            raise ValueError(f"LoRA dropout {p} must be in [0, 1)")
        super().__init__(p)
        self.threshold = -32768 + round(p * 65536)  # int16 draws at or above it keep their element

    def mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The elements of x to keep (bool, x's shape), or None when nothing is dropped (eval, p = 0)."""
        if not self.training or self.p == 0:
            return None
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, None)
        return words.view(torch.int16)[:n].view(x.shape) >= self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.mask(x)
        return x if keep is None else x.mul(keep).mul_(1 / (1 - self.p))


class LoRABranch(torch.autograd.Function):
    """scale * dropout(x) @ A^T @ B^T in fp32, keeping for backward the dropout mask (1 byte per element) and
    x itself instead of a float copy of dropout(x): q, k and v (gate and up) read the same x, which autograd
    keeps once, where each LoRA layer used to keep its own dropped copy (7 per block with all targets)."""

    @staticmethod
    def forward(ctx, x, A, B, keep, keep_scale: float, scale: float):
        xd = x.float() if keep is None else x.float().mul(keep).mul_(keep_scale)  # (..., in)
        h = xd @ A.t()  # (..., r)
        ctx.save_for_backward(x, A, B, keep, h)
        ctx.keep_scale, ctx.scale = keep_scale, scale
        return (h @ B.t()).mul_(scale)  # (..., out)

    @staticmethod
    def backward(ctx, gy):
        x, A, B, keep, h = ctx.saved_tensors
        gy2 = gy.float().reshape(-1, gy.shape[-1])  # (M, out)
        gh = (gy2 @ B).mul_(ctx.scale)  # (M, r)
        gA = gB = gx = None
        if ctx.needs_input_grad[2]:
            gB = (gy2.t() @ h.reshape(-1, h.shape[-1])).mul_(ctx.scale)  # (out, r)
        if ctx.needs_input_grad[1]:
            xd = x.float() if keep is None else x.float().mul(keep).mul_(ctx.keep_scale)  # dropout(x) again
            gA = gh.t() @ xd.reshape(-1, x.shape[-1])  # (r, in)
        if ctx.needs_input_grad[0]:
            gx = (gh @ A).reshape(x.shape)
            if keep is not None:
                gx.mul_(keep).mul_(ctx.keep_scale)
            gx = gx.to(x.dtype)
        return gx, gA, gB, None, None, None


def merged_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A in fp32, W (out, in), A (r, in), B (out, r), scale = alpha / r: the one formula the
    LoRA layer's merge and the exporter's streamed merge share."""
    return w.float() + scale * (b.float() @ a.float())


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scale = alpha / r
        device = next(iter([*base.parameters(), *base.buffers()])).device  # an int8 base has only buffers
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=torch.float32, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=torch.float32, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default, as PEFT does
        self.dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        keep = self.dropout.mask(x) if isinstance(self.dropout, LoRADropout) else None
        keep_scale = 1 / (1 - self.dropout.p) if keep is not None else 1.0
        return y + LoRABranch.apply(x, self.lora_A, self.lora_B, keep, keep_scale, self.scale).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold the update into a float base weight; a second merge is refused, never applied twice."""
        if self.merged:
            raise RuntimeError("this LoRA layer is already merged; unmerge() first")
        w = self._float_base_weight()
        w.copy_(merged_weight(w, self.lora_A, self.lora_B, self.scale).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            raise RuntimeError("this LoRA layer is not merged")
        w = self._float_base_weight()
        w.copy_(merged_weight(w, self.lora_A, self.lora_B, -self.scale).to(w.dtype))
        self.merged = False

    def _float_base_weight(self) -> torch.Tensor:
        w = getattr(self.base, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise ValueError("merging needs a float base layer; export merges from the original checkpoint instead")
        return w

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def parse_targets(targets: str | list[str]) -> list[str]:
    """'q_proj,v_proj', Meta's 'wq,wv', or 'all' -> our layer names."""
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    out = []
    for n in (n.strip() for n in names if n.strip()):
        if n == "all":
            out.extend(PROJECTIONS)
        elif n in PROJECTIONS or n in META_ALIASES:
            out.append(META_ALIASES.get(n, n))
        else:
            raise ValueError(f"unknown LoRA target {n!r}; choose from {', '.join(PROJECTIONS)}, Meta's wq..w3, or all")
    return list(dict.fromkeys(out))


def apply_lora(model: nn.Module, targets, r: int = 8, alpha: float = 16, dropout: float = 0.0) -> list[str]:
    """Wrap every targeted Linear of the model in a LoRALinear; returns the wrapped module names."""
    wanted = set(parse_targets(targets))
    wrapped = []
    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if leaf in wanted and not isinstance(module, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LoRALinear(module, r, alpha, dropout))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no layer of the model matches the LoRA targets {sorted(wanted)}")
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def enable_modules_to_save(model: nn.Module, names) -> list[str]:
    """Give fully trained modules (embed_tokens, lm_head) their own trainable fp32 copy of the weights.

    A copy, as PEFT makes one: the loaded base may be a read-only memory map, and a tied embedding
    becomes two independent tensors once either side is trained.
    """
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"modules_to_save: the model has no module {name!r} (embed_tokens and lm_head are "
                             "usual)") from None
        for pname, p in list(module.named_parameters(recurse=False)):
            setattr(module, pname, nn.Parameter(p.detach().float().clone(), requires_grad=True))
    return names


def is_lora_param(name: str) -> bool:
    return name.endswith(("lora_A", "lora_B"))


def mark_only_lora_trainable(model: nn.Module, modules_to_save: tuple[str, ...] = ()):
    """requires_grad on LoRA A/B (and fully trained modules such as embed_tokens / lm_head), off elsewhere."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_param(name) or name.split(".")[0] in modules_to_save)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Just the LoRA tensors, under our module names ('layers.0.self_attn.q_proj.lora_A')."""
    return {n: p.detach() for n, p in model.named_parameters() if is_lora_param(n)}


def set_merged(model: nn.Module, merged: bool):
    for layer in lora_layers(model).values():
        if layer.merged != merged:
            layer.merge() if merged else layer.unmerge()
