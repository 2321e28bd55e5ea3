"""Child process: alpaca-lora's finetune.py, the way its users ran it, on a CPU: HF transformers Trainer + PEFT
LoRA over the float SmolLM2 (bitsandbytes' int8 needs a GPU), alpaca-lora's tokenization (prompt masked, EOS
appended when it fits), DataCollatorForSeq2Seq padding to a multiple of 8, gradient accumulation to 128.
Each optimizer step sees the examples our train.py sees at that step (alpaca-lora's random sampler would give
each step another subset, and per-step losses would then differ by the subsets' difficulty, not by the work).
Prints one JSON line: seconds per step, real (non-pad) tokens, losses, peak RSS."""
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

data_file, cutoff, targets, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4])
BATCH, MICRO, LR, SEED = 128, 4, 3e-4, 42
torch.manual_seed(SEED)

import peft  # noqa: E402
import transformers  # noqa: E402

from lora_core.batching import step_indices  # noqa: E402
from lora_core.data import ALPACA  # noqa: E402  (alpaca-lora's own template, word for word)
from lora_core.export import export  # noqa: E402
from lora_core.loader import resolve_base  # noqa: E402

# an HF user's copy of the base: config.json + model.safetensors in fp32 (transformers' Trainer refuses a model
# loaded from a GGUF as "quantized"), written by our exporter and checked against transformers by tests/test_export.py
hf_dir = Path(tempfile.mkdtemp()) / "smollm2-hf"
export(resolve_base("smollm2-135m"), None, "hf", hf_dir, "f32")
tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
tokenizer.pad_token_id = 0
tokenizer.padding_side = "left"  # as alpaca-lora sets it
model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets,
                                                   bias="none", task_type="CAUSAL_LM"))


def tokenize(prompt, add_eos_token=True):  # alpaca-lora finetune.py's tokenize()
    result = tokenizer(prompt, truncation=True, max_length=cutoff, padding=False, return_tensors=None)
    if result["input_ids"][-1] != tokenizer.eos_token_id and len(result["input_ids"]) < cutoff and add_eos_token:
        result["input_ids"].append(tokenizer.eos_token_id)
        result["attention_mask"].append(1)
    result["labels"] = result["input_ids"].copy()
    return result


def generate_and_tokenize_prompt(row):  # ... and generate_and_tokenize_prompt(), train_on_inputs=False
    full = tokenize(ALPACA.prompt(row["instruction"], row.get("input") or "") + row["output"])
    user_len = len(tokenize(ALPACA.prompt(row["instruction"], row.get("input") or ""))["input_ids"]) - 1
    full["labels"] = [-100] * user_len + full["labels"][user_len:]
    return full


rows = json.loads(open(data_file, encoding="utf-8").read())
random.Random(SEED).shuffle(rows)
encoded = [generate_and_tokenize_prompt(r) for r in rows[:BATCH * steps]]
# the same work as ours, step for step: records whose prompt fills the cutoff teach nothing (ours drops them), and
# each optimizer step takes the examples our run takes at that step (Trainer's sampler kept sequential)
encoded = [e for e in encoded if any(label != -100 for label in e["labels"][:-1])]
train = [encoded[i] for step in range(steps) for i in step_indices([len(e["input_ids"]) for e in encoded], step, SEED,
                                                                   BATCH, False)]


class Clock(transformers.TrainerCallback):
    def __init__(self):
        self.times, self.t0 = [], None

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t0)


class TokenWeighted(transformers.Trainer):
    """Also keeps each micro-batch's summed loss and target count (no extra compute), so the step's loss can be
    reported as ours is, summed over the step's target tokens / their count, whatever the Trainer logs."""

    sums, counts = [], []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        n = int((labels[:, 1:] != -100).sum())
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None  # outputs.loss = sum / items
        self.sums.append(float(outputs.loss) * (int(num_items_in_batch) if scaled else n))
        self.counts.append(n)
        return (loss, outputs) if return_outputs else loss


clock = Clock()
args = transformers.TrainingArguments(
    output_dir="/tmp/alpaca-hf-bench", per_device_train_batch_size=MICRO, gradient_accumulation_steps=BATCH // MICRO,
    max_steps=steps, learning_rate=LR, warmup_steps=0, lr_scheduler_type="constant", logging_steps=1,
    optim="adamw_torch", save_strategy="no", train_sampling_strategy="sequential", report_to=[], use_cpu=True,
    seed=SEED, dataloader_num_workers=0,
    disable_tqdm=True)
trainer = TokenWeighted(model=model, train_dataset=train, args=args, callbacks=[clock],
                               data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8,
                                                                                 return_tensors="pt", padding=True))
trainer.train()
logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
per_step = BATCH // MICRO
step_of = [slice(i * per_step, (i + 1) * per_step) for i in range(steps)]
losses = [sum(TokenWeighted.sums[s]) / sum(TokenWeighted.counts[s]) for s in step_of]
with open("/proc/self/status") as f:
    peak = int(next(x for x in f if x.startswith("VmHWM:")).split()[1]) / 2**20
tokens = [sum(len(e["input_ids"]) for e in train[i * BATCH:(i + 1) * BATCH]) for i in range(steps)]
print(json.dumps({"seconds": clock.times, "tokens": tokens, "losses": losses, "logged_losses": logged,
                  "peak_gib": peak}))
