"""Writing small GGUF files with llama.cpp's gguf package, for tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def meta_to_gguf_name(name: str) -> str:
    """Meta key -> llama.cpp tensor name (as convert_hf_to_gguf.py names them)."""
    table = {
        "tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
        "output.weight": "output.weight", "attention.wq.weight": "attn_q.weight",
        "attention.wk.weight": "attn_k.weight", "attention.wv.weight": "attn_v.weight",
        "attention.wo.weight": "attn_output.weight", "feed_forward.w1.weight": "ffn_gate.weight",
        "feed_forward.w2.weight": "ffn_down.weight", "feed_forward.w3.weight": "ffn_up.weight",
        "attention_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    }
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"blk.{i}.{table[rest]}"
    return table[name]


def write_gguf(path: Path, sd: dict, params: dict, hidden_dim: int, qtypes: dict[str, str] | None = None,
               sp_model: Path | None = None, vocab_from: Path | None = None) -> dict[str, torch.Tensor]:
    """A llama GGUF from a Meta-layout state dict (with sp_model's vocabulary, or vocab_from's tokenizer.*
    fields copied from another GGUF); returns the weights as llama.cpp will see them (dequantized by
    gguf.quants, the package's own reference code)."""
    import gguf

    qtypes = qtypes or {}
    w = gguf.GGUFWriter(str(path), "llama")
    heads = params["n_heads"]
    w.add_context_length(256)
    w.add_embedding_length(params["dim"])
    w.add_block_count(params["n_layers"])
    w.add_feed_forward_length(hidden_dim)
    w.add_head_count(heads)
    w.add_head_count_kv(params.get("n_kv_heads") or heads)
    w.add_layer_norm_rms_eps(params["norm_eps"])
    w.add_rope_freq_base(params.get("rope_theta", 10000.0))
    w.add_rope_dimension_count(params["dim"] // heads)
    vocab = sd["tok_embeddings.weight"].shape[0]
    if sp_model is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(sp_model))
        types = []
        for i in range(sp.get_piece_size()):
            kind = 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
            types.append(5 if sp.is_unused(i) and kind == 1 else kind)
        w.add_tokenizer_model("llama")
        w.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
        w.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
        w.add_token_types(types)
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
        w.add_unk_token_id(sp.unk_id())
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
    if vocab_from is not None:
        for key, field in gguf.GGUFReader(vocab_from).fields.items():
            if key.startswith("tokenizer."):
                sub = field.types[1] if len(field.types) > 1 else None
                w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    w.add_vocab_size(vocab)
    seen = {}
    for name, t in sd.items():
        arr = t.float().numpy()
        kind = qtypes.get(name, "F32")
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        if kind == "F32":
            data = arr
        elif kind == "F16":
            data = arr.astype(np.float16)
        else:
            data = gguf.quants.quantize(arr, qtype)
        w.add_tensor(meta_to_gguf_name(name), data, raw_dtype=qtype if kind not in ("F32", "F16") else None)
        back = np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)
        seen[name] = torch.from_numpy(back.reshape(arr.shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return seen
