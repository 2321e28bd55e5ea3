"""Adapters round-trip with HF PEFT in both directions, with identical logits."""
import json

import pytest
import torch
from torch import nn

from lora_core.adapter import load_adapter, read_adapter, save_adapter
from lora_core.loader import load_model
from lora_core.lora import LoRALinear, apply_lora
from lora_core.weights import open_weights

from helpers import random_meta_state, write_hf

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def hf_dir(tmp_path):
    write_hf(tmp_path / "hf", random_meta_state(PARAMS, 80, tie=False), PARAMS, 80, tie=False)
    return tmp_path / "hf"


def hf_model(path):
    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def adapted_model(hf_dir, targets, r, alpha):
    """Our model from hf_dir with LoRA whose B is random, so the adapter changes the output."""
    model = load_model(open_weights(hf_dir))
    apply_lora(model, targets, r=r, alpha=alpha)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.2)
    return model


TOKENS = torch.randint(0, 80, (2, 10), generator=torch.Generator().manual_seed(3))


def test_peft_adapter_loads_in_ours(hf_dir, tmp_path):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    ref = peft.get_peft_model(hf_model(hf_dir), cfg)
    for name, p in ref.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    ref.save_pretrained(tmp_path / "peft")
    ours = load_model(open_weights(hf_dir))
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        expected = ref(TOKENS).logits
        plain = hf_model(hf_dir)(TOKENS).logits
        got = ours(TOKENS)
    assert (expected - plain).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-5)


def test_our_adapter_loads_in_peft(hf_dir, tmp_path):
    ours = adapted_model(hf_dir, "all", r=8, alpha=16)
    save_adapter(ours, tmp_path / "ad", base_name=str(hf_dir), extras={"vocab_size": 80})
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and sorted(cfg["target_modules"]) == sorted(TARGETS)
    back = read_adapter(tmp_path / "ad", ours.args)
    assert back.vocab_size == 80 and back.base is None and back.r == 8 and len(back.layers) == 7 * 2
    ref = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "ad").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), ref(TOKENS).logits, atol=3e-5, rtol=1e-5)


def test_legacy_bin_adapter(hf_dir, tmp_path):
    from safetensors.torch import load_file

    ours = adapted_model(hf_dir, "q_proj,v_proj", r=4, alpha=8)
    save_adapter(ours, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").rename(tmp_path / "st")
    torch.save(load_file(tmp_path / "st"), tmp_path / "ad" / "adapter_model.bin")
    again = load_model(open_weights(hf_dir))
    load_adapter(again, tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(again(TOKENS), ours(TOKENS))


def test_empty_adapter_refused(hf_dir, tmp_path):
    ours = load_model(open_weights(hf_dir))
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(ours, tmp_path / "ad")
    from safetensors.torch import save_file

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                                        "target_modules": ["q_proj"]}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "empty" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="holds no LoRA tensors"):
        load_adapter(ours, tmp_path / "empty")


def test_modules_to_save_round_trip_with_peft(hf_dir, tmp_path):
    """embed_tokens and lm_head trained in full: PEFT -> ours and ours -> PEFT."""
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          modules_to_save=["lm_head", "embed_tokens"])
    ref = peft.get_peft_model(hf_model(hf_dir), cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.2)
    ref.save_pretrained(tmp_path / "peft")
    ours = load_model(open_weights(hf_dir))
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), ref(TOKENS).logits, atol=3e-5, rtol=1e-5)
    save_adapter(ours, tmp_path / "ours", modules_to_save=("lm_head", "embed_tokens"))
    back = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(TOKENS).logits, ref(TOKENS).logits, atol=3e-5, rtol=1e-5)
