"""Merged weights as a llama.cpp GGUF: llama architecture metadata, llama.cpp tensor names (q/k rows
already in Meta's layout, which is llama.cpp's), norms in F32, the vocabulary embedded. Streamed."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from ..names import name_map
from ..weights import GGUFWeights
from .merge import MergePlan
from .tokenizer_files import add_gguf_vocabulary

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")


def _kind(dtype: str, shape: tuple[int, ...]):
    if len(shape) == 1 or dtype == "f32":
        return Q.F32  # norms stay F32, as llama.cpp's converter keeps them
    if dtype == "q8_0" and shape[-1] % 32:
        return Q.F16  # Q8_0 needs rows of whole 32-value blocks
    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]


def _encode(t: torch.Tensor, kind) -> np.ndarray:
    if kind == Q.F32:
        return t.float().contiguous().numpy()
    if kind == Q.F16:
        return t.half().contiguous().numpy()
    if kind == Q.BF16:
        return t.bfloat16().contiguous().view(torch.int16).numpy().view(np.uint16)
    return quants.quantize(t.float().contiguous().numpy(), Q.Q8_0)


def write_gguf(plan: MergePlan, tok, path: Path, dtype: str, name: str = "", progress=None):
    args = plan.args
    if args.rope_scaling:
        raise ValueError("GGUF export of LLaMA 3.1 scaled RoPE (rope_freqs) is not supported yet; use --format hf")
    names = name_map(args.n_layers, "gguf")
    kinds = {n: _kind(dtype, s) for n, s in plan.shapes.items()}
    w = gguf.GGUFWriter(path, "llama")
    w.add_type("model")
    if name:
        w.add_name(name)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocabulary(w, tok, plan)
    stored = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16, Q.Q8_0: np.uint8}  # numpy type written
    for n, shape in plan.shapes.items():
        kind = kinds[n]
        byte_shape = gguf.quant_shape_to_byte_shape(shape, kind) if kind == Q.Q8_0 else shape
        item = np.dtype(stored[kind])
        raw = None if kind in (Q.F32, Q.F16) else kind  # numpy cannot name these types itself
        w.add_tensor_info(names[n], byte_shape, item, int(np.prod(byte_shape)) * item.itemsize, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for n, t in plan.tensors():
        w.write_tensor_data(_encode(t, kinds[n]))
        if progress:
            progress(n)
    w.close()


def add_vocabulary(w, tok, plan: MergePlan):
    source = plan.src.file if isinstance(plan.src, GGUFWeights) else None
    add_gguf_vocabulary(w, tok, source)


def write_lora_gguf(plan: MergePlan, path: Path, dtype: str = "f32"):
    """The adapter alone as a llama.cpp LoRA GGUF (for `--lora` at run time): A and B per layer under the
    base tensor's name + .lora_a / .lora_b, B's q/k rows in Meta's (llama.cpp's) layout."""
    if plan.saved:
        raise ValueError("a llama.cpp LoRA GGUF holds only A and B; this adapter also trains "
                         f"{', '.join(n.removesuffix('.weight') for n in plan.saved)}: export a merged --format gguf")
    names = name_map(plan.args.n_layers, "gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(plan.adapter.alpha))  # llama.cpp scales by alpha / rank
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    to_np = (lambda t: t.float().contiguous().numpy()) if dtype == "f32" else (lambda t: t.half().contiguous().numpy())
    for n, (a, b) in plan.lora.items():
        w.add_tensor(names[n] + ".lora_a", to_np(a))
        w.add_tensor(names[n] + ".lora_b", to_np(b))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
