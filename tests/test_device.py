"""Every tensor the training loop, the KV cache and generation create follows the model's device.

No GPU here: a torch function mode watches the tensor factories (torch.tensor, zeros, arange, ...) that
lora_core code calls and records each one made without an explicit device, which on a CUDA machine
would land on the CPU beside a model on the GPU. The loop, evaluation, cached decoding and sampling run
under it. The same paths run for real on CUDA in test_gpu.py (marked gpu).
"""
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import lora_core
from lora_core import ModelArgs, Transformer
from lora_core.device import pick_device
from lora_core.lora import apply_lora, lora_layers, mark_only_lora_trainable

PACKAGE = Path(lora_core.__file__).parent
CPU_ONLY = {"cpu.py", "native.py", "dispatch.py", "reference.py"}  # the CPU int8 paths (CUDA runs Triton)
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
             torch.randn, torch.rand, torch.randint, torch.randperm, torch.eye, torch.linspace}


class DeviceAudit(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)
            while frame and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            where = Path(frame.f_code.co_filename) if frame else None
            if where and PACKAGE in where.parents and where.name not in CPU_ONLY:
                self.found.append(f"{where.relative_to(PACKAGE.parent)}:{frame.f_lineno} torch.{func.__name__}")
        return func(*args, **kwargs)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300, hidden_dim=72,
                                  max_seq_len=64))
    return model


class ByteTokenizer:
    """Just enough tokenizer for generate(): ids are bytes + 3 (0 pad, 1 bos, 2 eos)."""

    bos_id, eos_id, pad_id, add_bos, vocab_size = 1, 2, 0, True, 300

    def encode(self, text):
        return [1] + [b + 3 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode(errors="replace")

    def stream(self):
        from lora_core.tokenizer import StreamDecoder

        return StreamDecoder(self)


def test_training_step_and_evaluation_create_nothing_off_device(tiny):
    from lora_core.data import Example
    from lora_core.trainer import accumulate_gradients, evaluate

    apply_lora(tiny, "all", r=4, alpha=8, dropout=0.1)
    mark_only_lora_trainable(tiny)
    tiny.train()
    examples = [Example(list(range(3, 3 + n)), [-100] * 3 + list(range(6, 3 + n))) for n in (9, 14, 20)]
    with DeviceAudit() as audit:
        loss, _ = accumulate_gradients(tiny, examples, sum(e.n_targets for e in examples), 2, 0)
        evaluate(tiny, examples, 2, 0)
    assert loss.device == next(tiny.parameters()).device
    assert not audit.found, audit.found


def test_cached_decoding_and_sampling_create_nothing_off_device(tiny):
    from lora_core.generation import generate
    from lora_core.model import KVCache
    from lora_core.sampling import Sampling

    apply_lora(tiny, "q_proj,v_proj", r=4, alpha=8)
    for m in lora_layers(tiny).values():
        torch.nn.init.normal_(m.lora_B, std=0.1)
    tiny.eval()
    tok = ByteTokenizer()
    with DeviceAudit() as audit, torch.no_grad():
        cache = KVCache(tiny.args, 2, 16, torch.float32, device=next(tiny.parameters()).device)
        tiny(torch.tensor([[5, 6, 7], [8, 9, 10]]).to(cache.k[0].device), cache=cache)
        tiny(torch.tensor([[11], [12]]).to(cache.k[0].device), cache=cache)
        generate(tiny, tok, tok.encode("hi"), Sampling(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2),
                 max_new_tokens=6, seed=1)
        generate(tiny, tok, tok.encode("hi"), Sampling(0, 0, 1.0, 1.0), max_new_tokens=4)
    assert not audit.found, audit.found


def test_the_audit_catches_a_tensor_made_without_a_device(tiny):
    """The audit is not blind: code in lora_core that builds a tensor without device= is reported."""
    from lora_core import model as model_module

    with DeviceAudit() as audit:
        exec(compile("torch.arange(3)", model_module.__file__, "exec"), {"torch": torch})
    assert audit.found and "torch.arange" in audit.found[0]


def test_device_names():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device; use --device cpu"):
            pick_device("cuda")
    with pytest.raises(ValueError, match="choose auto, cpu, cuda"):
        pick_device("tpu")
