"""The static decode step (lora_core.fast_decode): eager and compiled against the plain model's full forward,
the int8 layers' traceable form against their dequantized weights, and the eager fallback when compiling fails."""
import pytest
import torch
from test_kv_cache import tiny

from lora_core import fast_decode
from lora_core.batch_generation import generate_batch, left_pad
from lora_core.data import ALPACA
from lora_core.fast_decode import StaticDecoder, attend, decode_step, linear
from lora_core.generation import generate
from lora_core.quant import Int8Linear, quantize_model
from lora_core.sampling import Sampling

GREEDY = Sampling(0, 0, 1.0, 1.0)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(6, 6), (6, 2), (6, 1)])
def test_attend_equals_sdpa(n_heads, n_kv_heads):
    B, S, hd = 3, 37, 8
    q = torch.randn(B, n_heads, 1, hd)
    k, v = torch.randn(B, n_kv_heads, S, hd), torch.randn(B, n_kv_heads, S, hd)
    mask = torch.rand(B, 1, 1, S) > 0.3
    mask[..., 0] = True
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(attend(q, k, v, mask), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [6, 2, 1])
def test_static_steps_equal_full_forward(kv_heads):
    """Prefill 5 tokens, then one step per token into a 256-slot cache: the logits of the full forward."""
    model = tiny(n_kv_heads=kv_heads)
    tokens = torch.randint(0, 97, (3, 13))
    d = StaticDecoder(model, model.lm_head)
    with torch.no_grad():
        full = model(tokens)
        d.begin(3, 13)
        logits = [d.prefill(tokens[:, :5])]
        positions = torch.arange(5, 13)[None, :].expand(3, -1)
        logits += [d.step(tokens[:, t:t + 1], positions[:, t - 5:t - 4]) for t in range(5, 13)]
    assert d.cache.max_len == fast_decode.CACHE_BUCKET
    torch.testing.assert_close(torch.stack(logits, 1), full[:, 4:], atol=1e-5, rtol=1e-5)


def test_static_steps_on_left_padded_rows_equal_each_row_alone():
    model = tiny(n_kv_heads=2)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    tokens, mask, positions = left_pad(prompts, 0)
    d = StaticDecoder(model, model.lm_head)
    nxt = torch.tensor([[20], [21], [22]])
    with torch.no_grad():
        d.begin(3, tokens.shape[1] + 2)
        d.prefill(tokens, mask, positions)
        batched = d.step(nxt, positions[:, -1:] + 1)
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p + [20 + i]]))[0, -1]
            torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantize", [False, True])
def test_fused_projections_equal_separate_layers_and_follow_changes(quantize):
    """q|k|v and gate|up as one GEMM: the same logits; the separate layers now read slices of the fused weight
    (no copy); a LoRA layer put in afterwards is seen (that block unfused), never a stale fused weight."""
    from lora_core.lora import apply_lora

    model = tiny(n_kv_heads=2, dim=96, hidden_dim=128)
    if quantize:
        model = quantize_model(model)
    tokens = torch.randint(0, 97, (2, 7))

    def last_logits(fuse):
        d = StaticDecoder(model, model.lm_head, fuse=fuse)
        with torch.no_grad():
            d.begin(2, 7)
            d.prefill(tokens[:, :6])
            return d.step(tokens[:, 6:], torch.full((2, 1), 6)), d

    plain, _ = last_logits(False)
    fused, d = last_logits(True)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    qkv, gate_up = d.fused[0]
    q = model.layers[0].self_attn.q_proj
    w, part = (qkv.qweight, q.qweight) if quantize else (qkv.weight, q.weight)
    assert part.data_ptr() == w.data_ptr() and gate_up.out_features == 2 * 128
    if not quantize:
        apply_lora(model, ["q_proj"], r=2, alpha=4)
        torch.nn.init.normal_(model.layers[0].self_attn.q_proj.lora_B)
        adapted, d = last_logits(True)
        assert d.fused[0][0] is None and d.fused[0][1] is not None
        torch.testing.assert_close(adapted, last_logits(False)[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(adapted, plain)


@pytest.mark.parametrize("K", [96, 40])  # weight-only int8 kernel (K % 32 == 0); dequantized in the graph
def test_traced_int8_linear_equals_dequantized_weight(K):
    layer = Int8Linear.from_float(torch.randn(48, K) / K ** 0.5)
    x = torch.randn(5, K)
    ref = x @ layer.dequantize().t()
    out = linear(layer, x, traced=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_traced_step_equals_eager_step_on_int8():
    """decode_step with traced=True (what torch.compile sees) against the eager int8 dispatch, no compiler."""
    model = quantize_model(tiny(n_kv_heads=2, dim=96, hidden_dim=128))
    tokens = torch.randint(0, 97, (2, 6))
    outs = []
    with torch.no_grad():
        for traced in (False, True):
            d = StaticDecoder(model, model.lm_head)
            d.begin(2, 7)
            d.prefill(tokens)
            c = d.cache
            slot = torch.tensor([c.pos])
            outs.append(decode_step(model, model.lm_head, c.k, c.v, torch.tensor([[1], [2]]), slot,
                                    torch.full((2, 1), 6), d.key_valid, d.rope, traced=traced))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-2, rtol=2e-2)
    assert (outs[1].argmax(-1) == outs[0].argmax(-1)).all()


def test_compile_failure_falls_back_to_eager(smollm2, monkeypatch, capsys):
    model, tok = smollm2
    ids = tok.encode("The capital of France is")

    def broken(*args):
        raise RuntimeError("no C++ compiler here (forced by the test)")

    monkeypatch.setattr(fast_decode, "compiled_step", lambda: broken)
    monkeypatch.delattr(model, "_static_decoder", raising=False)
    g = generate(model, tok, ids, GREEDY, 8, compile=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lora-core: torch.compile of the decode step failed (RuntimeError: no C++ compiler here (forced "
                   "by the test)); decoding eagerly"]
    assert not g.compiled and g.compile_s == 0
    assert g.token_ids == generate(model, tok, ids, GREEDY, 8).token_ids
    model._static_decoder = None


def test_compiled_greedy_equals_eager_on_smollm2(smollm2, capsys):
    """torch.compile of the step (once for the process): the same greedy tokens as eager on the fp32 base, and
    a second generation reuses the graph (no compile time paid again)."""
    model, tok = smollm2
    ids = tok.encode(ALPACA.prompt("Name three colours."))
    eager = generate(model, tok, ids, GREEDY, 40)
    compiled = generate(model, tok, ids, GREEDY, 40, compile=True)
    if not compiled.compiled:
        pytest.skip(f"torch.compile is unavailable here: {capsys.readouterr().err.strip()}")
    assert compiled.compile_s > 0 and "compiled the decode step" in capsys.readouterr().err
    assert compiled.token_ids == eager.token_ids and compiled.text == eager.text
    again = generate(model, tok, tok.encode("Once upon a time"), GREEDY, 20, compile=True)
    assert again.compiled and again.compile_s == 0
    assert again.token_ids == generate(model, tok, tok.encode("Once upon a time"), GREEDY, 20).token_ids
    model._static_decoder = None


def test_compiled_batch_equals_batch_one(smollm2):
    model, tok = smollm2
    prompts = [tok.encode(ALPACA.prompt(q)) for q in ("What is 2 + 2?", "Name three colours, please.")]
    batched = generate_batch(model, tok, prompts, GREEDY, 12, compile=True)
    for p, b in zip(prompts, batched):
        assert b.token_ids == generate(model, tok, p, GREEDY, 12).token_ids
    model._static_decoder = None
