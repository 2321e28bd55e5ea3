"""Child process: a LLaMA-7B-shaped model with random weights, built through the real loader with
quantize-on-load, int8 base + LoRA r=8 on all linear layers; one forward + backward of a 256-token
micro-batch. Prints JSON: peak RSS at each stage and seconds."""
import json
import sys
import time
from pathlib import Path

import torch

from lora_core.config import ModelArgs
from lora_core.loader import load_model
from lora_core.lora import apply_lora, mark_only_lora_trainable
from lora_core.model import Transformer
from lora_core.quant import quantize_on_load
from lora_core.weights import Weights


def vm(key):
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(key + ":")).split()[1]) / 2**20  # GiB


class RandomCheckpoint(Weights):
    """Random weights made one tensor at a time, as if streamed from a file."""

    fmt = "meta"

    def __init__(self, args):
        self.path, self.args = Path("random-7b"), args
        with torch.device("meta"):
            self._shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
        super().__init__()

    def _has(self, name):
        return True

    def get(self, name):
        return torch.randn(self._shapes[name]) * 0.02


args = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, hidden_dim=11008, max_seq_len=2048)
tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 256
recompute = len(sys.argv) > 2 and sys.argv[2] == "checkpointing"
out = {"start": vm("VmHWM")}
t = time.perf_counter()
model = load_model(RandomCheckpoint(args), "fp32", hook=quantize_on_load)
out["load_s"], out["after_load"] = time.perf_counter() - t, vm("VmHWM")
apply_lora(model, "all", r=8, alpha=16)
mark_only_lora_trainable(model)
model.recompute_activations = recompute
out["lora_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
x = torch.randint(0, args.vocab_size, (1, tokens + 1))
t = time.perf_counter()
logits = model(x[:, :-1])
loss = torch.nn.functional.cross_entropy(logits.view(-1, args.vocab_size), x[0, 1:])
out["forward_s"] = time.perf_counter() - t
t = time.perf_counter()
loss.backward()
out["backward_s"] = time.perf_counter() - t
out["peak"] = vm("VmHWM")
out["loss"] = loss.item()
print(json.dumps(out))
