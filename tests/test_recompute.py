"""Activation recomputation changes memory, never results: same loss and same LoRA gradients."""
import torch
from torch import nn

from lora_core import ModelArgs, Transformer
from lora_core.lora import LoRALinear, apply_lora, mark_only_lora_trainable


def lora_grads(checkpointed: bool):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=61, hidden_dim=72))
    apply_lora(model, "all", r=4, alpha=8)
    mark_only_lora_trainable(model)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.1)
    if checkpointed:
        model.recompute_activations = True
    x = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_recompute_keeps_loss_and_gradients():
    loss, grads = lora_grads(False)
    loss_ckpt, grads_ckpt = lora_grads(True)
    assert loss == loss_ckpt and grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6)
