"""train.py: instruction-tune a LoRA adapter on a LLaMA-family base.

    python train.py --data examples/instructions.json
    torchrun --nproc_per_node 2 train.py --data data.json      # data parallel
"""
from __future__ import annotations

import argparse
import sys

from lora_core.trainer import TrainConfig


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig(data=[])
    p = argparse.ArgumentParser(description="Train a LoRA adapter (alpaca-lora's defaults).")
    p.add_argument("--data", nargs="+", required=True, help="alpaca JSON / JSONL files (or Chinese-Vicuna chats)")
    p.add_argument("--base", default=d.base, help="model directory, .gguf file or smollm2-135m")
    p.add_argument("--output", default=d.output, help="where the adapter, metrics and checkpoints go")
    p.add_argument("--template", default=d.template, help="alpaca, alpaca_short, vicuna_chat or a template JSON file")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, help="examples per forward pass")
    p.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training data")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    p.add_argument("--schedule", default=d.schedule, choices=["cosine", "linear", "constant"], help="decay after warmup")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping norm")
    p.add_argument("--cutoff-len", type=int, default=d.cutoff_len, help="tokens per example, EOS included")
    p.add_argument("--val-size", type=float, default=d.val_size, help="held-out count, or fraction if < 1; 0 disables")
    p.add_argument("--val-data", nargs="+", default=None, help="evaluate on these files instead of a held-out split")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA alpha (scale = alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the LoRA input")
    p.add_argument("--targets", default=d.targets, help="q_proj,v_proj ... (Meta wq.. too) or all")
    p.add_argument("--modules-to-save", default="", help="fully trained modules, e.g. embed_tokens,lm_head")
    p.add_argument("--train-on-inputs", action="store_true", help="also learn the prompt tokens")
    p.add_argument("--base-dtype", default=d.base_dtype, choices=["int8", "bf16", "fp32"], help="frozen base precision")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every N steps (and at the end)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps")
    p.add_argument("--resume", nargs="?", const="", default=None, help="continue from the last checkpoint [in DIR]")
    p.add_argument("--seed", type=int, default=d.seed, help="data order, dropout and LoRA init")
    p.add_argument("--group-by-length", action="store_true", help="batch examples of similar length")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    p.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--int8-path", default=None, help="force the int8 kernels: dequant, gemv, weight_only, int_mm, "
                   "or forward=NAME,backward=NAME (default: measured for this CPU)")
    a = p.parse_args(argv)
    fields = {k: v for k, v in vars(a).items() if k not in ("modules_to_save",)}
    fields["modules_to_save"] = [m for m in a.modules_to_save.split(",") if m]
    return TrainConfig(**fields)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    from lora_core.trainer import train

    try:
        train(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, OSError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
