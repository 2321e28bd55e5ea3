"""ModelArgs: the shape of a LLaMA model, read from Meta params.json, HF config.json or GGUF metadata."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None -> n_heads (multi-head attention)
    vocab_size: int = 32000
    hidden_dim: int = 11008  # SwiGLU inner size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # LLaMA 3.1+ frequency scaling: {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    rope_scaling: dict | None = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta_params(cls, params: dict, vocab_size: int | None = None, source: str = "params.json") -> ModelArgs:
        """Meta's params.json; the FFN size follows llama/model.py's multiple_of rule."""
        def get(key, kind=int, default=_REQUIRED):
            return config_value(params, key, kind, source, default)

        dim = get("dim")
        hidden = int(2 * (4 * dim) / 3)
        if get("ffn_dim_multiplier", float, None) is not None:
            hidden = int(get("ffn_dim_multiplier", float) * hidden)
        multiple_of = get("multiple_of", int, 256)
        hidden = multiple_of * math.ceil(hidden / multiple_of)
        vocab = params.get("vocab_size", -1)
        if vocab is None or (isinstance(vocab, int) and vocab <= 0):  # LLaMA 1/2 say -1: the tokenizer decides
            vocab = vocab_size
        else:
            vocab = get("vocab_size")
        if vocab is None:
            raise ValueError(f"{source}: no vocab_size, and none was read from the weights")
        return cls(
            dim=dim,
            n_layers=get("n_layers"),
            n_heads=get("n_heads"),
            n_kv_heads=get("n_kv_heads", int, None),
            vocab_size=vocab,
            hidden_dim=hidden,
            norm_eps=get("norm_eps", float, 1e-5),
            rope_theta=get("rope_theta", float, 10000.0),
            max_seq_len=get("max_seq_len", int, 2048),
            rope_scaling=(_llama3_scaling(params.get("rope_scaling_factor", 8.0)) if params.get("use_scaled_rope")
                          else None),
        )

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> ModelArgs:
        """HF LlamaConfig as config.json."""
        def get(key, kind=int, default=_REQUIRED):
            return config_value(cfg, key, kind, source, default)

        arch = cfg.get("model_type", "llama")
        if arch != "llama":
            raise ValueError(f"{source}: model_type is {arch!r}; only 'llama' is supported")
        dim, heads = get("hidden_size"), get("num_attention_heads")
        head_dim = get("head_dim", int, None)
        if head_dim and head_dim != dim // heads:
            raise ValueError(f"{source}: head_dim {head_dim} differs from hidden_size / num_attention_heads; "
                             "not supported")
        rope = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
        return cls(
            dim=dim,
            n_layers=get("num_hidden_layers"),
            n_heads=heads,
            n_kv_heads=get("num_key_value_heads", int, None),
            vocab_size=get("vocab_size"),
            hidden_dim=get("intermediate_size"),
            norm_eps=get("rms_norm_eps", float, 1e-6),
            rope_theta=get("rope_theta", float, config_value(rope, "rope_theta", float, source, 10000.0)),
            max_seq_len=get("max_position_embeddings", int, 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=_hf_rope_scaling(cfg),
        )

    @classmethod
    def from_gguf(cls, meta: dict, tensor_names: set[str], n_vocab_tokens: int | None = None) -> ModelArgs:
        """GGUF key/values (llama.* keys); tied when the file has no output.weight."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"GGUF architecture is {arch!r}; only 'llama' is supported")
        if "rope_freqs.weight" in tensor_names:
            raise ValueError("GGUF with rope_freqs.weight (LLaMA 3.1 frequency factors) is not supported yet; "
                             "load the HF or Meta checkpoint instead")
        vocab = meta.get("llama.vocab_size", n_vocab_tokens)
        return cls(
            dim=int(meta["llama.embedding_length"]),
            n_layers=int(meta["llama.block_count"]),
            n_heads=int(meta["llama.attention.head_count"]),
            n_kv_heads=int(meta.get("llama.attention.head_count_kv", meta["llama.attention.head_count"])),
            vocab_size=int(vocab),
            hidden_dim=int(meta["llama.feed_forward_length"]),
            norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            max_seq_len=int(meta.get("llama.context_length", 2048)),
            tie_embeddings="output.weight" not in tensor_names,
        )


_REQUIRED = object()


def config_value(cfg: dict, key: str, kind: type, source: str, default=_REQUIRED):
    """cfg[key] checked to be a positive number of the right kind (bool is not a number); one-line errors."""
    if key not in cfg or cfg[key] is None:
        if default is _REQUIRED:
            raise ValueError(f"{source}: {key} is missing; the file is incomplete or not a LLaMA config")
        return default
    value = cfg[key]
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
        want = "a positive integer" if kind is int else "a positive number"
        raise ValueError(f"{source}: {key} is {value!r}; expected {want}")
    return kind(value)


def _llama3_scaling(factor: float, low: float = 1.0, high: float = 4.0, original: int = 8192) -> dict:
    """Meta's apply_scaling constants for LLaMA 3.1 (factor 8) and 3.2 (factor 32)."""
    return {"factor": float(factor), "low_freq_factor": float(low), "high_freq_factor": float(high),
            "original_max_position_embeddings": int(original)}


def _hf_rope_scaling(cfg: dict) -> dict | None:
    """config.json rope_scaling (transformers 4) or rope_parameters (transformers 5)."""
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"config.json rope scaling {kind!r} is not supported (default and llama3 are)")
    return _llama3_scaling(rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"],
                           rs["original_max_position_embeddings"])
