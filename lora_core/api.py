"""lora_core.load and its two halves: a base opened with the tokenizer that fits it (cheap: no weights read),
then the model loaded from it, optionally int8, with an adapter, on a device."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .adapter import adapter_extras, adapter_tokenizer, apply_adapter, read_adapter
from .device import pick_device
from .int4 import quantize_int4_on_load, quantize_model_int4
from .loader import DEFAULT_BASE, base_fingerprint, load_model, parse_dtype, resolve_base
from .lora import lora_layers, merged_weight
from .model import Transformer
from .quant import add_int8_output_head, quantize_model, quantize_on_load
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf
from .vocab import check_extends, resize_model
from .weights import GGUFWeights, Weights, open_weights

BASE_DTYPES = ("int8", "int4", "bf16", "fp32")
QUANTIZED = ("int8", "int4")  # loaded in fp32, projections quantized as they arrive (or after a merge)


def base_of(base: str | Path | None, adapter: str | Path | None) -> str | Path:
    """The base to load: the one given, else the one the adapter recorded when it was trained, else the
    embedded default."""
    return base or (adapter_extras(adapter).get("base") if adapter else None) or DEFAULT_BASE


def check_base_dtype(dtype: str, training: bool = False):
    """The one message for an unknown base dtype, from the API and from every CLI (--base-dtype)."""
    if dtype == "int4" and training:
        raise ValueError("base dtype 'int4' is for generation only (its kernel has no backward pass); train with "
                         "--base-dtype int8, bf16 or fp32")
    if dtype in QUANTIZED:
        return
    try:
        parse_dtype(dtype)
    except ValueError:
        raise ValueError(f"base dtype {dtype!r} is not one of {', '.join(BASE_DTYPES)} (--base-dtype)") from None


def check_tokenizer_fits(tokenizer: Tokenizer, args, weights: Path):
    """The tokenizer may be smaller than the embedding (padded vocabularies), never larger."""
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(
            f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} tokens but the model at {weights} embeds "
            f"{args.vocab_size}; use the tokenizer that was trained with this model"
        )


def tokenizer_of(src: Weights, tokenizer: str | Path | None = None) -> Tokenizer:
    """The tokenizer given, else the one embedded in a GGUF or lying beside the weights; checked to fit."""
    if tokenizer is None and isinstance(src, GGUFWeights):
        tok = tokenizer_from_gguf(src.file)
    elif tokenizer is None and src.tokenizer_path is None:
        raise FileNotFoundError(
            f"{src.path}: no tokenizer.model or tokenizer.json beside the weights; pass the tokenizer file explicitly"
        )
    else:
        tok = load_tokenizer(tokenizer or src.tokenizer_path)
    check_tokenizer_fits(tok, src.args, src.path)
    return tok


def open_base(base: str | Path = DEFAULT_BASE, tokenizer: str | Path | None = None,
              adapter: str | Path | None = None) -> tuple[Weights, Tokenizer]:
    """The base's weight reader (nothing loaded yet) and its tokenizer: enough to check data before a load. With
    an adapter that grew the vocabulary, the tokenizer is the adapter's own, checked to extend the base's."""
    src = open_weights(resolve_base(base))
    grown = adapter_tokenizer(adapter, src.args.vocab_size, str(base)) if adapter is not None else None
    if grown is None:
        return src, tokenizer_of(src, tokenizer)
    if tokenizer is not None:
        raise ValueError(f"{adapter}: the adapter carries its own (extended) tokenizer; leave the tokenizer out")
    return src, check_extends(grown, tokenizer_of(src), adapter)


def fold_adapter(model: Transformer):
    """Merge every LoRA layer into its float base weight (W + scale * B @ A) and put the plain base layer back in
    its place: the model decodes at the base's speed, and an int8 base is quantized from the merged weights. A new
    tensor, not an in-place update: the loaded weight may be a read-only memory map."""
    for name, layer in lora_layers(model).items():
        w = layer.base.weight
        merged = merged_weight(w, layer.lora_A, layer.lora_B, layer.scale).to(w.dtype)
        layer.base.weight = nn.Parameter(merged, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)


def load_from(src: Weights, dtype: str = "fp32", adapter: str | Path | None = None,
              device: str | torch.device = "cpu", progress: bool = False, label: str | None = None,
              merge: bool = False) -> Transformer:
    """The model in `src`: int8 (int4: group-wise 4-bit, CPU only, for generation) quantizes the seven projections
    of every block while loading (the rest stays fp32, with an int8 copy of lm_head for decoding); `adapter`
    applies a PEFT-format LoRA adapter after checking it belongs to this base, unmerged, or with `merge` folded
    into the float weights before any quantization (a quantized base then loads in fp32 first)."""
    check_base_dtype(dtype)
    if merge and adapter is None:
        raise ValueError("--merge folds an adapter into the base weights: give --adapter too, or drop --merge")
    device = pick_device(device) if isinstance(device, str) else device
    if dtype == "int4" and device.type != "cpu":
        raise ValueError(f"base dtype 'int4' runs on the CPU only (our int4 CPU kernel); on {device} use "
                         "--base-dtype int8 or --device cpu")
    adapted = read_adapter(adapter, src.args) if adapter is not None else None  # a bad adapter fails before a load
    if dtype in QUANTIZED:
        hook = {"int8": quantize_on_load, "int4": quantize_int4_on_load}[dtype]
        model = load_model(src, "fp32", hook=None if merge else hook, progress=progress)
    else:
        model = load_model(src, dtype, progress=progress)
    if adapted is not None:
        adapted.check_base(base_fingerprint(model), model.args.vocab_size, label or str(src.path))
        if adapted.tokenizer is not None:  # the adapter grew the vocabulary: the model's embeddings grow with it
            base_tok = tokenizer_of(src)
            resize_model(model, check_extends(adapted.tokenizer, base_tok, adapted.path), base_tok)
        apply_adapter(model, adapted)
    if merge:
        fold_adapter(model)
        if dtype == "int8":
            quantize_model(model)
        elif dtype == "int4":
            quantize_model_int4(model)
    if dtype in QUANTIZED:
        add_int8_output_head(model)
    return model.to(device)


def load(base: str | Path = DEFAULT_BASE, dtype: str = "fp32", tokenizer: str | Path | None = None,
         adapter: str | Path | None = None, progress: bool = False,
         device: str | torch.device = "cpu", merge: bool = False) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer from a directory (Meta or HF layout), a .gguf file or an embedded base name.

    dtype "int8" ("int4": group-wise 4-bit, CPU only, generation only) quantizes the seven projection layers of
    every block while loading (the rest stays fp32); `adapter` applies a PEFT-format LoRA adapter on top,
    unmerged, or merged into the base with `merge` (with the adapter's own tokenizer and grown embeddings when it
    extended the vocabulary). The weights are read on the CPU, then moved to `device` ("auto": CUDA when present).
    """
    src, tok = open_base(base, tokenizer, adapter)
    return load_from(src, dtype, adapter, device, progress, label=str(base), merge=merge), tok


__all__ = ["load", "load_from", "open_base", "tokenizer_of", "check_tokenizer_fits", "BASE_DTYPES"]
