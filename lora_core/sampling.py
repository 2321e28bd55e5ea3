"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p (in HF's order)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off; penalty 1 is none."""

    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.9
    repetition_penalty: float = 1.1

    def check(self) -> list[str]:
        """Raise on impossible settings; return warnings for settings that will have no effect."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--temperature {self.temperature}: must be a finite number >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k}: must be >= 0 (0 switches it off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1] (1 switches it off)")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"--repetition-penalty {self.repetition_penalty}: must be > 0 (1 is no penalty)")
        warnings = []
        if self.greedy and (self.top_k or self.top_p < 1):
            warnings.append("--temperature 0 is greedy decoding: --top-k and --top-p have no effect")
        return warnings

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as HF applies it: logits of tokens already in the context are divided by the
    penalty when positive and multiplied by it when negative. logits (V,); seen: the context's ids (any
    order, duplicates allowed) or a boolean mask (V,) of them."""
    if penalty == 1 or seen.numel() == 0:
        return logits
    if seen.dtype == torch.bool:
        return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th kept too), the rest -inf."""
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass of the tokens ranked above each one
    drop = before >= p
    drop[0] = False
    return logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))


def next_token(logits: torch.Tensor, seen: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """One token id from fp32 logits (V,) given the context (its ids, or a boolean mask over the vocabulary)."""
    logits = penalize_repetition(logits, seen, s.repetition_penalty)
    if s.greedy:  # numpy's argmax (the same first maximum, a NaN first) is ~10x faster than torch's on the CPU
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            return int(logits.detach().numpy().argmax())
        return int(logits.argmax())
    logits = filter_top_p(filter_top_k(logits / s.temperature, s.top_k), s.top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
