"""The int4 base (lora_core.int4): our C kernel against a plain-torch reference of its arithmetic (activations
quantized per 32, exact integer dot products), the GEMM path against the dequantized weight, the packing, the
quantization grid, the int8 fallback for shapes int4 cannot take, and SmolLM2's perplexity in int4."""
import json
import math

import pytest
import torch
from test_int8 import perplexity

from lora_core import int4 as int4_module
from lora_core.int4 import Int4Linear, dequantize_int4, int4_or_int8, pack, quantize_int4, unpack
from lora_core.kernels import cpu_info, native
from lora_core.kernels.reference import quantize_rowwise
from lora_core.quant import Int8Linear

from helpers import DATA, need_shared

needs_kernel = pytest.mark.skipif(native.decode_library()[0] is None,
                                  reason=f"the C int4 kernel: {native.decode_library()[1]}")


def kernel_reference(x: torch.Tensor, layer: Int4Linear) -> torch.Tensor:
    """What the kernel computes, in float64: x quantized per 32 (kernels.reference's rounding); per 32-block,
    scale * x_scale * (q . x_q) + lo * sum(x)."""
    M, K = x.shape
    xq, xs = quantize_rowwise(x.reshape(-1, 32))
    xq, xs = xq.reshape(M, K // 32, 32).double(), xs.reshape(M, K // 32).double()
    xsum = x.reshape(M, K // 32, 32).double().sum(-1)
    q = unpack(layer.packed).reshape(layer.out_features, K // 32, 32).double()
    per = layer.group // 32
    s, lo = (t.double().repeat_interleave(per, 1) for t in (layer.scale, layer.lo))  # (N, K/32)
    dots = torch.einsum("mbi,nbi->mnb", xq, q)
    return (dots * s[None] * xs[:, None] + lo[None] * xsum[:, None]).sum(-1)


@needs_kernel
@pytest.mark.parametrize("N,K,group", [(48, 96, 32), (176, 640, 64), (17, 256, 128), (64, 512, 256), (5, 32, 32)])
@pytest.mark.parametrize("M", [1, 3, 9, 64])
def test_int4_kernel_equals_reference_of_its_arithmetic(N, K, group, M):
    w = torch.randn(N, K) / K ** 0.5
    layer = Int4Linear.from_float(w, group)
    x = torch.randn(M, K)
    x[0, :7] *= 40  # a block with outliers: its own activation scale
    y = layer(x)
    ref = kernel_reference(x, layer)
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 2e-6


@needs_kernel
def test_int4_vnni_and_avx2_kernels_agree_bit_for_bit(monkeypatch):
    if native.dot_isa() != native.ISA_VNNI:
        pytest.skip(f"needs AVX-512 VNNI to compare with AVX2; this CPU: {cpu_info.flags_summary()}")
    layer = Int4Linear.from_float(torch.randn(100, 320), 64)
    x = torch.randn(5, 320)
    vnni = layer(x)
    monkeypatch.setattr(native, "dot_isa", lambda: native.ISA_AVX2)
    assert torch.equal(layer(x), vnni)


@pytest.mark.parametrize("N,K,group", [(48, 96, 32), (176, 640, 64), (4100, 64, 32)])
@pytest.mark.parametrize("lead", [(129,), (2, 70)])
def test_int4_gemm_path_equals_dequantized_reference(N, K, group, lead):
    """More rows than the kernel takes: blocks of dequantized rows (4100: more than one block) and an fp32 GEMM."""
    w = torch.randn(N, K) / K ** 0.5
    layer = Int4Linear.from_float(w, group)
    q, scale, lo = quantize_int4(w, group)
    ref_w = dequantize_int4(q, scale, lo, group)  # (N, K) fp32, plain torch
    torch.testing.assert_close(layer.dequantize(), ref_w, atol=0, rtol=0)
    x = torch.randn(*lead, K)
    y = layer(x)
    assert y.shape == (*lead, N)
    torch.testing.assert_close(y, x @ ref_w.t(), atol=1e-4, rtol=1e-4)


def test_pack_round_trip_and_layout():
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack(q)
    assert packed.shape == (3, 32) and torch.equal(unpack(packed), q)
    assert int(packed[1, 17]) == int(q[1, 33]) | int(q[1, 49]) << 4  # second block: j low, 16 + j high


def test_quantization_grid():
    """Each group's values land within half a step of the original, its minimum exactly on the grid."""
    w = torch.randn(32, 128)
    q, scale, lo = quantize_int4(w, 32)
    assert q.min() >= 0 and q.max() <= 15
    err = (dequantize_int4(q, scale, lo, 32) - w).reshape(32, 4, 32).abs()
    assert (err <= scale[..., None] / 2 + 1e-6).all()
    torch.testing.assert_close(lo, w.reshape(32, 4, 32).amin(-1), atol=0, rtol=0)  # q = 0 is the group minimum


def test_shapes_int4_cannot_take_stay_int8(capsys):
    int4_module._noted.clear()
    assert isinstance(int4_or_int8(torch.randn(32, 40)), Int8Linear)  # in_features not a multiple of 32
    assert isinstance(int4_or_int8(torch.randn(32, 40)), Int8Linear)
    assert isinstance(int4_or_int8(torch.randn(100, 64)), Int4Linear)  # any out_features
    assert capsys.readouterr().err.splitlines() == [
        "lora-core: int4 cannot take 32 x 40 weights (in_features 40 is not a multiple of the group size 32); "
        "those layers stay int8"]
    with pytest.raises(ValueError, match=r"int4 weight \(32 x 40\): in_features 40 is not a multiple"):
        Int4Linear.from_float(torch.randn(32, 40))


def test_int4_base_is_for_generation_only(tiny_base):
    import lora_core
    from lora_core.api import check_base_dtype

    model, tok = lora_core.load(tiny_base, dtype="int4")
    assert isinstance(model.layers[0].self_attn.q_proj, Int4Linear)
    assert isinstance(model.lm_head_int8, Int8Linear)
    with pytest.raises(ValueError, match="^base dtype 'int4' is for generation only"):
        check_base_dtype("int4", training=True)


def decoded_perplexity(model, seqs):
    """perplexity() as generation computes it: each sequence fed one token at a time through the static decoder
    (the C step, with its packed copies where the CPU has VNNI)."""
    from lora_core.fast_decode import StaticDecoder
    from lora_core.generation import output_head
    d = StaticDecoder(model, output_head(model))
    nll = n = 0
    with torch.no_grad():
        for s in seqs:
            d.begin(1, len(s))
            logits = d.prefill(torch.tensor([s[:1]]))
            for t in range(1, len(s)):
                nll -= torch.log_softmax(logits[0], -1)[s[t]].item()
                logits = d.step(torch.tensor([[s[t]]]), torch.tensor([[t]]))
            n += len(s) - 1
    return math.exp(nll / n)


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
    p32, p4, p4_step = perplexity(model, seqs), perplexity(int4, seqs), decoded_perplexity(int4, seqs)
    print(f"\nSmolLM2 perplexity on {len(seqs)} alpaca_en outputs: fp32 {p32:.4f}, int4 {p4:.4f} "
          f"({p4 / p32 - 1:+.2%}), int4 token by token through the decode step {p4_step:.4f} "
          f"({p4_step / p32 - 1:+.2%})")
    assert abs(p4 / p32 - 1) < 0.05
    assert abs(p4_step / p32 - 1) < 0.05
    g = generate(int4, tok, tok.encode("The capital of France is"), Sampling(0, 0, 1.0, 1.0), 4)
    assert g.text.startswith(" Paris"), g.text


def test_generate_cli_with_an_int4_base(tiny_base, capsys):
    from lora_core.cli import generate as generate_cli

    from helpers import run_cli

    code, out, err = run_cli(generate_cli.main, ["--base", tiny_base, "--base-dtype", "int4", "--raw", "--prompt",
                                                 "Hello", "--temperature", "0", "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    assert "decode" in err.splitlines()[-1]
