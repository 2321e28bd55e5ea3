"""LoRA invariants against plain-torch formulas."""
import pytest
import torch
from torch import nn

from lora_core import ModelArgs, Transformer
from lora_core.lora import LoRALinear, apply_lora, lora_state_dict, mark_only_lora_trainable, parse_targets, set_merged


def tiny_model():
    torch.manual_seed(0)
    return Transformer(ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=61, hidden_dim=72)).eval()


@pytest.mark.parametrize("shape", [(1, 5), (3, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_b_zero_is_exactly_the_base(shape, dtype):
    base = nn.Linear(37, 23, bias=False).to(dtype)
    layer = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(*shape, 37, dtype=dtype)
    assert torch.equal(layer(x), base(x))
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32


def test_forward_and_merge_formula():
    base = nn.Linear(37, 23, bias=False)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=5, alpha=11)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 37)
    expected_w = w0 + (11 / 5) * layer.lora_B.detach() @ layer.lora_A.detach()
    torch.testing.assert_close(layer(x), x @ expected_w.t(), atol=1e-5, rtol=1e-5)
    layer.merge()
    torch.testing.assert_close(base.weight.detach(), expected_w, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x), x @ expected_w.t(), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-6, rtol=1e-6)


def test_only_lora_gets_gradients():
    model = tiny_model()
    apply_lora(model, "all", r=4, alpha=8)
    mark_only_lora_trainable(model)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            nn.init.normal_(layer.lora_B)
    model(torch.randint(0, 61, (2, 9))).sum().backward()
    for name, p in model.named_parameters():
        is_lora = name.endswith(("lora_A", "lora_B"))
        assert (p.grad is not None) == is_lora, name
    assert set(lora_state_dict(model)) == {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}


def test_lora_gradient_equals_autograd_of_formula():
    base = nn.Linear(13, 9, bias=False)
    layer = LoRALinear(base, r=3, alpha=6)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 13)
    layer(x).square().sum().backward()
    # the reference in float64; the fp32 layer sums in another order, so an element that cancels to near zero
    # can differ by a few ulps of the largest terms (seen on AMD Zen 4): the tolerance is relative to the largest
    # gradient (errors seen: <= 3e-7 of it), far below what a wrong gradient would give
    A = layer.lora_A.detach().double().requires_grad_()
    B = layer.lora_B.detach().double().requires_grad_()
    (x.double() @ (base.weight.detach().double() + 2.0 * B @ A).t()).square().sum().backward()
    for ours, ref in ((layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad)):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_targets():
    assert parse_targets("q_proj,v_proj") == ["q_proj", "v_proj"]
    assert parse_targets("wq,wv,w2") == ["q_proj", "v_proj", "down_proj"]
    assert len(parse_targets("all")) == 7
    with pytest.raises(ValueError, match="unknown LoRA target 'qkv'"):
        parse_targets("qkv")
    model = tiny_model()
    want = [f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert apply_lora(model, "q_proj,v_proj") == want


def test_model_merge_unmerge_round_trip():
    model = tiny_model()
    apply_lora(model, "all", r=4, alpha=16)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randint(0, 61, (1, 8))
    with torch.no_grad():
        unmerged = model(x)
        set_merged(model, True)
        merged = model(x)
        set_merged(model, False)
        again = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-5)


def test_modules_to_save_are_trainable_copies():
    from lora_core.lora import enable_modules_to_save

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=48, n_layers=1, n_heads=6, vocab_size=61, hidden_dim=72, tie_embeddings=True))
    for p in model.parameters():
        p.requires_grad_(False)
    before = model.embed_tokens.weight
    apply_lora(model, "q_proj")
    enable_modules_to_save(model, "lm_head")
    mark_only_lora_trainable(model, ("lm_head",))
    assert model.lm_head.weight is not before and torch.equal(model.lm_head.weight, before)
    assert model.lm_head.weight.requires_grad and not model.embed_tokens.weight.requires_grad
    with pytest.raises(ValueError, match="no module 'lm_heads'"):
        enable_modules_to_save(model, ["lm_heads"])


def test_lora_dropout_keeps_the_rate_scales_the_rest_and_is_seeded():
    from lora_core.lora import LoRADropout

    drop = LoRADropout(0.05).train()
    x = torch.ones(1000, 1001)  # an odd count: the last 64-bit word is shared with nothing
    torch.manual_seed(3)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.95) < 0.002  # 1,001,000 draws: 0.002 is about 9 standard errors
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.95))
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)  # the same RNG state gives the same mask (exact resume)
    assert torch.equal(drop.eval()(x), x)
    x.requires_grad_()
    torch.manual_seed(3)
    drop.train()(x).sum().backward()
    assert torch.equal(x.grad, y)  # d/dx of x * mask * scale is mask * scale (the same mask again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_branch_with_dropout_equals_autograd_of_the_formula(dtype):
    """The LoRA branch keeps only the dropout mask for backward; its gradients must be those of
    y = x W^T + s * (x * keep / (1 - p)) A^T B^T with the same mask."""
    base = nn.Linear(37, 23, bias=False).to(dtype)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.3).train()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 37, dtype=dtype, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    torch.manual_seed(7)
    keep = layer.dropout.mask(x)
    assert keep is not None and 0 < keep.float().mean() < 1
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    lora = (xr.float() * keep / 0.7) @ A.t() @ B.t() * 2.0
    ref = base(xr) + lora.to(dtype)
    ref.backward(gy)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, ref, **tol)
    torch.testing.assert_close(layer.lora_A.grad, A.grad, **tol)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, **tol)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
