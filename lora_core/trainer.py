"""The training loop, written out: micro-batches accumulated to one optimizer step, the loss normalised
by the target tokens of the whole step, AdamW on the LoRA parameters, warmup + schedule, clipping,
evaluation, atomic checkpoints and exact resume, data parallel across torchrun processes."""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from .data import IGNORE, Example, load_examples, load_template, show_example, split_validation
from .device import autocast, model_device, pick_device
from .kernels import dispatch


@dataclass
class TrainConfig:
    data: list[str]
    base: str = "smollm2-135m"
    output: str = "./lora-out"
    template: str = "alpaca"
    batch_size: int = 128
    micro_batch_size: int = 4
    epochs: float = 3
    max_steps: int | None = None
    lr: float = 3e-4
    warmup_steps: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    cutoff_len: int = 256
    val_size: float = 2000
    val_data: list[str] | None = None
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    targets: str = "q_proj,v_proj"
    modules_to_save: list[str] = field(default_factory=list)
    train_on_inputs: bool = False
    base_dtype: str = "int8"
    eval_every: int = 200
    save_every: int = 200
    resume: str | None = None
    seed: int = 42
    group_by_length: bool = False
    strict: bool = False
    gradient_checkpointing: bool = False
    keep_checkpoints: int = 2
    device: str = "auto"
    int8_path: str | None = None

    def check(self):
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"--batch-size {self.batch_size} is not a multiple of --micro-batch-size "
                             f"{self.micro_batch_size}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"--schedule {self.schedule!r}: choose cosine, linear or constant")
        if self.cutoff_len < 8:
            raise ValueError(f"--cutoff-len {self.cutoff_len} is too short to hold a prompt and an answer")


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup to cfg.lr over the warmup steps, then the schedule down to 0 at total_steps."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant" or total_steps <= warmup:
        return cfg.lr
    progress = (step - warmup) / max(total_steps - warmup, 1)
    if cfg.schedule == "linear":
        return cfg.lr * (1 - progress)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_order(lengths: list[int], epoch: int, cfg: TrainConfig) -> list[int]:
    """Example indices for one epoch: shuffled by seed and epoch; with group_by_length, chunks of 50
    optimizer steps are sorted by length so batches waste less padding."""
    order = list(range(len(lengths)))
    random.Random(cfg.seed * 1000 + epoch).shuffle(order)
    if cfg.group_by_length:
        chunk = 50 * cfg.batch_size
        order = [i for c in range(0, len(order), chunk) for i in sorted(order[c:c + chunk], key=lambda j: -lengths[j])]
    return order


def step_indices(n: int, lengths: list[int], step: int, cfg: TrainConfig) -> list[int]:
    """The examples of global optimizer step `step` (the last step of an epoch may be short)."""
    per_epoch = math.ceil(n / cfg.batch_size)
    epoch, k = divmod(step, per_epoch)
    return epoch_order(lengths, epoch, cfg)[k * cfg.batch_size:(k + 1) * cfg.batch_size]


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) input ids and labels, built on the host (the loop moves them in one copy); a
    causal model never lets padding reach real tokens."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long, device="cpu")
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long, device="cpu")
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids, device="cpu")
        labels[i, :len(e.labels)] = torch.tensor(e.labels, device="cpu")
    return ids, labels


LOSS_CHUNK = 256  # target positions whose logits exist at once (256 x 49152 fp32 = 48 MiB for SmolLM2)


def summed_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over the target tokens of a micro-batch.

    Only target positions go through lm_head (masked prompt tokens add nothing to the loss), a chunk
    at a time, so the (B, T, vocab) logits never exist at once (see LinearCrossEntropy).
    """
    h = model.hidden(ids)[:, :-1].flatten(0, 1)  # (B*(T-1), dim): position t predicts token t+1
    targets = labels[:, 1:].flatten()
    keep = targets != IGNORE
    return LinearCrossEntropy.apply(h[keep], model.lm_head.weight, targets[keep], torch.is_grad_enabled())


class LinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(h @ W^T, targets)), with its gradients worked out during the forward pass.

    The loss is a scalar, so d loss / d logits = softmax - onehot is known as soon as a chunk's logits
    are: the chunk's share of dh (and of dW when W is trained) is taken then and the logits dropped.
    Backward only scales the stored gradients; nothing is recomputed and no log_softmax is kept.
    Logits are computed in fp32 whatever W's dtype (bf16 matmuls are slow on CPUs without bf16 units).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, with_grads: bool):
        w = weight.float()
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if with_grads and h.requires_grad else None
        grad_w = torch.zeros_like(w) if with_grads and weight.requires_grad else None
        for s in range(0, len(targets), LOSS_CHUNK):
            hc, tc = h[s:s + LOSS_CHUNK].float(), targets[s:s + LOSS_CHUNK]
            logits = hc @ w.t()  # (n, vocab)
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(len(tc), device=h.device)
            total += (lse - logits[rows, tc]).sum()
            if grad_h is None and grad_w is None:
                continue  # evaluation: the loss alone
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[rows, tc] -= 1
            if grad_h is not None:
                grad_h[s:s + LOSS_CHUNK] = g @ w
            if grad_w is not None:
                grad_w.addmm_(g.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else (grad_h * grad_out).to(ctx.h_dtype)
        dw = None if grad_w is None else (grad_w * grad_out).to(ctx.w_dtype)
        return dh, dw, None, None


def micro_batches(examples: list[Example], size: int) -> list[list[Example]]:
    ordered = sorted(examples, key=lambda e: len(e.input_ids))  # similar lengths together: less padding
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def accumulate_gradients(model, examples: list[Example], n_targets: int, micro_size: int,
                         pad_id: int) -> tuple[torch.Tensor, int]:
    """Backward over micro-batches with each loss divided by the whole step's target count, so k
    micro-batches give exactly the gradient of one batch of k. Returns (loss sum / n_targets as a 0-d
    tensor on the model's device, tokens); the caller reads the loss once per step."""
    device = model_device(model)
    total, tokens = torch.zeros((), device=device), 0
    for mb in micro_batches(examples, micro_size):
        ids, labels = (t.to(device, non_blocking=True) for t in collate(mb, pad_id))
        with autocast(device):
            loss = summed_loss(model, ids, labels) / n_targets
        loss.backward()
        total += loss.detach()
        tokens += int(ids.numel())
    return total, tokens


@torch.no_grad()
def evaluate(model, examples: list[Example], micro_size: int, pad_id: int) -> float:
    was_training = model.training
    model.eval()
    device = model_device(model)
    total = torch.zeros((), device=device)
    for mb in micro_batches(examples, micro_size):
        with autocast(device):
            total += summed_loss(model, *(t.to(device) for t in collate(mb, pad_id)))
    model.train(was_training)
    total = total.item()
    return total / sum(e.n_targets for e in examples)


def _distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device) under torchrun, initialising the process group (NCCL for CUDA
    tensors, gloo for CPU ones); (0, 1, device) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def train(cfg: TrainConfig) -> dict:
    """Train a LoRA adapter; returns the final metrics. Everything a user sees is written by rank 0."""
    import lora_core
    from .adapter import save_adapter
    from .loader import base_fingerprint
    from .lora import apply_lora, enable_modules_to_save, mark_only_lora_trainable
    from .metrics import MetricsLog
    from .train_state import latest_checkpoint, restore_checkpoint, save_checkpoint

    cfg.check()
    if cfg.int8_path:
        dispatch.force(cfg.int8_path)
    rank, world, device = _distributed(pick_device(cfg.device))
    main = rank == 0
    out = Path(cfg.output)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    model, tok = lora_core.load(cfg.base, dtype=cfg.base_dtype, progress=main)
    model.to(device)  # before LoRA and the optimizer state, which are made on the base's device
    template = load_template(cfg.template)
    examples, report = load_examples(cfg.data, tok, template, cfg.cutoff_len, cfg.train_on_inputs, cfg.strict)
    if cfg.val_data:
        train_set, (val_set, _) = examples, load_examples(cfg.val_data, tok, template, cfg.cutoff_len,
                                                          cfg.train_on_inputs, cfg.strict)
    else:
        val_size = cfg.val_size
        if val_size >= 1 and val_size > len(examples) // 10:
            val_size = len(examples) // 10
            if main:
                print(f"--val-size {cfg.val_size:g} is more than a tenth of the {len(examples)} examples; "
                      f"holding out {val_size} instead")
        train_set, val_set = split_validation(examples, val_size, cfg.seed)
    if main:
        print(f"data: {report.summary()}; {len(train_set)} train, {len(val_set)} eval")
        for line in report.bad[:5]:
            print(f"  skipped {line}")
        print("example (masked part in [[...]]):\n" + show_example(train_set[0], tok) + "\n")

    extras = {"base": cfg.base, "fingerprint": base_fingerprint(model), "vocab_size": model.args.vocab_size}
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    ckpt_dir = Path(cfg.resume) if cfg.resume else out / "checkpoints"
    resume_from = latest_checkpoint(ckpt_dir) if cfg.resume is not None else None
    if cfg.resume is not None and resume_from is None and main:
        print(f"--resume: no complete checkpoint in {ckpt_dir}; starting from step 0")
    if cfg.resume is None and latest_checkpoint(ckpt_dir) is not None:
        raise FileExistsError(f"{ckpt_dir} holds checkpoints of an earlier run; add --resume to continue it "
                              "or choose another --output")

    def make_optimizer():
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    if resume_from is not None:
        start, optimizer = restore_checkpoint(resume_from, model, make_optimizer)
        mark_only_lora_trainable(model, tuple(cfg.modules_to_save))
        if main:
            print(f"resumed from {resume_from} at step {start}")
    else:
        apply_lora(model, cfg.targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        enable_modules_to_save(model, cfg.modules_to_save)
        mark_only_lora_trainable(model, tuple(cfg.modules_to_save))
        optimizer, start = make_optimizer(), 0
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]

    if main:
        out.mkdir(parents=True, exist_ok=True)
        run = {**asdict(cfg), "device": str(device)}
        if cfg.base_dtype == "int8" and device.type == "cpu":
            run["int8_paths"] = dispatch.plan().to_dict()
        (out / "training_args.json").write_text(json.dumps(run, indent=2, ensure_ascii=False))
    log = MetricsLog(out / "metrics.jsonl", resume_step=start) if main else None
    lengths = [len(e.input_ids) for e in train_set]
    bar = tqdm(total=total_steps, initial=start, disable=not main, unit="step", dynamic_ncols=True)
    row = {}
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        batch = [train_set[i] for i in step_indices(len(train_set), lengths, step, cfg)]
        n_targets = sum(e.n_targets for e in batch)  # over all ranks: every rank knows the whole step
        lr = lr_at(step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, tokens = accumulate_gradients(model, batch[rank::world], n_targets, cfg.micro_batch_size, tok.pad_id)
        if world > 1:
            loss, tokens = _all_reduce_grads(trainable, loss, tokens)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        loss, grad_norm = torch.stack([loss.float(), grad_norm.float()]).tolist()  # the one host sync of the step
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step + 1}: the loss is {loss}; stopped before the adapter was touched "
                                     f"(lower --lr or check the data); the last checkpoint in {ckpt_dir} is intact")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        row = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": tokens / (time.perf_counter() - t0)}
        if val_set and (done % cfg.eval_every == 0 or done == total_steps):
            row["eval_loss"] = evaluate(model, val_set, cfg.micro_batch_size, tok.pad_id)
        if main:
            log.add(**row)
            if "eval_loss" in row or done == total_steps:
                log.plot(out / "loss.png")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if done % cfg.save_every == 0 and done < total_steps:
                save_checkpoint(ckpt_dir, model, optimizer, done, cfg.modules_to_save, cfg.keep_checkpoints, extras)
    bar.close()
    if main:
        save_adapter(model, out, base_name=cfg.base, extras=extras, modules_to_save=tuple(cfg.modules_to_save))
        print(f"adapter written to {out} (step {total_steps}, train loss {row.get('loss', float('nan')):.4f}"
              + (f", eval loss {row['eval_loss']:.4f})" if "eval_loss" in row else ")"))
    return row


def _all_reduce_grads(params, loss: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
    """Sum gradients (each rank's loss is already divided by the global target count) and the stats."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
    stats = torch.stack([loss.double(), torch.tensor(float(tokens), dtype=torch.float64, device=loss.device)])
    dist.all_reduce(stats)
    return stats[0], int(stats[1].item())
