"""Peak RSS of loading SmolLM2-135M, from its GGUF and from an HF safetensors copy, in fp32 and bf16.

Each load runs in a fresh process; the table shows peak RSS after imports (the baseline), after
loading, and the growth as a multiple of the weights' own size (1.0 would be no overhead at all).
Peak RSS counts pages of the memory-mapped weight files, which the kernel can drop; the last two
columns split the resident set after loading into anonymous memory and such file pages.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import hf_permute

pytestmark = pytest.mark.benchmark
CHILD = Path(__file__).with_name("load_rss_child.py")


def write_hf_copy(model, out: Path):
    """Our in-memory SmolLM2 as an fp32 HF checkpoint (q/k permuted back to HF's layout)."""
    from safetensors.torch import save_file

    a = model.args
    sd = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and a.tie_embeddings:
            continue
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            t = hf_permute(t, a.n_heads if "q_proj" in name else a.n_kv_heads)
        sd[name if name == "lm_head.weight" else "model." + name] = t.contiguous()
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": a.dim, "num_hidden_layers": a.n_layers,
        "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "intermediate_size": a.hidden_dim,
        "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
        "max_position_embeddings": a.max_seq_len, "tie_word_embeddings": a.tie_embeddings,
    }))


def measure(base, dtype, runs=3):
    rows = []
    for _ in range(runs):
        r = subprocess.run([sys.executable, str(CHILD), str(base), dtype], capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    rows.sort(key=lambda x: x["after"])
    return rows[len(rows) // 2]  # median run by peak


def test_load_peak_rss(smollm2, smollm2_path, tmp_path):
    model, tok = smollm2
    hf_dir = tmp_path / "smollm2-hf"
    write_hf_copy(model, hf_dir)
    tok.tok.save(str(hf_dir / "tokenizer.json"))  # the HF copy needs a tokenizer beside it
    print(f"\nPeak RSS loading SmolLM2-135M (median of 3 fresh processes; torch {torch.__version__})")
    print(f"{'source':<22}{'dtype':<7}{'baseline MiB':>13}{'peak MiB':>10}{'growth MiB':>11}{'weights MiB':>12}"
          f"{'growth/weights':>15}{'load s':>8}{'anon MiB':>10}{'mapped MiB':>11}")
    for label, base in (("GGUF Q4_1 (dequant)", smollm2_path), ("HF safetensors fp32", hf_dir)):
        for dtype in ("fp32", "bf16"):
            m = measure(base, dtype)
            growth = m["after"] - m["before"]
            print(f"{label:<22}{dtype:<7}{m['before']:>13.0f}{m['after']:>10.0f}{growth:>11.0f}{m['weights']:>12.0f}"
                  f"{growth / m['weights']:>15.2f}{m['seconds']:>8.2f}{m['anon']:>10.0f}{m['file']:>11.0f}")
