"""SmolLM2 with an int8 base against fp32: perplexity on real text and greedy answers, for the LLM.int8
outlier threshold used by default, no outlier split, and weight-only int8 (activations in float)."""
import json

import pytest
import torch

from lora_core.quant import Int8Linear

from helpers import DATA, need_shared

pytestmark = pytest.mark.benchmark
PROMPTS = ["The capital of France is", "List three primary colors:", "What is the boiling point of water?",
           "中国的首都是", "def add(a, b):"]


def perplexity(model, seqs):
    from test_int8 import perplexity as ppl

    return ppl(model, seqs)


def greedy(model, ids, n=24):
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x)[:, -1:].argmax(-1)], 1)
    return x[0, len(ids):].tolist()


def test_int8_accuracy_table(smollm2, smollm2_path, monkeypatch):
    """Perplexity and greedy agreement for every int8 path, forced one at a time (the dispatcher picks by
    speed; this says what each choice costs in accuracy)."""
    import lora_core
    from lora_core.kernels import cpu_info, dispatch

    fp32, tok = smollm2
    rows = json.loads(need_shared(DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:60]
    seqs = [s for s in (tok.encode(r["output"])[:256] for r in rows) if len(s) > 8]
    int8, _ = lora_core.load(smollm2_path, dtype="int8")
    ref_ppl = perplexity(fp32, seqs)
    ref_answers = [greedy(fp32, tok.encode(p)) for p in PROMPTS]
    print(f"\nSmolLM2-135M on {cpu_info.describe()}")
    print(f"{sum(len(s) - 1 for s in seqs)} predicted tokens of {len(seqs)} alpaca_en outputs; "
          f"greedy: {len(PROMPTS)} prompts x 24 tokens")
    print(f"{'base':<44}{'perplexity':>11}{'vs fp32':>9}{'same greedy tokens':>20}")
    print(f"{'fp32':<44}{ref_ppl:>11.4f}{'':>9}{'':>20}")
    variants = [("int_mm: activations int8, outliers |x|>6 float", "int_mm", 6.0),
                ("int_mm: activations int8, no outlier split", "int_mm", 0.0),
                ("dequant: weight-only, fp32 activations", "dequant", None),
                ("gemv: weight-only, fp32 activations", "gemv", None),
                ("weight_only: weight-only, bf16 activations", "weight_only", None)]
    for label, path, threshold in variants:
        why = dispatch.why_unavailable(path)
        if why:
            print(f"{label:<44}  not run: {why}")
            continue
        if threshold is not None:
            monkeypatch.setattr(Int8Linear, "threshold", threshold)
        with dispatch.forcing(f"forward={path}"):
            p = perplexity(int8, seqs)
            # greedy() re-runs the whole sequence each step (no KV cache), so every M goes through the path
            same = sum(a == b for ref, got in zip(ref_answers, (greedy(int8, tok.encode(q)) for q in PROMPTS))
                       for a, b in zip(ref, got))
        print(f"{label:<44}{p:>11.4f}{p / ref_ppl - 1:>+9.2%}{same:>14}/{24 * len(PROMPTS)}")
