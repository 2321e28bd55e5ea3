"""lora_core.swiglu: silu(gate) * up keeping only gate and up for backward, against autograd of the plain
formula (outputs, gradients, gradcheck in float64, odd shapes, dtypes), the bytes it keeps, and the
model with it swapped in against the plain model."""
import pytest
import torch
import torch.nn.functional as F

from lora_core.lora import apply_lora, lora_state_dict, mark_only_lora_trainable
from lora_core.model import FeedForward
from lora_core.swiglu import SwiGLUFeedForward, SwiGLUFunction, fuse_swiglu, swiglu

SHAPES = [(5, 123, 123), (1, 7, 1536), (3, 1, 13)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def plain(gate, up):
    return F.silu(gate) * up


@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 1, 13), (2, 3, 1)])  # small: gradcheck perturbs each element
def test_gradcheck_float64(shape):
    gate = (torch.randn(shape, dtype=torch.float64) * 3).requires_grad_()
    up = torch.randn(shape, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (gate, up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wants", [(True, True), (True, False), (False, True)], ids=["both", "gate", "up"])
def test_equals_autograd_of_the_plain_formula(shape, dtype, wants):
    gate0, up0, gy = torch.randn(shape) * 4, torch.randn(shape), torch.randn(shape)
    gate0[..., 0] = 0.0  # silu'(0) = 0.5
    got_in = [gate0.to(dtype).requires_grad_(wants[0]), up0.to(dtype).requires_grad_(wants[1])]
    want_in = [gate0.to(dtype).requires_grad_(wants[0]), up0.to(dtype).requires_grad_(wants[1])]
    got, want = swiglu(*got_in), plain(*want_in)
    got.backward(gy.to(dtype))
    want.backward(gy.to(dtype))
    torch.testing.assert_close(got, want, **TOL[dtype])
    for g, w, needed in zip(got_in, want_in, wants):
        if needed:
            torch.testing.assert_close(g.grad, w.grad, **TOL[dtype])
        else:
            assert g.grad is None


def test_no_grad_takes_the_plain_path():
    gate, up = torch.randn(4, 9), torch.randn(4, 9)
    with torch.no_grad():
        torch.testing.assert_close(swiglu(gate, up), plain(gate, up))


def _saved_bytes(fn, *args) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def test_keeps_two_tensors_where_autograd_keeps_three():
    gate, up = (torch.randn(4, 33, 96).requires_grad_() for _ in range(2))
    one = gate.numel() * gate.element_size()
    assert _saved_bytes(plain, gate, up) == 3 * one  # gate (silu's), silu(gate) and up (the product's)
    assert _saved_bytes(swiglu, gate, up) == 2 * one


def test_swapped_model_equals_the_plain_model(tiny_base):
    """Every FeedForward swapped, parameter names kept, the same loss and LoRA gradients (LoRA on all seven
    projections, so gate/up/down are LoRA-wrapped inside the swapped module)."""
    import lora_core
    from lora_core.batching import collate
    from lora_core.data import ALPACA, load_examples
    from lora_core.loss import summed_loss

    from helpers import DATA, need_shared

    model, tok = lora_core.load(tiny_base)
    apply_lora(model, "all", r=4, alpha=8)
    mark_only_lora_trainable(model)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.05)
    examples, _ = load_examples(need_shared(DATA / "luotuo_developer_instruction.json"), tok, ALPACA, 96)
    ids, labels = collate(examples[:3], tok.pad_id)

    def run():
        model.zero_grad(set_to_none=True)
        loss = summed_loss(model, ids, labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    names = [n for n, _ in model.named_parameters()]
    want_loss, want = run()
    assert fuse_swiglu(model) == model.args.n_layers
    assert fuse_swiglu(model) == 0  # already swapped
    assert all(isinstance(layer.mlp, SwiGLUFeedForward) for layer in model.layers)
    assert not any(type(m) is FeedForward for m in model.modules())
    assert [n for n, _ in model.named_parameters()] == names
    assert "layers.0.mlp.gate_proj.lora_A" in lora_state_dict(model)
    got_loss, got = run()
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-5)
    assert got.keys() == want.keys() and len(got) == 2 * 7 * model.args.n_layers
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_training_swaps_it_in(tiny_base):
    import lora_core
    from lora_core.data import ALPACA, load_examples
    from lora_core.trainer import accumulate_gradients

    from helpers import DATA, need_shared

    model, tok = lora_core.load(tiny_base)
    apply_lora(model, "q_proj,v_proj", r=2, alpha=4)
    mark_only_lora_trainable(model)
    examples, _ = load_examples(need_shared(DATA / "luotuo_developer_instruction.json"), tok, ALPACA, 64)
    accumulate_gradients(model, examples[:2], sum(e.n_targets for e in examples[:2]), 2, tok.pad_id)
    assert all(isinstance(layer.mlp, SwiGLUFeedForward) for layer in model.layers)
