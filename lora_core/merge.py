"""Merged weights, one tensor at a time: W' = W + (alpha/r)·B·A in fp32 from the original checkpoint.

The base is re-read from its own files (never from an int8 copy); modules_to_save tensors replace the
base ones, and a tied embedding is untied when either side was trained, as in the unmerged model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .adapter import PEFT_PREFIX, check_base, read_adapter, saved_module_key
from .checkpoint import Checkpoint, hf_to_meta_rows, name_map, rope_heads
from .config import ModelArgs
from .loader import fingerprint, meta_model


@dataclass
class MergePlan:
    """What the merged model holds: its shape, tensor names (ours) and shapes, and the LoRA updates."""

    ckpt: Checkpoint
    args: ModelArgs
    shapes: dict[str, tuple[int, ...]]
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)  # name -> (B, A, scale)
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save weights by tensor name
    alpha: float | None = None  # the adapter's lora_alpha (llama.cpp LoRA files record it)

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
            source = "embed_tokens.weight" if name == "lm_head.weight" and self.ckpt.args.tie_embeddings else name
            w = self.ckpt.get(source).float()
            if tuple(w.shape) != self.shapes[name]:
                raise ValueError(f"{self.ckpt.path}: tensor {self.ckpt.external_name(source)} has shape "
                                 f"{tuple(w.shape)}, the config says {self.shapes[name]}")
            if name in self.lora:
                b, a, scale = self.lora[name]
                w = w + scale * (b @ a)
            yield name, w


def plan_merge(ckpt: Checkpoint, adapter_dir: str | Path | None) -> MergePlan:
    """Check the adapter against the base and collect its updates (small: A and B only)."""
    args = ModelArgs(**ckpt.args.to_dict())
    expected = meta_model(args).state_dict()
    shapes = {n: tuple(expected[n].shape) for n in name_map(args.n_layers, ckpt.fmt) if n in ckpt.names()}
    plan = MergePlan(ckpt, args, shapes)
    if adapter_dir is None:
        return plan
    config, tensors, extras = read_adapter(adapter_dir)
    embed = ckpt.get("embed_tokens.weight")
    check_base(adapter_dir, extras, fingerprint(ckpt.args, embed[:16]), args.vocab_size, str(ckpt.path))
    if config.get("use_rslora") or config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: rsLoRA, DoRA and per-layer rank/alpha patterns are not supported")
    plan.alpha = config["lora_alpha"]
    scale = config["lora_alpha"] / config["r"]
    for key, a in tensors.items():
        if not key.endswith(("lora_A.weight", "lora_A.default.weight")):
            continue
        module = key.removeprefix(PEFT_PREFIX).split(".lora_A")[0]
        name = module + ".weight"
        b = tensors.get(key.replace("lora_A", "lora_B"))
        if name not in shapes or b is None:
            raise ValueError(f"{adapter_dir}: {key} names no layer of this base (or has no lora_B): "
                             "the adapter was trained on another model")
        if (b.shape[0], a.shape[1]) != shapes[name] or b.shape[1] != a.shape[0]:
            raise ValueError(f"{adapter_dir}: {module} has A {tuple(a.shape)}, B {tuple(b.shape)}; the base weight is "
                             f"{shapes[name]}: the adapter was trained on another base")
        heads = rope_heads(args, name)
        b = hf_to_meta_rows(b.float(), heads) if heads is not None else b.float()
        plan.lora[name] = (b, a.float(), scale)
    if not plan.lora:
        raise ValueError(f"{adapter_dir}: no LoRA layer matched this base; nothing would be merged")
    for module in config.get("modules_to_save") or []:
        w = tensors.get(saved_module_key(module))
        name = module + ".weight"
        want = shapes["embed_tokens.weight"] if name == "lm_head.weight" else shapes.get(name)
        if w is None or tuple(w.shape) != want:
            raise ValueError(f"{adapter_dir}: modules_to_save {module!r} is missing or has the wrong shape")
        plan.saved[name] = w.float()
    if plan.saved.keys() & {"embed_tokens.weight", "lm_head.weight"}:
        plan.untie()  # one side was trained: two tensors from now on
    return plan
