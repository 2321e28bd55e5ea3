"""lora-core: instruction-tune LLaMA-family models with LoRA on modest hardware."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import GGUFCheckpoint, open_checkpoint
from .config import ModelArgs
from .device import pick_device
from .loader import load_model, resolve_base
from .model import KVCache, Transformer
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf

__version__ = "0.2.0"
DEFAULT_BASE = "smollm2-135m"

__all__ = ["load", "load_model", "load_tokenizer", "open_checkpoint", "ModelArgs", "Transformer", "KVCache",
           "Tokenizer", "DEFAULT_BASE"]


def check_tokenizer_fits(tokenizer: Tokenizer, args: ModelArgs, weights: Path):
    """The tokenizer may be smaller than the embedding (padded vocabularies), never larger."""
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(
            f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} tokens but the model at {weights} embeds "
            f"{args.vocab_size}; use the tokenizer that was trained with this model"
        )


def tokenizer_of(ckpt, tokenizer: str | Path | None = None) -> Tokenizer:
    """The tokenizer given, else the one embedded in a GGUF or lying beside the weights; checked to fit."""
    if tokenizer is None and isinstance(ckpt, GGUFCheckpoint):
        tok = tokenizer_from_gguf(ckpt.file)
    elif tokenizer is None and ckpt.tokenizer_path is None:
        raise FileNotFoundError(
            f"{ckpt.path}: no tokenizer.model or tokenizer.json beside the weights; pass the tokenizer file explicitly"
        )
    else:
        tok = load_tokenizer(tokenizer or ckpt.tokenizer_path)
    check_tokenizer_fits(tok, ckpt.args, ckpt.path)
    return tok


def load(base: str | Path = DEFAULT_BASE, dtype: str = "fp32", tokenizer: str | Path | None = None,
         adapter: str | Path | None = None, progress: bool = False,
         device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer from a directory (Meta or HF layout), a .gguf file or an embedded base name.

    dtype "int8" quantizes the seven projection layers of every block while loading (the rest stays
    fp32); `adapter` applies a PEFT-format LoRA adapter on top, unmerged. The weights are read on the CPU,
    then moved to `device` ("auto": CUDA when present).
    """
    device = pick_device(device) if isinstance(device, str) else device
    ckpt = open_checkpoint(resolve_base(base))
    tok = tokenizer_of(ckpt, tokenizer)
    if dtype == "int8":
        from .quant import quantize_on_load

        model = load_model(ckpt, "fp32", hook=quantize_on_load, progress=progress)
    else:
        model = load_model(ckpt, dtype, progress=progress)
    if adapter is not None:
        from .adapter import adapter_extras, check_base, load_adapter
        from .loader import base_fingerprint

        check_base(adapter, adapter_extras(adapter), base_fingerprint(model), model.args.vocab_size, str(base))
        load_adapter(model, adapter)
    return model.to(device), tok
