"""Streaming loader: the per-tensor hook, dtypes, frozen weights, no meta tensors left behind."""
import torch
from torch import nn

from lora_core.loader import load_model
from lora_core.weights import open_weights

from helpers import random_meta_state, write_hf

PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5)


class HalfLinear(nn.Module):
    """Stands in for the int8 layer: keeps its weight in another form, installed by the hook."""

    def __init__(self, weight):
        super().__init__()
        self.register_buffer("w16", weight.half())

    def forward(self, x):
        return x @ self.w16.float().t()


def test_hook_replaces_layers_while_loading(tmp_path):
    write_hf(tmp_path / "hf", random_meta_state(PARAMS, 90, tie=False), PARAMS, 90, tie=False)
    seen = []

    def hook(model, name, tensor):
        seen.append((name, tensor.dtype))
        if name.endswith("proj.weight"):
            module_name = name.rsplit(".", 1)[0]
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent), child, HalfLinear(tensor))
            return True
        return False

    ref = load_model(open_weights(tmp_path / "hf"))
    model = load_model(open_weights(tmp_path / "hf"), hook=hook)
    assert len(seen) == 2 * 9 + 3 and all(d == torch.float32 for _, d in seen)
    assert isinstance(model.layers[1].mlp.down_proj, HalfLinear)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    tokens = torch.randint(0, 90, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens), atol=2e-2, rtol=2e-2)


def test_loaded_base_is_frozen_and_typed(tmp_path):
    write_hf(tmp_path / "hf", random_meta_state(PARAMS, 90, tie=True), PARAMS, 90, tie=True)
    model = load_model(open_weights(tmp_path / "hf"), "bf16")
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.embed_tokens.weight  # tied embeddings stay one tensor


def test_qk_permutations_are_inverse_and_match_hf_script():
    from lora_core.names import hf_to_meta_rows, meta_to_hf_rows

    from helpers import hf_permute

    w = torch.randn(3 * 10, 7)  # 3 heads of head_dim 10
    assert torch.equal(meta_to_hf_rows(w, 3), hf_permute(w, 3))
    assert torch.equal(hf_to_meta_rows(meta_to_hf_rows(w, 3), 3), w)
