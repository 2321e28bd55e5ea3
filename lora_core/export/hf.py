"""Merged weights in HF's layout: config.json, model.safetensors (sharded with an index above a size
threshold, q/k rows permuted to HF's order) and tokenizer files. Loadable by transformers and by
llama.cpp's convert_hf_to_gguf.py. Streamed."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..names import meta_to_hf_rows, name_map, rope_heads
from ..tokenizer import write_tokenizer_files
from .merge import MergePlan
from .safetensors_stream import SafetensorsWriter

HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def hf_config(plan: MergePlan, tok, dtype: torch.dtype) -> dict:
    a = plan.args
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": a.dim, "intermediate_size": a.hidden_dim, "num_hidden_layers": a.n_layers,
        "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim,
        "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
        "max_position_embeddings": a.max_seq_len, "tie_word_embeddings": a.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
    }
    if a.rope_scaling:
        config["rope_scaling"] = {"rope_type": "llama3", **a.rope_scaling}
    return config


def write_hf(plan: MergePlan, tok, out: Path, dtype: str, max_shard_bytes: int = 5 << 30, progress=None):
    torch_dtype = HF_DTYPES[dtype]
    hf = name_map(plan.args.n_layers, "hf")
    shards, size = [[]], 0
    for n, shape in plan.shapes.items():
        nbytes = torch.Size(shape).numel() * torch_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    where = {n: f for f, names in zip(files, shards) for n in names}
    writer = None
    for n, t in plan.tensors():  # tensors arrive in shard order: the shards were cut from the same order
        if writer is None or writer.path.name != where[n]:
            if writer is not None:
                writer.close()
            names = shards[files.index(where[n])]
            writer = SafetensorsWriter(out / where[n], {hf[m]: (plan.shapes[m], torch_dtype) for m in names})
        heads = rope_heads(plan.args, n)
        writer.write(hf[n], meta_to_hf_rows(t, heads) if heads is not None else t)
        if progress:
            progress(n)
    if writer is not None:
        writer.close()
    if len(files) > 1:
        total = sum(torch.Size(s).numel() * torch_dtype.itemsize for s in plan.shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": {hf[n]: where[n] for n in plan.shapes}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config(plan, tok, torch_dtype), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}, indent=2))
    write_tokenizer_files(tok, out)
