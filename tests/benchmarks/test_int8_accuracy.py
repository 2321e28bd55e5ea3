"""SmolLM2 with an int8 base against fp32: perplexity on real text and greedy answers, for the LLM.int8
outlier threshold used by default, no outlier split, and weight-only int8 (activations in float)."""
import json

import pytest
import torch
from helpers import DATA, need_shared

from lora_core.quant import Int8Linear

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
    import lora_core

    fp32, tok = smollm2
    rows = json.loads(need_shared(DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:60]
    seqs = [s for s in (tok.encode(r["output"])[:256] for r in rows) if len(s) > 8]
    int8, _ = lora_core.load(smollm2_path, dtype="int8")
    ref_ppl = perplexity(fp32, seqs)
    ref_answers = [greedy(fp32, tok.encode(p)) for p in PROMPTS]
    print(f"\nSmolLM2-135M, {sum(len(s) - 1 for s in seqs)} predicted tokens of {len(seqs)} alpaca_en outputs; "
          f"greedy: {len(PROMPTS)} prompts x 24 tokens")
    print(f"{'base':<34}{'perplexity':>11}{'vs fp32':>9}{'same greedy tokens':>20}")
    print(f"{'fp32':<34}{ref_ppl:>11.4f}{'':>9}{'':>20}")
    variants = [("int8, outliers |x|>6 in float", 6.0), ("int8, no outlier split", 0.0), ("int8 weight-only", None)]
    for label, threshold in variants:
        if threshold is None:
            monkeypatch.setattr(Int8Linear, "forward", lambda self, x: x @ self.dequantize().t().to(x.dtype))
        else:
            monkeypatch.setattr(Int8Linear, "threshold", threshold)
        p = perplexity(int8, seqs)
        # greedy() re-runs the whole sequence each step (no KV cache): the quantized-activation path for M >= 8
        same = sum(a == b for ref, got in zip(ref_answers, (greedy(int8, tok.encode(q)) for q in PROMPTS))
                   for a, b in zip(ref, got))
        print(f"{label:<34}{p:>11.4f}{p / ref_ppl - 1:>+9.2%}{same:>14}/{24 * len(PROMPTS)}")
