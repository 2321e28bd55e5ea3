"""The CUDA path end to end: Triton int8 kernels on the device, a training run, cached generation and the
export check on --device cuda. Skipped with a reason where no CUDA device exists (these machines)."""
import json
import math

import pytest
import torch

from helpers import DATA, need_shared, tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("gpu") / "base", PARAMS)


@pytest.mark.parametrize("M,K,N", [(1, 64, 96), (5, 123, 77), (123, 256, 129)])
def test_triton_int8_on_cuda_equals_reference(M, K, N):
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: the kernels would run in the interpreter, not on the GPU")
    from lora_core.kernels import reference as ref
    from lora_core.kernels.int8_linear import backward_product, forward_product

    g = torch.Generator().manual_seed(0)
    x, w, gy = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / math.sqrt(K), torch.randn(M, N)
    qw, sw = ref.quantize_rowwise(w)
    qx, sx = ref.quantize_rowwise(x)
    want = ref.int8_matmul(qx, sx, qw, sw)
    got = forward_product(x.cuda(), qw.cuda(), sw.cuda(), "triton", threshold=0.0)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)
    gx = backward_product(gy.cuda(), qw.cuda(), sw.cuda(), "triton")
    torch.testing.assert_close(gx.cpu(), ref.grad_input(gy, qw, sw), rtol=1e-4, atol=1e-4)


def test_int8_layer_under_bf16_autocast():
    from lora_core.device import autocast
    from lora_core.quant import Int8Linear

    layer = Int8Linear.from_float(torch.randn(96, 64) / 8).cuda()
    x = torch.randn(3, 7, 64, device="cuda", requires_grad=True)
    with autocast(torch.device("cuda")):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.device.type == "cuda"
    exact = x.detach() @ layer.dequantize().t()
    assert ((y.float() - exact).norm() / exact.norm()) < 0.03


def test_training_on_cuda_follows_the_cpu_run(tiny_base, tmp_path):
    from lora_core.train_config import TrainConfig
    from lora_core.trainer import train

    def run(device):
        out = tmp_path / device
        cfg = TrainConfig(data=[str(need_shared(DATA / "luotuo_developer_instruction.json"))], base=str(tiny_base),
                          output=str(out), base_dtype="int8", batch_size=8, micro_batch_size=4, max_steps=3,
                          warmup_steps=1, lora_dropout=0.0, val_size=0, cutoff_len=96, targets="all", device=device)
        train(cfg)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert json.loads((out / "training_args.json").read_text())["device"].startswith(device)
        return [r["loss"] for r in rows]

    cpu, cuda = run("cpu"), run("cuda")
    assert all(math.isfinite(v) for v in cuda)
    assert cuda[0] == pytest.approx(cpu[0], rel=3e-2)  # bf16 autocast and Triton int8 against fp32 on the CPU


def test_cached_generation_on_cuda(tiny_base):
    import lora_core
    from lora_core.generation import generate
    from lora_core.sampling import Sampling

    model, tok = lora_core.load(tiny_base, dtype="int8", device="cuda")
    assert model.layers[0].self_attn.q_proj.qweight.is_cuda
    ids = tok.encode("Hello there")
    g = generate(model, tok, ids, Sampling(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1),
                 max_new_tokens=8, seed=0, ignore_eos=True)
    assert len(g.token_ids) == 8 and all(0 <= t < model.args.vocab_size for t in g.token_ids)
    again = generate(model, tok, ids, Sampling(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1),
                     max_new_tokens=8, seed=0, ignore_eos=True)
    assert again.token_ids == g.token_ids  # a seeded CUDA generator


def test_export_verify_on_cuda(tiny_base, tmp_path):
    from lora_core.export import export

    out = export(tiny_base, None, "hf", tmp_path / "hf", "f32", verify=True, device="cuda")
    assert (out / "model.safetensors").is_file()
