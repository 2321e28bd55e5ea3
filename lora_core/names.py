"""One table of tensor names (ours, Meta's, HF's, llama.cpp's) and the q/k row permutation between layouts.

Our q/k rows follow Meta's interleaved RoPE layout (llama.cpp's too); HF checkpoints keep, per head, the
first halves of the RoPE pairs and then the second halves.
"""
from __future__ import annotations

import torch

from .config import ModelArgs

# our name -> (Meta, HF, GGUF); "{}" is the layer number
NAME_TABLE = {
    "embed_tokens.weight": ("tok_embeddings.weight", "model.embed_tokens.weight", "token_embd.weight"),
    "norm.weight": ("norm.weight", "model.norm.weight", "output_norm.weight"),
    "lm_head.weight": ("output.weight", "lm_head.weight", "output.weight"),
    "layers.{}.input_layernorm.weight": (
        "layers.{}.attention_norm.weight", "model.layers.{}.input_layernorm.weight", "blk.{}.attn_norm.weight"),
    "layers.{}.self_attn.q_proj.weight": (
        "layers.{}.attention.wq.weight", "model.layers.{}.self_attn.q_proj.weight", "blk.{}.attn_q.weight"),
    "layers.{}.self_attn.k_proj.weight": (
        "layers.{}.attention.wk.weight", "model.layers.{}.self_attn.k_proj.weight", "blk.{}.attn_k.weight"),
    "layers.{}.self_attn.v_proj.weight": (
        "layers.{}.attention.wv.weight", "model.layers.{}.self_attn.v_proj.weight", "blk.{}.attn_v.weight"),
    "layers.{}.self_attn.o_proj.weight": (
        "layers.{}.attention.wo.weight", "model.layers.{}.self_attn.o_proj.weight", "blk.{}.attn_output.weight"),
    "layers.{}.post_attention_layernorm.weight": (
        "layers.{}.ffn_norm.weight", "model.layers.{}.post_attention_layernorm.weight", "blk.{}.ffn_norm.weight"),
    "layers.{}.mlp.gate_proj.weight": (
        "layers.{}.feed_forward.w1.weight", "model.layers.{}.mlp.gate_proj.weight", "blk.{}.ffn_gate.weight"),
    "layers.{}.mlp.down_proj.weight": (
        "layers.{}.feed_forward.w2.weight", "model.layers.{}.mlp.down_proj.weight", "blk.{}.ffn_down.weight"),
    "layers.{}.mlp.up_proj.weight": (
        "layers.{}.feed_forward.w3.weight", "model.layers.{}.mlp.up_proj.weight", "blk.{}.ffn_up.weight"),
}
FORMATS = ("meta", "hf", "gguf")


def name_map(n_layers: int, fmt: str) -> dict[str, str]:
    """Our tensor name -> the checkpoint's, for every layer."""
    col = FORMATS.index(fmt)
    out = {}
    for ours, theirs in NAME_TABLE.items():
        layers = range(n_layers) if "{}" in ours else [None]
        for i in layers:
            out[ours.format(i)] = theirs[col].format(i)
    return out


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k row permutation: per head, HF keeps the first halves of the RoPE pairs, then the second halves."""
    out_dim, dim = w.shape
    head_dim = out_dim // n_heads
    # (n_heads, 2, head_dim/2, dim) -> (n_heads, head_dim/2, 2, dim): pair members become adjacent rows
    return w.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(out_dim, dim)


def rope_heads(args: ModelArgs, module: str) -> int | None:
    """Heads of a layer whose output rows are RoPE-permuted between Meta's and HF's layouts, else None."""
    module = module.removesuffix(".weight")
    if module.endswith("q_proj"):
        return args.n_heads
    if module.endswith("k_proj"):
        return args.n_kv_heads
    return None


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The permutation convert_llama_weights_to_hf.py applies (inverse of hf_to_meta_rows)."""
    out_dim, dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(out_dim, dim)
