"""Merged weights, one tensor at a time: W' = W + (alpha/r)·B·A in fp32 from the original checkpoint.

The base is re-read from its own files (never from an int8 copy); modules_to_save tensors replace the
base ones, and a tied embedding is untied when either side was trained, as in the unmerged model. An adapter
that grew the vocabulary brings its tokenizer; embeddings it did not save grow as lora_core.vocab grows them.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter import Adapter, read_adapter
from ..api import tokenizer_of
from ..config import ModelArgs
from ..loader import fingerprint, meta_model
from ..lora import merged_weight
from ..names import name_map
from ..tokenizer import Tokenizer
from ..vocab import base_splits, check_extends, grow_rows
from ..weights import Weights

VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight")  # the tensors with one row per token


@dataclass
class MergePlan:
    """What the merged model holds: its shape, tensor names (ours) and shapes, the LoRA updates, and its
    tokenizer (the base's, or the adapter's extended one)."""

    src: Weights
    args: ModelArgs
    shapes: dict[str, tuple[int, ...]]
    tokenizer: Tokenizer
    adapter: Adapter | None = None
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # tensor name -> (A, B)
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save weights by tensor name
    grown: list[list[int]] | None = None  # extended vocabulary: the base ids each new token's row averages

    def grow(self, tok: Tokenizer):
        """Take on an extended tokenizer: embed_tokens and lm_head get its vocabulary's rows."""
        self.grown = base_splits(tok, self.tokenizer)
        self.tokenizer = tok
        self.args.vocab_size = tok.vocab_size
        for name in VOCAB_ROWS:
            if name in self.shapes:
                self.shapes[name] = (tok.vocab_size, self.args.dim)

    def untie(self):
        """Write lm_head as a tensor of its own even when the base shares it with the embedding."""
        if self.args.tie_embeddings:
            self.args.tie_embeddings = False
            self.shapes["lm_head.weight"] = self.shapes["embed_tokens.weight"]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(our name, merged fp32 tensor) in checkpoint order."""
        for name in self.shapes:
            if name in self.saved:
                yield name, self.saved[name]
                continue
            source = "embed_tokens.weight" if name == "lm_head.weight" and self.src.args.tie_embeddings else name
            w = self.src.get(source).float()
            grows = self.grown is not None and name in VOCAB_ROWS
            want = (self.src.args.vocab_size, self.args.dim) if grows else self.shapes[name]
            if tuple(w.shape) != want:
                raise ValueError(f"{self.src.path}: tensor {self.src.external_name(source)} has shape "
                                 f"{tuple(w.shape)}, the config says {want}")
            if name in self.lora:
                a, b = self.lora[name]
                w = merged_weight(w, a, b, self.adapter.scale)
            yield name, grow_rows(w, self.grown) if grows else w


def plan_merge(src: Weights, adapter_dir: str | Path | None) -> MergePlan:
    """Check the adapter against the base and collect its updates (small: A and B only)."""
    args = ModelArgs(**src.args.to_dict())
    expected = meta_model(args).state_dict()
    shapes = {n: tuple(expected[n].shape) for n in name_map(args.n_layers, src.fmt) if n in src.names()}
    plan = MergePlan(src, args, shapes, tokenizer_of(src))
    if adapter_dir is None:
        return plan
    adapter = read_adapter(adapter_dir, args)
    adapter.check_base(fingerprint(src.args, src.get("embed_tokens.weight")[:16]), args.vocab_size, str(src.path))
    plan.adapter = adapter
    if adapter.tokenizer is not None:
        plan.grow(check_extends(adapter.tokenizer, plan.tokenizer, adapter.path))
    for module, (a, b) in adapter.layers.items():
        name = module + ".weight"
        if name not in shapes:
            raise ValueError(f"{adapter_dir}: {module} names no layer of this base: the adapter was trained on "
                             "another model")
        if (b.shape[0], a.shape[1]) != shapes[name]:
            raise ValueError(f"{adapter_dir}: {module} has A {tuple(a.shape)}, B {tuple(b.shape)}; the base weight is "
                             f"{shapes[name]}: the adapter was trained on another base")
        plan.lora[name] = (a, b)
    for module, w in adapter.saved.items():
        name = module + ".weight"
        want = shapes["embed_tokens.weight"] if name == "lm_head.weight" else shapes.get(name)
        if tuple(w.shape) != want:
            raise ValueError(f"{adapter_dir}: modules_to_save {module!r} has shape {tuple(w.shape)}, the base needs "
                             f"{want}")
        plan.saved[name] = w
    if plan.saved.keys() & {"embed_tokens.weight", "lm_head.weight"}:
        plan.untie()  # one side was trained: two tensors from now on
    return plan
