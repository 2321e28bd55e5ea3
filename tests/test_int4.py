"""The int4 base (lora_core.int4): torch's int4 CPU kernel against the plain-torch dequantized weight, the
quantization grid, the int8 fallback for shapes the kernel cannot take, and SmolLM2's perplexity in int4."""
import json

import pytest
import torch
from test_int8 import perplexity

from lora_core.int4 import Int4Linear, dequantize_int4, int4_or_int8, quantize_int4
from lora_core.quant import Int8Linear

from helpers import DATA, need_shared


@pytest.mark.parametrize("N,K,group", [(48, 96, 32), (176, 640, 64), (16, 256, 128), (64, 512, 256)])
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 7)])
def test_int4_linear_equals_dequantized_reference(N, K, group, lead):
    w = torch.randn(N, K) / K ** 0.5
    layer = Int4Linear.from_float(w, group)
    q, scale, zero = quantize_int4(w, group)
    ref_w = dequantize_int4(q, scale, zero, group)  # (N, K) fp32, plain torch
    x = torch.randn(*lead, K)
    y = layer(x)
    assert y.shape == (*lead, N)
    torch.testing.assert_close(y, x @ ref_w.t(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.dequantize(), ref_w, atol=1e-5, rtol=1e-5)


def test_quantization_grid():
    """Each group's values land within half a step of the original, its min and max exactly on the grid."""
    w = torch.randn(32, 128)
    q, scale, zero = quantize_int4(w, 32)
    assert q.min() >= 0 and q.max() <= 15
    err = (dequantize_int4(q, scale, zero, 32) - w).reshape(32, 4, 32).abs()
    assert (err <= scale[..., None] / 2 + 1e-6).all()
    g = w.reshape(32, 4, 32)
    torch.testing.assert_close(zero - 8 * scale, g.amin(-1), atol=1e-6, rtol=0)  # q = 0 is the group minimum


def test_shapes_the_kernel_cannot_take_stay_int8(capsys):
    import lora_core.int4 as int4

    int4._noted.clear()
    assert isinstance(int4_or_int8(torch.randn(100, 64)), Int8Linear)  # out_features not a multiple of 16
    assert isinstance(int4_or_int8(torch.randn(100, 64)), Int8Linear)
    assert isinstance(int4_or_int8(torch.randn(32, 40)), Int8Linear)  # in_features not a multiple of 32
    assert isinstance(int4_or_int8(torch.randn(32, 64)), Int4Linear)
    assert capsys.readouterr().err.splitlines() == [
        "lora-core: int4 cannot take 100 x 64 weights (out_features 100 is not a multiple of 16); those layers "
        "stay int8",
        "lora-core: int4 cannot take 32 x 40 weights (in_features 40 is not a multiple of the group size 32); "
        "those layers stay int8"]
    with pytest.raises(ValueError, match=r"int4 weight \(100 x 64\): out_features 100 is not a multiple of 16"):
        Int4Linear.from_float(torch.randn(100, 64))


def test_int4_base_is_for_generation_only(tiny_base):
    import lora_core
    from lora_core.api import check_base_dtype

    model, tok = lora_core.load(tiny_base, dtype="int4")
    assert isinstance(model.layers[0].self_attn.q_proj, Int4Linear)
    assert isinstance(model.lm_head_int8, Int8Linear)
    with pytest.raises(ValueError, match="^base dtype 'int4' is for generation only"):
        check_base_dtype("int4", training=True)


def test_smollm2_int4_perplexity_within_five_percent(smollm2, smollm2_path):
    """20 held-out alpaca_en outputs (first 128 tokens each): int4 (group 32) perplexity within 5% of fp32."""
    import lora_core
    from lora_core.generation import generate
    from lora_core.sampling import Sampling

    model, tok = smollm2
    int4, _ = lora_core.load(smollm2_path, dtype="int4")
    assert isinstance(int4.layers[3].mlp.down_proj, Int4Linear)
    rows = json.loads(need_shared(DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[100:120]
    seqs = [s for s in (tok.encode(r["output"])[:128] for r in rows) if len(s) > 8]
    p32, p4 = perplexity(model, seqs), perplexity(int4, seqs)
    print(f"\nSmolLM2 perplexity on {len(seqs)} alpaca_en outputs: fp32 {p32:.4f}, int4 {p4:.4f} ({p4 / p32 - 1:+.2%})")
    assert abs(p4 / p32 - 1) < 0.05
    g = generate(int4, tok, tok.encode("The capital of France is"), Sampling(0, 0, 1.0, 1.0), 4)
    assert g.text.startswith(" Paris"), g.text


def test_generate_cli_with_an_int4_base(tiny_base, capsys):
    from lora_core.cli import generate as generate_cli

    from helpers import run_cli

    code, out, err = run_cli(generate_cli.main, ["--base", tiny_base, "--base-dtype", "int4", "--raw", "--prompt",
                                                 "Hello", "--temperature", "0", "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    assert "decode" in err.splitlines()[-1]
