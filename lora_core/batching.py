"""Which examples make each optimizer step (a function of seed and step, so a resumed run sees the same
batches) and how a step's examples become padded micro-batches."""
from __future__ import annotations

import math
import random

import torch

from .data import IGNORE, Example


def epoch_order(lengths: list[int], epoch: int, seed: int, batch_size: int, group_by_length: bool) -> list[int]:
    """Example indices for one epoch: shuffled by seed and epoch; with group_by_length, chunks of 50
    optimizer steps are sorted by length so batches waste less padding."""
    order = list(range(len(lengths)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    if group_by_length:
        chunk = 50 * batch_size
        order = [i for c in range(0, len(order), chunk) for i in sorted(order[c:c + chunk], key=lambda j: -lengths[j])]
    return order


def step_indices(lengths: list[int], step: int, seed: int, batch_size: int, group_by_length: bool) -> list[int]:
    """The examples of global optimizer step `step` (the last step of an epoch may be short)."""
    per_epoch = math.ceil(len(lengths) / batch_size)
    epoch, k = divmod(step, per_epoch)
    return epoch_order(lengths, epoch, seed, batch_size, group_by_length)[k * batch_size:(k + 1) * batch_size]


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) input ids and labels, built on the host (the loop moves them in one copy); a
    causal model never lets padding reach real tokens."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long, device="cpu")
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long, device="cpu")
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids, device="cpu")
        labels[i, :len(e.labels)] = torch.tensor(e.labels, device="cpu")
    return ids, labels


def micro_batches(examples: list[Example], size: int, max_tokens: int | None = None) -> list[list[Example]]:
    """A step's examples sorted by length (similar lengths together: less padding) and cut into micro-batches
    of at most `size` examples and, with max_tokens, at most that many padded tokens (examples x longest);
    an example longer than the budget goes alone. Which examples make the step does not change, only how
    they are grouped, so the step's gradient is the same."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    out: list[list[Example]] = []
    for e in ordered:
        # sorted ascending: the newcomer is the longest, so the padded size is its length times the count
        if out and len(out[-1]) < size and (max_tokens is None or (len(out[-1]) + 1) * len(e.input_ids) <= max_tokens):
            out[-1].append(e)
        else:
            out.append([e])
    return out
