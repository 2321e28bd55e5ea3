"""The training loop, written out: micro-batches accumulated to one optimizer step, the loss normalised
by the target tokens of the whole step, AdamW on the LoRA parameters, warmup + schedule, clipping,
evaluation, atomic checkpoints and exact resume, data parallel across torchrun processes.

setup() does everything before the first step (data first, so a bad file is reported before a model
load); fit() is the loop; train() is both plus the final save.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .adapter import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from .api import load_from, open_base
from .batching import collate, micro_batches, step_indices
from .data import Example, load_examples, load_template, show_example, split_validation
from .device import autocast, model_device, pick_device
from .kernels import dispatch
from .loader import base_fingerprint
from .lora import apply_lora, enable_modules_to_save, mark_only_lora_trainable
from .loss import summed_loss
from .metrics import MetricsLog
from .swiglu import fuse_swiglu
from .train_config import TrainConfig
from .train_state import DiskFull, latest_checkpoint, read_state, remove_partial, restore_checkpoint, save_checkpoint
from .vocab import extended_tokenizer, resize_model

RUN_FILES = ("training_args.json", "metrics.jsonl", "loss.png", CONFIG_NAME, WEIGHTS_NAME, "tokenizer.json",
             "tokenizer.model", "tokenizer_config.json")  # tokenizer files: an --extend-vocab run's
# settings that make a different run if changed on --resume (the rest may change: lr, epochs, eval...)
SAME_RUN = ("base", "data", "template", "cutoff_len", "train_on_inputs", "lora_r", "lora_alpha", "targets",
            "modules_to_save", "base_dtype", "seed", "batch_size", "val_size", "val_data", "group_by_length",
            "extend_vocab")


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


def accumulate_gradients(model, examples: list[Example], n_targets: int, micro_size: int, pad_id: int,
                         micro_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """Backward over micro-batches with each loss divided by the whole step's target count, so k
    micro-batches give exactly the gradient of one batch of k. Returns (loss sum / n_targets as a 0-d
    tensor on the model's device, real (non-pad) tokens); the caller reads the loss once per step.
    The MLPs' silu(gate) * up runs through lora_core.swiglu (swapped in on the first call), which keeps
    a third fewer of their bytes for backward."""
    fuse_swiglu(model)
    device = model_device(model)
    total, tokens = torch.zeros((), device=device), 0
    for mb in micro_batches(examples, micro_size, micro_tokens):
        ids, labels = (t.to(device, non_blocking=True) for t in collate(mb, pad_id))
        with autocast(device):
            loss = summed_loss(model, ids, labels) / n_targets
        loss.backward()
        total += loss.detach()
        tokens += sum(len(e.input_ids) for e in mb)
    return total, tokens


@torch.no_grad()
def evaluate(model, examples: list[Example], micro_size: int, pad_id: int, micro_tokens: int | None = None) -> float:
    was_training = model.training
    model.eval()
    device = model_device(model)
    total = torch.zeros((), device=device)
    for mb in micro_batches(examples, micro_size, micro_tokens):
        with autocast(device):
            total += summed_loss(model, *(t.to(device) for t in collate(mb, pad_id)))
    model.train(was_training)
    return total.item() / sum(e.n_targets for e in examples)


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


@dataclass
class Run:
    """What the loop needs, made by setup()."""

    cfg: TrainConfig
    model: torch.nn.Module
    tok: object
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]  # the trainable ones
    train_set: list[Example]
    val_set: list[Example]
    total_steps: int
    start: int
    out: Path
    ckpt_dir: Path
    extras: dict  # recorded with the adapter: base, fingerprint, vocab_size
    record: dict  # the run's settings as training_args.json will hold them
    rank: int = 0
    world: int = 1
    log: MetricsLog | None = None
    lock: object = None  # the output directory's lock file, held while the run lives

    @property
    def main(self) -> bool:
        return self.rank == 0


def read_data(cfg: TrainConfig, tok, main: bool) -> tuple[list[Example], list[Example]]:
    """Training and evaluation examples, with the summary and one decoded example printed."""
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
        for warning in report.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print("example (masked part in [[...]]):\n" + show_example(train_set[0], tok) + "\n")
    return train_set, val_set


def _lock(out: Path):
    """An exclusive lock on the output directory for the life of the process: a second run into the same
    directory would interleave metrics and mix checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "w")  # noqa: SIM115 (held open until the process ends)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FileExistsError(f"{out}: another training run is writing here (it holds {out / '.lock'}); wait for it "
                              "or choose another --output") from None
    return handle


def _check_resume(cfg: TrainConfig, saved: dict, main: bool) -> dict:
    """Refuse a resume that would be another run; say (and return) what changed that may change."""
    broken = {k: (saved.get(k), getattr(cfg, k)) for k in SAME_RUN if k in saved and saved[k] != getattr(cfg, k)}
    if broken:
        k, (was, now) = next(iter(broken.items()))
        raise ValueError(f"--resume: --{k.replace('_', '-')} was {was!r} in the checkpointed run and is {now!r} now; "
                         "that is another run: start it with another --output")
    ignore = {"resume", "force", "device", "int8_path"}
    changed = {k: (v, getattr(cfg, k)) for k, v in saved.items()
               if k not in ignore and hasattr(cfg, k) and v != getattr(cfg, k)}
    if main:
        for k, (was, now) in changed.items():
            print(f"--resume: --{k.replace('_', '-')} changed from {was!r} to {now!r}", file=sys.stderr)
    return {k: now for k, (_, now) in changed.items()}


def setup(cfg: TrainConfig) -> Run:
    """Everything before the first step: checks, data, model, LoRA (or the checkpoint resumed), optimizer."""
    cfg.check()
    if cfg.int8_path:
        dispatch.force(cfg.int8_path)
    rank, world, device = _distributed(pick_device(cfg.device))
    main = rank == 0
    out = Path(cfg.output)
    ckpt_dir = Path(cfg.resume) if cfg.resume else out / "checkpoints"
    if cfg.resume and not ckpt_dir.is_dir():
        raise FileNotFoundError(f"--resume {cfg.resume}: no such directory; give a run's checkpoints directory, or "
                                "--resume alone to continue the run in --output")
    lock = _lock(out) if main else None
    if main:
        remove_partial(ckpt_dir)
    resume_from = latest_checkpoint(ckpt_dir)
    if cfg.resume is None and resume_from is not None:
        raise FileExistsError(f"{ckpt_dir} holds checkpoints of an earlier run; add --resume to continue it "
                              "or choose another --output")
    if cfg.resume is not None and resume_from is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {ckpt_dir}; run without --resume to start")
    finished = (out / WEIGHTS_NAME).is_file() and (out / "training_args.json").is_file()
    if finished and cfg.resume is None and not cfg.force:
        raise FileExistsError(f"{out} holds the finished adapter of an earlier run; add --force to replace it or "
                              "choose another --output")
    state = read_state(resume_from) if resume_from is not None else None
    changed = _check_resume(cfg, state.get("config", {}), main) if state is not None else {}
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    src, tok = open_base(cfg.base)
    base_tok = tok
    if cfg.extend_vocab:  # --extend-vocab (lora_core/vocab.py): the data is tokenized with the extended vocabulary
        tok = extended_tokenizer(cfg.extend_vocab, tok, src.args.vocab_size, cfg.data, resume_from,
                                 log=print if main else None)
    train_set, val_set = read_data(cfg, tok, main)  # a bad data file is reported before the model loads
    model = load_from(src, cfg.base_dtype, progress=main, device=device)
    extras = {"base": cfg.base, "fingerprint": base_fingerprint(model), "vocab_size": model.args.vocab_size}
    if tok is not base_tok:  # --extend-vocab: new rows, trained with the rest of the two matrices (modules_to_save)
        resize_model(model, tok, base_tok)

    def make_optimizer():
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)

    if state is not None:
        optimizer = restore_checkpoint(resume_from, model, make_optimizer, state)
        mark_only_lora_trainable(model, tuple(cfg.modules_to_save))
        start = state["step"]
        if main:
            print(f"resumed from {resume_from} at step {start}")
    else:
        apply_lora(model, cfg.targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        enable_modules_to_save(model, cfg.modules_to_save)
        mark_only_lora_trainable(model, tuple(cfg.modules_to_save))
        optimizer, start = make_optimizer(), 0
    model.recompute_activations = cfg.recompute
    model.train()

    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if start > total_steps or (start == total_steps and finished):
        raise ValueError(f"--resume: the checkpoint in {ckpt_dir} is at step {start} and this run ends at step "
                         f"{total_steps}; raise --epochs or --max-steps to train further")
    record = asdict(cfg)
    record["device"] = str(device)
    if cfg.base_dtype == "int8" and device.type == "cpu":
        record["int8_paths"] = dispatch.plan().to_dict()
    log = None
    if main:
        if finished and cfg.force and cfg.resume is None:
            for name in RUN_FILES:  # the user asked to replace the finished run
                (out / name).unlink(missing_ok=True)
        log = MetricsLog(out / "metrics.jsonl", resume_step=start)
        if changed:
            log.add(step=start, resumed=True, changed=changed)
    params = [p for p in model.parameters() if p.requires_grad]
    return Run(cfg, model, tok, optimizer, params, train_set, val_set, total_steps, start, out, ckpt_dir, extras,
               record, rank, world, log, lock)


def fit(run: Run) -> dict:
    """The loop: one optimizer step per iteration, metrics every step, evaluation and checkpoints on schedule."""
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    lengths = [len(e.input_ids) for e in run.train_set]
    row = {}
    # closed before any error is printed, so the error stays the last line a user sees
    bar = tqdm(total=run.total_steps, initial=run.start, disable=not run.main, unit="step", dynamic_ncols=True)
    with bar:
        for step in range(run.start, run.total_steps):
            t0 = time.perf_counter()
            chosen = step_indices(lengths, step, cfg.seed, cfg.batch_size, cfg.group_by_length)
            batch = [run.train_set[i] for i in chosen]
            n_targets = sum(e.n_targets for e in batch)  # over all ranks: every rank knows the whole step
            lr = lr_at(step, cfg, run.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, tokens = accumulate_gradients(model, batch[run.rank::run.world], n_targets, cfg.micro_size,
                                                run.tok.pad_id, cfg.micro_batch_tokens)
            if run.world > 1:
                loss, tokens = _all_reduce_grads(run.params, loss, tokens)
            grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm or math.inf)  # 0: no clip
            loss, grad_norm = torch.stack([loss.float(), grad_norm.float()]).tolist()  # the step's one host sync
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise FloatingPointError(f"step {step + 1}: the loss is {loss}, the gradient norm {grad_norm}; "
                                         "stopped before the adapter was touched (lower --lr or check the data); the "
                                         f"last checkpoint in {run.ckpt_dir} is intact")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            seconds = time.perf_counter() - t0
            row = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                   "seconds": seconds, "tokens_per_s": tokens / seconds}  # real (non-pad) tokens
            if run.val_set and (done % cfg.eval_every == 0 or done == run.total_steps):
                row["eval_loss"] = evaluate(model, run.val_set, cfg.micro_size, run.tok.pad_id,
                                            cfg.micro_batch_tokens)
            if run.main:
                run.log.add(**row)
                if "eval_loss" in row or done == run.total_steps:
                    run.log.plot(run.out / "loss.png")
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                bar.update(1)
                if done % cfg.save_every == 0 or done == run.total_steps:
                    save_checkpoint(run.ckpt_dir, model, optimizer, done, cfg.modules_to_save,
                                    cfg.keep_checkpoints, run.extras, run.record)
    return row


def finish(run: Run, row: dict):
    """The adapter, then training_args.json: the run's record appears only beside its own finished adapter."""
    cfg = run.cfg
    try:
        save_adapter(run.model, run.out, base_name=cfg.base, extras=run.extras,
                     modules_to_save=tuple(cfg.modules_to_save))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFull(f"{run.out}: the disk filled up while writing the adapter; nothing partial was kept and "
                           f"the last checkpoint in {run.out / 'checkpoints'} is intact. Free some space and run again "
                           "with --resume") from e
        raise
    tmp = run.out / ".training_args.json.tmp"
    try:
        tmp.write_text(json.dumps(run.record, indent=2, ensure_ascii=False))
        os.replace(tmp, run.out / "training_args.json")
    finally:
        tmp.unlink(missing_ok=True)
    row = row or (run.log.rows[-1] if run.log.rows else {})  # killed between the last checkpoint and this save
    print(f"adapter written to {run.out} (step {run.total_steps}, train loss {row.get('loss', float('nan')):.4f}"
          + (f", eval loss {row['eval_loss']:.4f})" if "eval_loss" in row else ")"))


def train(cfg: TrainConfig) -> dict:
    """Train a LoRA adapter; returns the final metrics. Everything a user sees is written by rank 0."""
    run = setup(cfg)
    try:
        row = fit(run)
        if run.main:
            finish(run, row)
    except BaseException:
        if run.main:
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                (run.out / f"{name}.tmp").unlink(missing_ok=True)  # a final save cut short
        raise
    return row


