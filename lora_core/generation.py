"""Generation with a KV cache: one prefill of the prompt, then one forward per new token.

Text is streamed as it completes (never half a UTF-8 character) and held back while it could still
turn out to be the start of a stop string, so what is printed never needs to be taken back.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .device import autocast
from .fast_decode import decoder_of
from .model import Transformer
from .sampling import Sampling, next_token


@dataclass
class Generated:
    text: str
    token_ids: list[int]
    stop_reason: str  # "eos", "stop" (a stop string), "length" or "cancelled"
    prompt_tokens: int
    prefill_s: float
    decode_steps: int  # one-token forward passes after the prefill
    decode_s: float
    compile_s: float = 0.0  # torch.compile time of the decode step paid during this call (0: eager or reused)
    compiled: bool = False  # the decode steps ran the compiled graph
    native: bool = False  # the decode steps ran our C step (lora_core.native_decode)

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_steps else 0.0

    def speed(self) -> str:
        prefill = self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0
        compiled = "; compiled" + (f" (compiling took {self.compile_s:.1f} s)" if self.compile_s else "")
        return (f"prompt {self.prompt_tokens} tokens: prefill {prefill:.1f} tok/s; {len(self.token_ids)} new tokens: "
                f"decode {self.decode_tok_s:.1f} tok/s{compiled if self.compiled else ''}"
                f"{'; native C step' if self.native else ''}; "
                f"stopped by {self.stop_reason}")


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of text that is the beginning of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStopper:
    """Accumulates decoded text; says when a stop string appears and how much is safe to print."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.shown = 0  # characters already handed out
        self.stopped = False

    def add(self, piece: str) -> str:
        """Add newly decoded text; return the part that can be printed now."""
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self.flush()
        safe = len(self.text) - _held_back(self.text, self.stops)
        out, self.shown = self.text[self.shown:safe], max(self.shown, safe)
        return out

    def flush(self) -> str:
        out, self.shown = self.text[self.shown:], len(self.text)
        return out


def output_head(model: Transformer):
    """The output layer used while generating: the int8 copy an int8 base carries (lora_core.quant), else
    lm_head itself (float bases stay exact)."""
    head = getattr(model, "lm_head_int8", None)
    return model.lm_head if head is None else head


@torch.inference_mode()
def generate(model: Transformer, tok, prompt_ids: list[int], sampling: Sampling | None = None,
             max_new_tokens: int = 256, stop: tuple[str, ...] = (), seed: int | None = None,
             on_text: Callable[[str], None] | None = None, ignore_eos: bool = False,
             should_stop: Callable[[], bool] | None = None, compile: bool = False) -> Generated:
    """Continue prompt_ids; stops at EOS, at a stop string (cut off), after max_new_tokens, or when
    should_stop() says so (a stop button, a client gone: stop_reason "cancelled").

    on_text receives the response piece by piece as it becomes final; ignore_eos (benchmarks) runs
    to max_new_tokens. compile runs the decode steps through torch.compile (lora_core.fast_decode; compiled
    once per process and shape, eager when compiling fails).
    """
    sampling = sampling or Sampling()
    context = model.args.max_seq_len
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) >= context:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens; the model's context is {context}: shorten it")
    max_new_tokens = min(max_new_tokens, context - len(prompt_ids))
    weight = model.embed_tokens.weight
    device = weight.device
    decoder = decoder_of(model, output_head(model), compile)
    decoder.begin(1, len(prompt_ids) + max_new_tokens)
    compile_before = decoder.stats.compile_s
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    seen = torch.zeros(model.args.vocab_size, dtype=torch.bool, device=device)
    seen[torch.tensor(prompt_ids, device=device)] = True
    text_decoder, stopper = tok.stream(), TextStopper(stop)
    emit = on_text or (lambda _: None)
    new, reason, steps = [], "length", 0

    t0 = time.perf_counter()
    with autocast(device):
        logits = decoder.prefill(torch.tensor([prompt_ids], device=device))[0]
    prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(max_new_tokens):
        nxt = next_token(logits, seen, sampling, generator)
        if nxt == tok.eos_id and not ignore_eos:
            reason = "eos"
            break
        new.append(nxt)
        seen[nxt] = True
        emit(stopper.add(text_decoder.put(nxt)))
        if stopper.stopped:
            reason = "stop"
            break
        if should_stop is not None and should_stop():
            reason = "cancelled"
            break
        if i + 1 < max_new_tokens:
            position = torch.tensor([[len(prompt_ids) + i]], device=device)  # (1, 1)
            with autocast(device):
                logits = decoder.step(torch.tensor([[nxt]], device=device), position)[0]
            steps += 1
    if not stopper.stopped:  # a character left unfinished by the last token is dropped, not shown as U+FFFD
        emit(stopper.add(text_decoder.flush().rstrip("\ufffd")))
        emit(stopper.flush())
    compile_s = decoder.stats.compile_s - compile_before
    return Generated(stopper.text, new, reason, len(prompt_ids), prefill_s, steps,
                     time.perf_counter() - t1 - compile_s, compile_s, decoder.want_compile, decoder.native is not None)
