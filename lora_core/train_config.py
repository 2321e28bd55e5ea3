"""TrainConfig: every setting of a training run, with the help text and choices train.py's flags are made
from (lora_core/cli/train.py), and the checks that refuse settings that cannot be meant."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .api import check_base_dtype
from .device import DEVICES
from .loader import DEFAULT_BASE

SCHEDULES = ("cosine", "linear", "constant")


def _opt(default, help: str, **extra):
    """A field with the metadata train.py turns into a flag (help, choices, nargs, aliases...)."""
    kwargs = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, **extra}, **kwargs)


@dataclass
class TrainConfig:
    data: list[str] = _opt(list, "alpaca JSON / JSONL files (or Chinese-Vicuna chats)", required=True)
    base: str = _opt(DEFAULT_BASE, "model directory, .gguf file or smollm2-135m")
    output: str = _opt("./lora-out", "where the adapter, metrics and checkpoints go")
    template: str = _opt("alpaca", "alpaca, alpaca_short, vicuna_chat or a template JSON file")
    batch_size: int = _opt(128, "examples per optimizer step")
    micro_batch_size: int = _opt(4, "examples per forward pass")
    micro_batch_tokens: int | None = _opt(None, "instead of a count, fill each forward pass up to this many padded "
                                                "tokens (many short examples or few long ones: steadier memory)")
    epochs: float = _opt(3.0, "passes over the training data")
    max_steps: int | None = _opt(None, "stop after this many optimizer steps (default: epochs decide)")
    lr: float = _opt(3e-4, "peak learning rate")
    warmup_steps: int = _opt(100, "linear warmup steps")
    schedule: str = _opt("cosine", "decay after warmup", choices=SCHEDULES)
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: no clipping)")
    cutoff_len: int = _opt(256, "tokens per example, EOS included")
    val_size: float = _opt(2000.0, "held-out count, or fraction if < 1; 0 disables")
    val_data: list[str] | None = _opt(None, "evaluate on these files instead of a held-out split")
    lora_r: int = _opt(8, "LoRA rank")
    lora_alpha: float = _opt(16.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input")
    targets: str = _opt("q_proj,v_proj", "q_proj,v_proj ... (Meta wq.. too) or all")
    modules_to_save: list[str] = _opt(list, "fully trained modules, e.g. embed_tokens lm_head")
    extend_vocab: str | None = _opt(None, "grow the vocabulary first: auto (new tokens learned from --data), a "
                                          "SentencePiece .model to merge, or a directory from python -m "
                                          "lora_core.vocab; embed_tokens and lm_head are then trained in full")
    train_on_inputs: bool = _opt(False, "also learn the prompt tokens")
    base_dtype: str = _opt("int8", "frozen base precision: int8, bf16 or fp32")
    eval_every: int = _opt(200, "evaluate every N steps (and at the end)")
    save_every: int = _opt(200, "checkpoint every N steps")
    keep_checkpoints: int = _opt(2, "how many of the latest checkpoints to keep")
    resume: str | None = _opt(None, "continue from the last checkpoint [in DIR]", nargs="?", const="")
    seed: int = _opt(42, "data order, dropout and LoRA init")
    group_by_length: bool = _opt(False, "batch examples of similar length")
    strict: bool = _opt(False, "stop at the first bad record instead of skipping it")
    recompute: bool = _opt(False, "recompute each block's activations in backward: less memory, about 30% slower",
                           aliases=("--gradient-checkpointing",))
    device: str = _opt("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    int8_path: str | None = _opt(None, "force the int8 kernels: dequant, gemv, weight_only, int_mm, or "
                                       "forward=NAME,backward=NAME (default: measured for this CPU)")
    force: bool = _opt(False, "replace the finished adapter already in --output")

    def __post_init__(self):
        # "--modules-to-save embed_tokens,lm_head" and "embed_tokens lm_head" mean the same
        self.modules_to_save = [m for item in self.modules_to_save for m in item.split(",") if m]
        if self.extend_vocab:  # the new rows are learned: both matrices are trained (PEFT's modules_to_save)
            self.modules_to_save += [m for m in ("embed_tokens", "lm_head") if m not in self.modules_to_save]

    @property
    def micro_size(self) -> int:
        """Examples per micro-batch at most: the count, or with a token budget, the whole step."""
        return self.batch_size if self.micro_batch_tokens else self.micro_batch_size

    def check(self):
        """Refuse settings that cannot be meant, in one line each."""
        positive_int = ("batch_size", "micro_batch_size", "eval_every", "save_every", "keep_checkpoints", "lora_r")
        for name in positive_int:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        for name in ("lr", "epochs", "lora_alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be a positive number")
        for name in ("weight_decay", "max_grad_norm", "val_size"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be 0 or more")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora-dropout {self.lora_dropout}: must be in [0, 1)")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise ValueError(f"--micro-batch-tokens {self.micro_batch_tokens}: must be at least 1 (leave it out "
                             "to group by --micro-batch-size alone)")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps {self.warmup_steps}: must be 0 or more")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps {self.max_steps}: must be at least 1 (leave it out to let --epochs decide)")
        if self.micro_batch_tokens is None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"--batch-size {self.batch_size} is not a multiple of --micro-batch-size "
                             f"{self.micro_batch_size}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule {self.schedule!r}: choose {', '.join(SCHEDULES)}")
        check_base_dtype(self.base_dtype, training=True)
        if self.cutoff_len < 8:
            raise ValueError(f"--cutoff-len {self.cutoff_len} is too short to hold a prompt and an answer")
        if not self.data:
            raise ValueError("--data: give at least one data file")
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"--device {self.device!r}: choose auto, cpu, cuda or cuda:N")
