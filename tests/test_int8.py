"""The int8 base: LoRA over an Int8Linear, SmolLM2 loaded in int8 (accuracy, with an adapter).
The kernels and their dispatch are tested in test_int8_paths.py."""
import json
import math

import pytest
import torch
from torch import nn

from lora_core.lora import LoRALinear
from lora_core.quant import Int8Linear

from helpers import DATA, need_shared


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_over_int8_base(dtype):
    base = Int8Linear.from_float(torch.randn(24, 40) / math.sqrt(40))
    layer = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(3, 5, 40, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and torch.equal(y, base(x))  # B = 0: exactly the base
    nn.init.normal_(layer.lora_B)
    layer(x).float().square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and x.grad is not None
    with pytest.raises(ValueError, match="merging needs a float base"):
        layer.merge()


def perplexity(model, seqs):
    nll = n = 0
    with torch.no_grad():
        for s in seqs:
            x = torch.tensor([s])
            logp = torch.log_softmax(model(x)[0, :-1], -1)
            nll -= logp.gather(1, x[0, 1:, None]).sum().item()
            n += len(s) - 1
    return math.exp(nll / n)


@pytest.mark.parametrize("path", ["int_mm", "dequant"])  # activations quantized / weight-only
def test_smollm2_int8_perplexity_within_two_percent(smollm2, smollm2_path, path):
    """A small version of tests/benchmarks/test_int8_accuracy.py (60 sequences, every path)."""
    import lora_core
    from lora_core.kernels import dispatch

    why = dispatch.why_unavailable(path)
    if why:
        pytest.skip(f"{path}: {why}")
    model, tok = smollm2
    int8, _ = lora_core.load(smollm2_path, dtype="int8")
    assert isinstance(int8.layers[3].mlp.down_proj, Int8Linear)
    assert int8.embed_tokens.weight.dtype == torch.float32
    rows = json.loads(need_shared(DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:12]
    seqs = [s for s in (tok.encode(r["output"])[:128] for r in rows) if len(s) > 8]
    with dispatch.forcing(path):
        p32, p8 = perplexity(model, seqs), perplexity(int8, seqs)
        prompt = torch.tensor([tok.encode("The capital of France is")])
        with torch.no_grad():
            assert model(prompt)[0, -1].argmax() == int8(prompt)[0, -1].argmax()
    print(f"\nSmolLM2 perplexity on {len(seqs)} alpaca_en outputs: fp32 {p32:.4f}, int8 {path} {p8:.4f} "
          f"({p8 / p32 - 1:+.2%})")
    assert p8 / p32 - 1 < 0.02


def test_load_int8_with_adapter(smollm2, smollm2_path, tmp_path):
    """load(dtype="int8", adapter=...) puts exactly the saved LoRA tensors over the int8 base."""
    import lora_core
    from lora_core.adapter import save_adapter
    from lora_core.lora import apply_lora, lora_state_dict

    donor, tok = lora_core.load(smollm2_path)
    apply_lora(donor, "q_proj,v_proj", r=4, alpha=8)
    torch.manual_seed(0)
    for m in donor.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.05)
    save_adapter(donor, tmp_path / "ad", base_name="smollm2-135m")
    model, _ = lora_core.load(smollm2_path, dtype="int8", adapter=tmp_path / "ad")
    assert isinstance(model.layers[0].self_attn.q_proj, LoRALinear)
    assert isinstance(model.layers[0].self_attn.q_proj.base, Int8Linear)
    ours, theirs = lora_state_dict(model), lora_state_dict(donor)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    base8, _ = lora_core.load(smollm2_path, dtype="int8")
    x = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        assert (model(x) - base8(x)).abs().max() > 0.5  # the adapter changes the int8 model's output
