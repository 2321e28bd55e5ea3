"""Incremental decoding with the KV cache equals the full forward, position by position."""
import pytest
import torch

from lora_core import KVCache, ModelArgs, Transformer


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    args = ModelArgs(**{**dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=97, hidden_dim=80,
                              max_seq_len=64), **kw})
    model = Transformer(args).eval()
    with torch.no_grad():  # non-trivial norms so a wrong position or head mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("kv_heads", [6, 2, 1])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_token_by_token_equals_full(kv_heads, dtype, tol):
    model = tiny(n_kv_heads=kv_heads).to(dtype)
    tokens = torch.randint(0, 97, (3, 13))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.args, 3, 20, dtype)
        steps = [model(tokens[:, t:t + 1], cache=cache) for t in range(13)]
    assert cache.pos == 13
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=tol, rtol=tol)


def test_prefill_then_decode_equals_full():
    model = tiny()
    tokens = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.args, 2, 32, torch.float32)
        pre = model(tokens[:, :9], cache=cache)
        mid = model(tokens[:, 9:12], cache=cache)  # a multi-token chunk after a prefix needs the offset causal mask
        rest = [model(tokens[:, t:t + 1], cache=cache) for t in range(12, 17)]
    torch.testing.assert_close(torch.cat([pre, mid, *rest], 1), full, atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_an_error():
    model = tiny()
    cache = KVCache(model.args, 1, 4, torch.float32)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_smollm2_cached_greedy_equals_uncached(smollm2):
    model, tok = smollm2
    ids = tok.encode("The capital of France is")
    with torch.no_grad():
        x = torch.tensor([ids])
        cache = KVCache(model.args, 1, 64, torch.float32)
        logits = model(x, cache=cache)
        cached = []
        for _ in range(6):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            cached.append(nxt.item())
            logits = model(nxt, cache=cache)
        full = model(torch.tensor([ids + cached]))
    assert full[0, len(ids) - 1:-1].argmax(-1).tolist() == cached


def test_rope_table_is_cached_and_rotates_by_pos_times_freq():
    """The cos/sin table is built once per model (grown only past its length) and rotates each pair
    (x[2i], x[2i+1]) by pos * theta^(-2i/head_dim), computed here in float64 as complex numbers."""
    from lora_core.model import apply_rope

    model = tiny()
    tokens = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        model(tokens)
        table = model._rope
        model(tokens)
    assert model._rope is table and table.shape[0] >= 9
    assert model.rope(table.shape[0] + 1, "cpu").shape[0] > table.shape[0]  # grows when asked for more
    head_dim, pos = model.args.head_dim, torch.tensor([[0, 5, 300]])
    x = torch.randn(1, 3, 2, head_dim)
    freq = model.args.rope_theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rot = torch.polar(torch.ones(3, head_dim // 2, dtype=torch.float64), pos[0, :, None].double() * freq)
    want = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (-1, 2))) * rot[None, :, None])
    got = apply_rope(x, model.rope(301, "cpu")[pos])
    torch.testing.assert_close(got, want.flatten(-2).float(), atol=5e-4, rtol=1e-4)  # fp32 angles
