"""Our LLaMA on tiny random checkpoints (Meta and HF layouts) against HF transformers' LlamaForCausalLM."""
import pytest
import torch

from lora_core.loader import load_model
from lora_core.weights import open_weights

from helpers import random_meta_state, write_hf, write_meta

transformers = pytest.importorskip("transformers")

FP32 = dict(atol=3e-5, rtol=1e-5)  # fp32 kernels differ in summation order; logits here are O(10)

CONFIGS = {
    # name: (params, vocab, tie)
    "mha-untied": (dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-5), 123, False),
    "gqa-tied": (dict(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, multiple_of=16, norm_eps=1e-6,
                      rope_theta=500000.0), 101, True),
    "gqa-odd-ffn": (dict(dim=72, n_layers=2, n_heads=3, n_kv_heads=1, multiple_of=10, ffn_dim_multiplier=1.3,
                         norm_eps=1e-5), 77, False),
}


def hf_logits(hf_dir, tokens):
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(params=list(CONFIGS), scope="module")
def case(request, tmp_path_factory):
    params, vocab, tie = CONFIGS[request.param]
    sd = random_meta_state(params, vocab, tie)
    root = tmp_path_factory.mktemp(request.param)
    write_hf(root / "hf", sd, params, vocab, tie)
    tokens = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(1))
    return dict(params=params, vocab=vocab, tie=tie, sd=sd, root=root, tokens=tokens,
                expected=hf_logits(root / "hf", tokens))


def our_logits(path, tokens, dtype="fp32"):
    model = load_model(open_weights(path), dtype)
    with torch.no_grad():
        return model(tokens)


def test_hf_layout(case):
    got = our_logits(case["root"] / "hf", case["tokens"])
    torch.testing.assert_close(got, case["expected"], **FP32)


def test_hf_sharded(case):
    d = case["root"] / "hf-sharded"
    write_hf(d, case["sd"], case["params"], case["vocab"], case["tie"], shards=3)
    torch.testing.assert_close(our_logits(d, case["tokens"]), case["expected"], **FP32)


@pytest.mark.parametrize("shards,fmt", [(1, "safetensors"), (2, "safetensors"), (1, "pth"), (2, "pth")])
def test_meta_layout(case, shards, fmt):
    params = dict(case["params"], vocab_size=-1)  # LLaMA 1/2 params.json leave the vocabulary to the tokenizer
    d = case["root"] / f"meta-{shards}-{fmt}"
    write_meta(d, case["sd"], params, shards=shards, fmt=fmt)
    torch.testing.assert_close(our_logits(d, case["tokens"]), case["expected"], **FP32)


def test_bf16_close_to_fp32(case):
    got = our_logits(case["root"] / "hf", case["tokens"], "bf16")
    ref = case["expected"]
    assert got.dtype == torch.float32  # logits come back in fp32 whatever the weights are
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.03, f"bf16 logits relative error {rel:.4f}"


def test_padding_mask_matches_hf(case):
    """Left-padded batch with an attention mask and shifted positions gives each row's unpadded logits."""
    tokens = case["tokens"]
    model = load_model(open_weights(case["root"] / "hf"))
    short = tokens[1, :7]
    padded = torch.stack([tokens[0], torch.cat([torch.zeros(4, dtype=torch.long), short])])
    mask = torch.ones_like(padded)
    mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(padded, attention_mask=mask, positions=positions)
        alone = model(short[None])
    torch.testing.assert_close(got[0], case["expected"][0], **FP32)
    torch.testing.assert_close(got[1, 4:], alone[0], **FP32)


LLAMA31 = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5, rope_theta=500000.0,
               use_scaled_rope=True, rope_scaling_factor=8.0)


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_llama31_rope_scaling_far_positions(tmp_path, layout):
    """LLaMA 3.1's scaled RoPE, from config.json rope_scaling and params.json use_scaled_rope. RoPE only sees
    relative distances, so the positions are spread 1000 apart, where the scaled long wavelengths matter."""
    sd = random_meta_state(LLAMA31, 50, tie=False)
    write_hf(tmp_path / "hf", sd, LLAMA31, 50, tie=False)
    write_meta(tmp_path / "meta", sd, dict(LLAMA31, vocab_size=50))
    tokens = torch.randint(0, 50, (1, 9))
    positions = torch.arange(0, 9000, 1000)[None]
    ref_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(open_weights(tmp_path / layout))
    assert ours.args.rope_scaling["factor"] == 8.0
    with torch.no_grad():
        ref = ref_model(tokens, position_ids=positions).logits
        got = ours(tokens, positions=positions)
        unscaled = load_model(open_weights(tmp_path / "hf"))
        unscaled.args.rope_scaling = None
        plain = unscaled(tokens, positions=positions)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert (plain - ref).abs().max() > 1e-2  # the scaling really changes these logits
