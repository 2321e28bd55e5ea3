"""The training loss through lm_head in chunks, with its gradient taken in the forward pass, against full
cross-entropy: the loss, LoRA gradients and a trained lm_head's gradient."""

import torch

import lora_core.loss as loss
from lora_core.batching import collate
from lora_core.data import ALPACA, load_examples
from lora_core.lora import apply_lora, mark_only_lora_trainable

from helpers import DATA, need_shared

PARAMS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5)


def test_chunked_loss_equals_full_cross_entropy(tiny_base, monkeypatch):
    import lora_core

    model, tok = lora_core.load(tiny_base)
    apply_lora(model, "q_proj", r=2, alpha=4)
    mark_only_lora_trainable(model)
    torch.nn.init.normal_(model.layers[0].self_attn.q_proj.lora_B)
    examples, _ = load_examples(need_shared(DATA / "luotuo_developer_instruction.json"), tok, ALPACA, 128)
    ids, labels = collate(examples[:4], tok.pad_id)
    monkeypatch.setattr(loss, "LOSS_CHUNK", 7)  # several chunks, the last one short
    chunked = loss.summed_loss(model, ids, labels)
    chunked.backward()
    g_chunked = model.layers[0].self_attn.q_proj.lora_A.grad.clone()
    model.zero_grad()
    full = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=-100, reduction="sum")
    full.backward()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_chunked, model.layers[0].self_attn.q_proj.lora_A.grad, rtol=5e-4, atol=1e-5)


def test_chunked_loss_gradient_of_a_trained_lm_head(tiny_base, monkeypatch):
    """With lm_head in modules_to_save its gradient comes from the loss's forward pass too."""
    import lora_core
    from lora_core.lora import enable_modules_to_save

    model, tok = lora_core.load(tiny_base)
    apply_lora(model, "v_proj", r=2, alpha=4)
    enable_modules_to_save(model, ["lm_head"])
    mark_only_lora_trainable(model, ("lm_head",))
    examples, _ = load_examples(need_shared(DATA / "luotuo_developer_instruction.json"), tok, ALPACA, 96)
    ids, labels = collate(examples[:3], tok.pad_id)
    monkeypatch.setattr(loss, "LOSS_CHUNK", 5)
    loss.summed_loss(model, ids, labels).backward()
    got = model.lm_head.weight.grad.clone()
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                      ignore_index=-100, reduction="sum").backward()
    torch.testing.assert_close(got, model.lm_head.weight.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # evaluation takes the loss alone
        assert loss.summed_loss(model, ids, labels).item() > 0
