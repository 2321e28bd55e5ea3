"""Child process: one optimizer step (micro-batch 4 x 256 tokens, LoRA r=8) on SmolLM2-135M, with our
trainer code or with HF transformers + PEFT; prints JSON with seconds per step and tokens/s (medians of the timed
steps; every token is real, none padding), peak RSS and the last step's loss."""
import json
import sys
import time

import torch

impl, base_dtype, targets = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
recompute = sys.argv[4:] == ["checkpointing"]  # ours with activation checkpointing
STEPS, B, T = 4, 4, 256
torch.manual_seed(0)
tokens = torch.randint(100, 40000, (B, T))
labels = tokens.clone()


def vm_hwm_gib():
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmHWM:")).split()[1]) / 2**20


if impl == "ours":
    import lora_core
    from lora_core.lora import apply_lora, mark_only_lora_trainable
    from lora_core.loss import summed_loss

    model, _ = lora_core.load("smollm2-135m", dtype=base_dtype)
    apply_lora(model, targets, r=8, alpha=16, dropout=0.05)
    mark_only_lora_trainable(model)
    model.recompute_activations = recompute
    model.train()

    def loss_fn():
        return summed_loss(model, tokens, labels) / (B * (T - 1))
else:
    import peft
    import transformers

    from lora_core.loader import resolve_base

    path = resolve_base("smollm2-135m")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[base_dtype]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=dtype)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets))
    model.train()

    def loss_fn():
        return model(input_ids=tokens, labels=labels).loss

params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
times = []
for _ in range(STEPS):
    t = time.perf_counter()
    loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
timed = sorted(times[1:])  # the first step warms up oneDNN
step_s = timed[len(timed) // 2]
print(json.dumps({"seconds": step_s, "tokens_per_s": B * T / step_s, "peak_gib": vm_hwm_gib(), "loss": loss.item()}))
