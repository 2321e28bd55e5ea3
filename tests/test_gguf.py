"""GGUF import: dequantization against gguf.quants, and whole tiny models against transformers."""
import numpy as np
import pytest
import torch

from lora_core.gguf_io import GGUFFile, dequantize_blocks
from lora_core.loader import load_model
from lora_core.weights import open_weights

from gguf_fixtures import write_gguf
from helpers import meta_hidden_dim, random_meta_state, write_hf

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("shape", [(1, 32), (5, 96), (123, 64)])
def test_dequantize_equals_gguf_reference(kind, shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    blocks = gguf.quants.quantize(x, qtype)
    ref = gguf.quants.dequantize(blocks, qtype).reshape(shape)
    ours = dequantize_blocks(blocks, kind).reshape(shape).numpy()
    np.testing.assert_array_equal(ours, ref)
    # and the quantization error is what the format allows: half a step of the block scale
    step = np.abs(x).max() / (127 if kind == "Q8_0" else 7)
    assert np.abs(ours - x).max() <= step


def test_smollm2_tensors_equal_gguf_reference(smollm2_path):
    f = GGUFFile(smollm2_path)
    for name in ["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight", "output_norm.weight"]:
        t = f.tensors[name]
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(f.tensor(name).numpy(), ref.reshape(f.shape(name)))


PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5)
QTYPES = {  # every supported type appears at least once
    "tok_embeddings.weight": "Q8_0", "output.weight": "F16",
    "layers.0.attention.wq.weight": "Q4_0", "layers.0.attention.wk.weight": "Q4_1",
    "layers.0.attention.wv.weight": "Q8_0", "layers.0.feed_forward.w1.weight": "Q4_1",
    "layers.1.feed_forward.w2.weight": "Q4_0", "layers.1.attention.wo.weight": "F16",
}


def test_tiny_quantized_gguf_equals_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    sd = random_meta_state(PARAMS, 96, tie=False)
    seen = write_gguf(tmp_path / "tiny.gguf", sd, PARAMS, meta_hidden_dim(64, 32, None), QTYPES)
    write_hf(tmp_path / "hf", seen, PARAMS, 96, tie=False)  # the weights as dequantized by gguf's own code
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(open_weights(tmp_path / "tiny.gguf"))
    tokens = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens).logits, atol=3e-5, rtol=1e-5)


def test_bf16_gguf_tensor(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "b.gguf"), "llama")
    x = torch.randn(4, 32).to(torch.bfloat16)
    w.add_tensor("t", x.view(torch.int16).numpy(), raw_shape=(4, 32), raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = GGUFFile(tmp_path / "b.gguf").tensor("t")
    assert got.dtype == torch.bfloat16 and torch.equal(got, x)
