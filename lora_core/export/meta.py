"""Merged weights in Meta's layout: consolidated.00.pth + params.json + the tokenizer (tokenizer.model;
tokenizer.json for byte-level BPE bases): what alpaca-lora's export_state_dict_checkpoint.py produced
for llama.cpp's older converter.

torch.save wants every tensor at once; the merged tensors are first streamed into one raw file, which
is then memory-mapped as a single storage that torch.save writes out, so no full copy sits in RAM.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..names import name_map
from ..tokenizer import write_tokenizer_files
from .merge import MergePlan

META_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def ffn_params(dim: int, hidden: int) -> dict:
    """multiple_of / ffn_dim_multiplier that make Meta's FFN size rule give exactly `hidden`."""
    natural = int(2 * (4 * dim) / 3)
    if 256 * math.ceil(natural / 256) == hidden:
        return {"multiple_of": 256}
    if natural <= hidden:
        return {"multiple_of": hidden}  # rounds natural up to hidden
    return {"multiple_of": hidden, "ffn_dim_multiplier": (hidden - 0.5) / natural}


def meta_params(plan: MergePlan) -> dict:
    a = plan.args
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
              "vocab_size": a.vocab_size, "norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
              "max_seq_len": a.max_seq_len, **ffn_params(a.dim, a.hidden_dim)}
    if a.rope_scaling:
        params["use_scaled_rope"] = True
        params["rope_scaling"] = a.rope_scaling
    return params


def write_meta(plan: MergePlan, tok, out: Path, dtype: str, progress=None):
    """The plan comes untied (MergePlan.untie, done by the exporter): Meta checkpoints carry output.weight."""
    torch_dtype = META_DTYPES[dtype]
    meta = name_map(plan.args.n_layers, "meta")
    raw = out / "weights.raw"
    offsets, pos = {}, 0
    with open(raw, "wb") as f:
        for n, t in plan.tensors():
            t.to(torch_dtype).contiguous().view(-1).view(torch.uint8).numpy().tofile(f)
            offsets[n] = pos
            pos += t.numel()
            if progress:
                progress(n)
    storage = torch.UntypedStorage.from_file(str(raw), shared=False, nbytes=pos * torch_dtype.itemsize)
    state = {}
    for n, shape in plan.shapes.items():
        state[meta[n]] = torch.empty(0, dtype=torch_dtype).set_(storage, offsets[n], shape)
    torch.save(state, out / "consolidated.00.pth")
    del state, storage
    raw.unlink()
    (out / "params.json").write_text(json.dumps(meta_params(plan), indent=2))
    write_tokenizer_files(tok, out)
