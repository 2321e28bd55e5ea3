"""Many prompts answered together: left-padded into one batch, one prefill, then one forward per new token for
the whole batch (what generate.py --input-file does). Each row decodes as generate() would decode it alone:
its RoPE positions start at 0 after its padding, padded keys are masked out, its repetition penalty sees its
own context, its sampling draws from its own generator seeded by `seed`.
"""
from __future__ import annotations

import time

import torch

from .device import autocast
from .fast_decode import decoder_of
from .generation import Generated, TextStopper, output_head
from .model import Transformer
from .sampling import Sampling, next_token


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, attention_mask, positions), each (B, T), T the longest prompt: padding on the left, mask 0 there,
    positions 0..n-1 over each row's own n tokens (0 on the padding, which no real token attends to)."""
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    return tokens, mask, positions


class _Row:
    """One prompt's decoding state: its context (for the penalty), its text so far, why it stopped."""

    def __init__(self, tok, prompt: list[int], stops: tuple[str, ...], vocab: int, seed: int | None, device):
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.seen[torch.tensor(prompt, device=device)] = True
        self.generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        self.decoder, self.stopper = tok.stream(), TextStopper(stops)
        self.new: list[int] = []
        self.reason: str | None = None
        self.steps = 0

    def add(self, token: int, eos_id: int, ignore_eos: bool):
        if token == eos_id and not ignore_eos:
            self.reason = "eos"
            return
        self.new.append(token)
        self.seen[token] = True
        self.stopper.add(self.decoder.put(token))
        if self.stopper.stopped:
            self.reason = "stop"

    def finish(self):
        if not self.stopper.stopped:  # as generate(): an unfinished character at the end is dropped
            self.stopper.add(self.decoder.flush().rstrip("\ufffd"))


@torch.inference_mode()
def generate_batch(model: Transformer, tok, prompts: list[list[int]], sampling: Sampling | None = None,
                   max_new_tokens: int = 256, stop: tuple[str, ...] = (), seed: int | None = None,
                   ignore_eos: bool = False, compile: bool = False) -> list[Generated]:
    """generate() for several prompts at once; results in the prompts' order. Rows that are done keep riding
    along (their tokens are ignored) until every row is done. prefill_s and decode_s are the batch's; compile
    as generate()'s (one graph per batch size)."""
    sampling = sampling or Sampling()
    context = model.args.max_seq_len
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i + 1} of the batch is empty")
        if len(p) >= context:
            raise ValueError(f"prompt {i + 1} of the batch is {len(p)} tokens; the model's context is {context}: "
                             "shorten it")
    T = max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, context - T)
    weight = model.embed_tokens.weight
    device = weight.device
    tokens, mask, positions = (t.to(device) for t in left_pad(prompts, tok.pad_id))
    B = len(prompts)
    decoder = decoder_of(model, output_head(model), compile)
    decoder.begin(B, T + max_new_tokens)
    compile_before = decoder.stats.compile_s
    rows = [_Row(tok, p, tuple(s for s in stop if s), model.args.vocab_size, seed, device) for p in prompts]

    t0 = time.perf_counter()
    with autocast(device):
        logits = decoder.prefill(tokens, mask, positions)  # fp32 (B, vocab) of each row's last position
    prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    last = positions[:, -1:]  # (B, 1)
    steps = 0
    for i in range(max_new_tokens):
        nxt = []
        for row, row_logits in zip(rows, logits):
            if row.reason:  # done: fed padding from now on
                nxt.append(tok.pad_id)
                continue
            token = next_token(row_logits, row.seen, sampling, row.generator)
            row.add(token, tok.eos_id, ignore_eos)
            nxt.append(token)
        if all(row.reason for row in rows) or i + 1 == max_new_tokens:
            break
        last = last + 1
        with autocast(device):
            logits = decoder.step(torch.tensor(nxt, device=device)[:, None], last)
        steps += 1
        for row in rows:
            row.steps += not row.reason
    compile_s = decoder.stats.compile_s - compile_before
    decode_s = time.perf_counter() - t1 - compile_s
    out = []
    for row, p in zip(rows, prompts):
        row.finish()
        out.append(Generated(row.stopper.text, row.new, row.reason or "length", len(p), prefill_s, row.steps,
                             decode_s, compile_s, decoder.want_compile, decoder.native is not None))
    return out
