"""Helpers the tests share (fixtures live in conftest.py): paths to ../shared, tiny random checkpoints in
Meta's and HF's layouts written independently of lora_core, random LoRA weights, CLIs run in-process."""
from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZERS = SHARED / "tokenizers"
DATA = SHARED / "data"


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: tests read real data from ../shared beside the checkout")
    return path


def randomize_lora(model, std: float = 0.05, seed: int = 0, a_too: bool = False):
    """Give every LoRA layer a non-zero B (and, with a_too, a fresh A) from its own generator, so the
    adapter is the same whatever ran before the test."""
    from lora_core.lora import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            if a_too:
                bound = 1 / math.sqrt(m.in_features)
                m.lora_A.copy_(torch.rand(m.lora_A.shape, generator=g).mul_(2 * bound).sub_(bound))
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)
    return model


def run_cli(main, argv, capsys) -> tuple[int, str, str]:
    """A CLI's main(argv) in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's llama/model.py FeedForward size rule, written out here independently of lora_core."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_llama_weights_to_hf.py's permute: Meta's interleaved RoPE rows -> HF's rotate-half rows."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def random_meta_state(params: dict, vocab: int, tie: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random LLaMA in Meta's key names and layout."""
    g = torch.Generator().manual_seed(seed)
    dim, heads = params["dim"], params["n_heads"]
    kv = params.get("n_kv_heads") or heads
    hd = dim // heads
    hidden = meta_hidden_dim(dim, params["multiple_of"], params.get("ffn_dim_multiplier"))

    def r(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale or 1 / math.sqrt(shape[-1]))

    sd = {"tok_embeddings.weight": r(vocab, dim, scale=1.0), "norm.weight": 1 + 0.1 * r(dim, scale=1.0)}
    if not tie:
        sd["output.weight"] = r(vocab, dim)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        sd |= {
            p + "attention.wq.weight": r(heads * hd, dim),
            p + "attention.wk.weight": r(kv * hd, dim),
            p + "attention.wv.weight": r(kv * hd, dim),
            p + "attention.wo.weight": r(dim, heads * hd),
            p + "feed_forward.w1.weight": r(hidden, dim),
            p + "feed_forward.w2.weight": r(dim, hidden),
            p + "feed_forward.w3.weight": r(hidden, dim),
            p + "attention_norm.weight": 1 + 0.1 * r(dim, scale=1.0),
            p + "ffn_norm.weight": 1 + 0.1 * r(dim, scale=1.0),
        }
    return sd


def meta_to_hf_state(sd: dict, params: dict) -> dict[str, torch.Tensor]:
    """Meta names/layout -> HF names/layout, as HF's conversion script does."""
    heads = params["n_heads"]
    kv = params.get("n_kv_heads") or heads
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if "output.weight" in sd:
        out["lm_head.weight"] = sd["output.weight"]
    for i in range(params["n_layers"]):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        out |= {
            h + "self_attn.q_proj.weight": hf_permute(sd[m + "attention.wq.weight"], heads),
            h + "self_attn.k_proj.weight": hf_permute(sd[m + "attention.wk.weight"], kv),
            h + "self_attn.v_proj.weight": sd[m + "attention.wv.weight"],
            h + "self_attn.o_proj.weight": sd[m + "attention.wo.weight"],
            h + "mlp.gate_proj.weight": sd[m + "feed_forward.w1.weight"],
            h + "mlp.down_proj.weight": sd[m + "feed_forward.w2.weight"],
            h + "mlp.up_proj.weight": sd[m + "feed_forward.w3.weight"],
            h + "input_layernorm.weight": sd[m + "attention_norm.weight"],
            h + "post_attention_layernorm.weight": sd[m + "ffn_norm.weight"],
        }
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(params: dict, vocab: int, tie: bool) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": params["dim"],
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": params["n_heads"],
        "num_key_value_heads": params.get("n_kv_heads") or params["n_heads"],
        "intermediate_size": meta_hidden_dim(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")),
        "vocab_size": vocab,
        "rms_norm_eps": params["norm_eps"],
        "rope_theta": params.get("rope_theta", 10000.0),
        "max_position_embeddings": 256,
        "tie_word_embeddings": tie,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        **({"rope_scaling": {"rope_type": "llama3", "factor": params.get("rope_scaling_factor", 8.0),
                             "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
           if params.get("use_scaled_rope") else {}),
    }


def meta_split_dim(name: str) -> int | None:
    """Model-parallel split of Meta's LLaMA-2 checkpoints: None = replicated."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")):
        return 1
    return 0


def write_meta(dirpath: Path, sd: dict, params: dict, shards: int = 1, fmt: str = "safetensors"):
    from safetensors.torch import save_file

    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "params.json").write_text(json.dumps(params))
    for s in range(shards):
        part = {}
        for k, v in sd.items():
            d = meta_split_dim(k)
            part[k] = v.clone() if d is None or shards == 1 else v.chunk(shards, dim=d)[s].clone()
        name = dirpath / f"consolidated.{s:02d}.{'safetensors' if fmt == 'safetensors' else 'pth'}"
        if fmt == "safetensors":
            save_file(part, str(name))
        else:
            torch.save(part, name)


def write_hf(dirpath: Path, sd: dict, params: dict, vocab: int, tie: bool, shards: int = 1):
    """HF layout written by hand (safetensors + index), independent of transformers."""
    from safetensors.torch import save_file

    dirpath.mkdir(parents=True, exist_ok=True)
    hf = meta_to_hf_state(sd, params)
    (dirpath / "config.json").write_text(json.dumps(hf_config(params, vocab, tie)))
    if shards == 1:
        save_file(hf, str(dirpath / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(hf)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: hf[k] for k in keys[s::shards]}
        save_file(part, str(dirpath / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in part}
    (dirpath / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def tiny_llama(dirpath: Path, params: dict) -> Path:
    """A random LLaMA of `params` in HF layout (vocab 32000, tied) with LLaMA-2's real tokenizer beside it."""
    import shutil

    write_hf(dirpath, random_meta_state(params, 32000, tie=True), params, 32000, tie=True)
    shutil.copy(need_shared(TOKENIZERS / "llama2_tokenizer.model"), dirpath / "tokenizer.model")
    return dirpath
