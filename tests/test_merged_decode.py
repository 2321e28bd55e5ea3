"""generate.py --merge: the adapter folded into the float weights before quantizing, checked against the same
adapter unmerged on real SmolLM2."""
import pytest
import torch

import lora_core
from lora_core.data import ALPACA
from lora_core.generation import generate
from lora_core.lora import LoRALinear
from lora_core.quant import Int8Linear
from lora_core.sampling import Sampling

from helpers import randomize_lora

GREEDY = Sampling(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def adapter(smollm2_path, tmp_path_factory):
    from lora_core.adapter import save_adapter
    from lora_core.lora import apply_lora

    model, _ = lora_core.load(smollm2_path, dtype="fp32")
    apply_lora(model, "all", r=8, alpha=16)
    torch.manual_seed(0)
    randomize_lora(model, std=0.05, a_too=True)
    d = tmp_path_factory.mktemp("merge") / "adapter"
    save_adapter(model, d, str(smollm2_path))
    return d


def next_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1]


def test_merged_fp32_equals_unmerged(smollm2_path, adapter):
    unmerged, tok = lora_core.load(smollm2_path, dtype="fp32", adapter=adapter)
    merged, _ = lora_core.load(smollm2_path, dtype="fp32", adapter=adapter, merge=True)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    ids = tok.encode(ALPACA.prompt("Who are you?"))
    torch.testing.assert_close(next_logits(merged, ids), next_logits(unmerged, ids), rtol=1e-4, atol=1e-4)
    base, _ = lora_core.load(smollm2_path, dtype="fp32")
    want = generate(unmerged, tok, ids, GREEDY, max_new_tokens=24).token_ids
    assert generate(merged, tok, ids, GREEDY, max_new_tokens=24).token_ids == want
    assert generate(base, tok, ids, GREEDY, max_new_tokens=24).token_ids != want  # the adapter matters


def test_merged_int8_is_as_close_to_fp32_as_unmerged_int8(smollm2_path, adapter):
    """Quantizing W + s·B·A instead of W alone: not bit-identical, but no further from the fp32 result."""
    exact, tok = lora_core.load(smollm2_path, dtype="fp32", adapter=adapter)
    unmerged, _ = lora_core.load(smollm2_path, dtype="int8", adapter=adapter)
    merged, _ = lora_core.load(smollm2_path, dtype="int8", adapter=adapter, merge=True)
    projections = [m for n, m in merged.named_modules() if n.endswith("_proj")]
    assert len(projections) == 7 * merged.args.n_layers and all(isinstance(m, Int8Linear) for m in projections)
    ids = tok.encode(ALPACA.prompt("Name three colours."))
    want = next_logits(exact, ids)
    err_merged = (next_logits(merged, ids) - want).norm() / want.norm()
    err_unmerged = (next_logits(unmerged, ids) - want).norm() / want.norm()
    assert err_merged < 0.05 and err_merged < 2 * err_unmerged, (err_merged, err_unmerged)
