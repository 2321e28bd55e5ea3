"""int8: quantization bounds, Triton kernels (interpreted) and the CPU path against the plain-torch
references, gradients against the dequantized float linear, LoRA over an int8 base, SmolLM2 accuracy."""
import json
import math

import pytest
import torch
from torch import nn

from conftest import DATA, need_shared
from lora_core.kernels import cpu, reference as ref
from lora_core.kernels.int8_linear import int8_linear
from lora_core.lora import LoRALinear
from lora_core.quant import Int8Linear

SHAPES = [(1, 37, 50), (5, 123, 77), (123, 64, 129), (16, 96, 33)]  # (M, K, N): odd, not block multiples


@pytest.fixture(scope="module")
def triton_ops():
    pytest.importorskip("triton")
    from lora_core.kernels import triton_int8

    assert triton_int8.interpreting(), "tests run Triton in its interpreter (TRITON_INTERPRET=1 from conftest)"
    return triton_int8


def data(M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 2
    x[0, 0] = 0.0
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    return x, w, torch.randn(N, generator=g)


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_quantize_error_bound(M, K, N):
    x, _, _ = data(M, K, N)
    q, s = ref.quantize_rowwise(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (ref.dequantize_rowwise(q, s) - x).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()  # at most half a step of the row's scale
    zeros = ref.quantize_rowwise(torch.zeros(3, K))
    assert torch.equal(zeros[0], torch.zeros(3, K, dtype=torch.int8))  # no NaN for an all-zero row


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_kernels_equal_reference(M, K, N, backend, request):
    ops = cpu if backend == "cpu" else request.getfixturevalue("triton_ops")
    x, w, b = data(M, K, N)
    q, s = ops.quantize_rowwise(x)
    qr, sr = ref.quantize_rowwise(x)
    assert torch.equal(q, qr)
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    qw, sw = ref.quantize_rowwise(w)
    for bias in (None, b):
        torch.testing.assert_close(ops.int8_matmul(qr, sr, qw, sw, bias), ref.int8_matmul(qr, sr, qw, sw, bias),
                                   rtol=1e-5, atol=1e-5)
    bf = ops.int8_matmul(qr, sr, qw, sw, b, out_dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), ref.int8_matmul(qr, sr, qw, sw, b), rtol=1e-2, atol=1e-2)
    g = torch.randn(M, N)
    torch.testing.assert_close(ops.grad_input(g, qw, sw), ref.grad_input(g, qw, sw), rtol=1e-5, atol=1e-5)


def test_cpu_backward_spans_several_row_blocks(monkeypatch):
    monkeypatch.setattr(cpu, "BACKWARD_ROWS", 7)
    qw, sw = ref.quantize_rowwise(torch.randn(30, 11))
    g = torch.randn(4, 30)
    torch.testing.assert_close(cpu.grad_input(g, qw, sw), ref.grad_input(g, qw, sw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_int8_linear_gradient_equals_dequantized_float(backend, threshold, request):
    if backend == "triton":
        request.getfixturevalue("triton_ops")
    x, w, _ = data(2 * 7, 45, 29)
    layer = Int8Linear.from_float(w)
    x = x.view(2, 7, 45).requires_grad_()
    y = int8_linear(x, layer.qweight, layer.scale, None, backend, threshold)
    gy = torch.randn_like(y)
    y.backward(gy)
    xf = x.detach().clone().requires_grad_()
    yf = xf @ layer.dequantize().t()
    yf.backward(gy)
    torch.testing.assert_close(x.grad, xf.grad, rtol=1e-5, atol=1e-5)  # the backward uses the exact int8 weight
    # the forward differs from the float product only by the activation quantization
    rel = (y - yf).norm() / yf.norm()
    assert rel < 0.02, rel
    assert not layer.qweight.requires_grad


def test_outlier_features_stay_in_float():
    x, w, _ = data(6, 40, 20)
    x[:, 3] = 50.0  # an outlier feature, as LLM.int8 describes them
    layer = Int8Linear.from_float(w)
    exact = x @ layer.dequantize().t()
    with_split = int8_linear(x, layer.qweight, layer.scale, threshold=6.0)
    without = int8_linear(x, layer.qweight, layer.scale, threshold=0.0)
    assert (with_split - exact).abs().max() < (without - exact).abs().max() / 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_over_int8_base(dtype):
    _, w, _ = data(1, 40, 24)
    base = Int8Linear.from_float(w)
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


def test_smollm2_int8_perplexity_within_two_percent(smollm2, smollm2_path):
    import lora_core

    model, tok = smollm2
    int8, _ = lora_core.load(smollm2_path, dtype="int8")
    assert isinstance(int8.layers[3].mlp.down_proj, Int8Linear)
    assert int8.embed_tokens.weight.dtype == torch.float32
    rows = json.loads(need_shared(DATA / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:60]
    seqs = [s for s in (tok.encode(r["output"])[:256] for r in rows) if len(s) > 8]
    p32, p8 = perplexity(model, seqs), perplexity(int8, seqs)
    print(f"\nSmolLM2 perplexity on {len(seqs)} alpaca_en outputs: fp32 {p32:.4f}, int8 {p8:.4f} ({p8 / p32 - 1:+.2%})")
    assert p8 / p32 - 1 < 0.02
    prompt = tok.encode("The capital of France is")
    with torch.no_grad():
        assert model(torch.tensor([prompt]))[0, -1].argmax() == int8(torch.tensor([prompt]))[0, -1].argmax()


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


@pytest.mark.parametrize("M,K,N", [(1, 64, 50), (5, 576, 77), (7, 96, 129)])
def test_cpu_decode_path_is_weight_only(M, K, N):
    """Few rows take the weight-only kernel: close to the dequantized float linear, activations unquantized."""
    x, w, b = data(M, K, N)
    assert cpu.weight_only_applies(x)
    layer = Int8Linear.from_float(w)
    exact = x @ layer.dequantize().t() + b
    got = int8_linear(x, layer.qweight, layer.scale, b)
    torch.testing.assert_close(got, cpu.weight_only_matmul(x, layer.qweight, layer.scale, b))
    assert ((got - exact).norm() / exact.norm()) < 5e-3  # bf16 rounding of the activations only
    assert not cpu.weight_only_applies(torch.zeros(8, K)) and not cpu.weight_only_applies(torch.zeros(1, 40))
