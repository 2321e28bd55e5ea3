"""A static one-token decode step (gpt-fast's pattern) that torch.compile compiles once per process and shape.

Every shape is fixed: the KV cache is preallocated for a multiple of CACHE_BUCKET positions (and kept for the
next generation unless it needs more), the new key/value are written at a position *tensor* (index_copy_), RoPE rows are
indexed by a position tensor, and attention runs over the whole cache under a boolean mask (keys past the
current slot and padding masked out). So one graph serves every position and inductor's C++ code replaces
the ~2,600 small ATen ops per token of the eager step. The prompt itself is prefilled by the plain model
(Transformer.hidden) into the same cache, or by the C step where it runs (below).

An int8 or int4 model that can be read as plain quantized layers throughout decodes eagerly through our C step
instead (lora_core.native_decode: the whole token in one call), its prompt too (a chunk of tokens per call); the
torch step below and the plain model's prefill are the references it is tested against and the path for float
and unmerged-adapter models.

When torch.compile is unavailable or fails (no C++ compiler, an inductor error), the same step runs eagerly
and stderr says so in one line. Eagerly, each layer runs its own forward (the int8 dispatch of
lora_core.kernels); compiled, int8 layers use torch's weight-only int8 kernel (or dequantize inside the
graph when in_features is not a multiple of 32), int4 layers dequantize inside the graph.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .int4 import Int4Linear
from .kernels import cpu
from .lora import LoRALinear
from .model import KVCache, Transformer, apply_rope
from .native_decode import NativeStep, why_not
from .quant import Int8Linear

CACHE_BUCKET = 256  # cache positions are a multiple of this: a new graph only when a generation outgrows it
FUSE = True  # q|k|v and gate|up as one GEMM each where the layers allow (Fused)
PREFILL_ROWS = 256  # rows x tokens per C call when prefilling: their int8 activations stay in L2 as weights stream
# longer prompts go through the plain model: its attention (SDPA) outgrows the C step's one query at a time
# (SmolLM2 int8 on Zen 4: C 2.5x at 42 tokens, 1.05x at 500, 0.93x at 1500)
NATIVE_PREFILL_MAX = 1024


def linear(m: nn.Module, x: torch.Tensor, traced: bool) -> torch.Tensor:
    """m(x) for the layer kinds a decoding model holds; with `traced`, in ops torch.compile can trace."""
    if isinstance(m, LoRALinear):
        y = linear(m.base, x, traced)
        if m.merged:
            return y
        return y + ((x.float() @ m.lora_A.t()) @ m.lora_B.t()).mul_(m.scale).to(y.dtype)  # (M, r) -> (M, N)
    if traced and isinstance(m, Int4Linear):  # the C kernel is opaque to dynamo: dequantize inside the graph
        return (x.float() @ m.dequantize().t()).to(x.dtype)
    if not traced or not isinstance(m, Int8Linear):
        return m(x)
    x2 = x.reshape(-1, m.in_features)  # (M, K)
    if cpu.weight_only_applies(m.in_features):  # torch's weight-only int8 kernel, fp32 activations and scales
        y = torch.ops.aten._weight_int8pack_mm(x2.float().contiguous(), m.qweight, m.scale)
    else:
        y = F.linear(x2.float(), m.qweight.float()) * m.scale
    if m.bias is not None:
        y = y + m.bias
    return y.to(x.dtype).reshape(*x.shape[:-1], m.out_features)


class Fused:
    """Layers whose output rows are those of `members` in turn: one GEMM instead of several. The members'
    weights become row slices of the fused storage (no memory added); `current()` says whether the model still
    holds exactly those members with those slices (an adapter applied or a weight replaced since: rebuild)."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        if type(members[0]) is nn.Linear:
            w = torch.cat([m.weight.detach() for m in members])  # (sum of out_features, in_features)
            self.layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            self.layer.weight = nn.Parameter(w, requires_grad=False)
            names = ("weight",)
        elif type(members[0]) is Int4Linear:
            self.layer = Int4Linear(*(torch.cat([getattr(m, n) for m in members]) for n in ("packed", "scale", "lo")),
                                    members[0].group)
            names = ("packed", "scale", "lo")
        else:
            self.layer = Int8Linear(torch.cat([m.qweight for m in members]), torch.cat([m.scale for m in members]))
            names = ("qweight", "scale")
        self.parts = []
        n0 = 0
        for m in members:
            n1 = n0 + m.out_features
            for name in names:
                part = getattr(self.layer, name)[n0:n1]
                setattr(m, name, nn.Parameter(part, requires_grad=False) if name == "weight" else part)
                self.parts.append((m, name, getattr(m, name), part.data_ptr()))
            n0 = n1

    @staticmethod
    def applies(members: list[nn.Module]) -> bool:
        """All bias-free nn.Linear of one dtype, all bias-free Int8Linear, or all Int4Linear of one group size
        (never an unmerged adapter)."""
        kinds = {type(m) for m in members}
        if kinds == {nn.Linear}:
            return all(m.bias is None for m in members) and len({m.weight.dtype for m in members}) == 1
        if kinds == {Int4Linear}:
            return len({m.group for m in members}) == 1
        return kinds == {Int8Linear} and all(m.bias is None for m in members)

    def current(self, members: list[nn.Module]) -> bool:
        return (all(a is b for a, b in zip(members, self.members))
                and all(getattr(m, name) is t and t.data_ptr() == ptr for m, name, t, ptr in self.parts))


def fuse_projections(model: Transformer) -> list[tuple[nn.Module | None, nn.Module | None]]:
    """Per block, the fused (q|k|v, gate|up) layers, or None where the layers cannot be fused; kept on the model
    and rebuilt for a block whose layers changed."""
    kept = getattr(model, "_fused_projections", None) or {}
    out = []
    for i, b in enumerate(model.layers):
        pair = []
        for key, members in (("qkv", [b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj]),
                             ("gate_up", [b.mlp.gate_proj, b.mlp.up_proj])):
            f = kept.get((i, key))
            if f is None or not f.current(members):
                with torch.inference_mode(False):  # normal tensors: a later merge() updates them in place
                    f = Fused(members) if Fused.applies(members) else None
                kept[(i, key)] = f
            pair.append(None if f is None else f.layer)
        out.append(tuple(pair))
    model._fused_projections = kept
    return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim), masked) v for one query per row, written out: torch's CPU attention
    with a mask took 0.45 ms per layer at 256 cached positions, three times this.

    q (B, n_heads, 1, head_dim); k, v (B, n_kv_heads, S, head_dim); mask (B, 1, 1, S) bool, True = attend.
    Query head h reads kv head h // (n_heads / n_kv_heads), as repeat_interleave in HF's GQA.
    """
    B, n_heads, _, hd = q.shape
    n_kv = k.shape[1]
    qg = q.reshape(B, n_kv, n_heads // n_kv, hd)  # (B, n_kv_heads, group, head_dim)
    scores = (qg @ k.transpose(-1, -2)).mul_(hd ** -0.5)  # (B, n_kv_heads, group, S)
    scores = scores.float().masked_fill_(~mask, float("-inf"))
    out = scores.softmax(-1).to(v.dtype) @ v  # (B, n_kv_heads, group, head_dim)
    return out.reshape(B, n_heads, 1, hd)


def decode_step(model: Transformer, head: nn.Module, k: list[torch.Tensor], v: list[torch.Tensor],
                tokens: torch.Tensor, slot: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                rope_table: torch.Tensor, fused: list | None = None, traced: bool = False) -> torch.Tensor:
    """One new token per row -> fp32 logits (B, vocab).

    k, v: per layer (B, n_kv_heads, S, head_dim) caches, written at `slot` (1,) long; tokens (B, 1);
    positions (B, 1) RoPE positions; key_valid (B, S) bool, False on left padding; rope_table (>= max
    position + 1, head_dim/2, 2); fused: per block (q|k|v, gate|up) layers from fuse_projections, or None.
    """
    B = tokens.shape[0]
    a = model.args
    S = k[0].shape[2]
    seen = torch.arange(S, device=tokens.device) <= slot  # (S,): the slots written so far, this one included
    mask = (key_valid & seen)[:, None, None, :]  # (B, 1, 1, S): broadcast over kv heads and their query heads
    rope = rope_table[positions]  # (B, 1, head_dim/2, 2)
    h = model.embed_tokens(tokens)  # (B, 1, dim)
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = fused[i] if fused is not None else (None, None)
        x = layer.input_layernorm(h)
        if qkv is not None:
            q, kk, vv = linear(qkv, x, traced).split([a.n_heads * a.head_dim] + [a.n_kv_heads * a.head_dim] * 2, -1)
        else:
            q, kk, vv = (linear(m, x, traced) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        q = q.view(B, 1, a.n_heads, a.head_dim)
        kk = kk.view(B, 1, a.n_kv_heads, a.head_dim)
        vv = vv.view(B, 1, a.n_kv_heads, a.head_dim)
        q, kk = apply_rope(q, rope), apply_rope(kk, rope)
        q, kk, vv = (t.transpose(1, 2) for t in (q, kk, vv))  # (B, heads, 1, head_dim)
        k[i].index_copy_(2, slot, kk)
        v[i].index_copy_(2, slot, vv)
        out = attend(q, k[i], v[i], mask)  # (B, n_heads, 1, head_dim)
        h = h + linear(attn.o_proj, out.transpose(1, 2).reshape(B, 1, -1), traced)
        x = layer.post_attention_layernorm(h)
        if gate_up is not None:
            gate, up = linear(gate_up, x, traced).chunk(2, -1)
        else:
            gate, up = linear(mlp.gate_proj, x, traced), linear(mlp.up_proj, x, traced)
        h = h + linear(mlp.down_proj, F.silu(gate) * up, traced)
    return linear(head, model.norm(h)[:, -1], traced).float()


def _traced_step(*args):
    return decode_step(*args, traced=True)


_compiled = None  # torch.compile(_traced_step): one per process, its graphs cached by torch per shape


def compiled_step():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_traced_step, fullgraph=True, dynamic=False)
    return _compiled


@dataclass
class StepStats:
    compiled: bool = False
    compile_s: float = 0.0  # time of the first call of each new graph (tracing + inductor), 0 when eager


class StaticDecoder:
    """The static KV cache of one model and the step that decodes into it, eager or compiled.

    begin() sizes the cache for a generation (reused between generations of the same batch size, so a
    compiled graph is reused too); prefill() runs the prompt through the plain model (or the C step); step()
    decodes one token per row at a position tensor.
    """

    def __init__(self, model: Transformer, head: nn.Module, compile: bool = False, fuse: bool = FUSE):
        self.model, self.head, self.fuse = model, head, fuse
        self.requested = self.want_compile = compile  # want_compile drops to False when compiling fails
        self.cache: KVCache | None = None
        self.stats = StepStats()
        self._graphs: set[tuple] = set()  # (B, S) shapes whose graph is already compiled in this decoder

    def begin(self, batch: int, length: int):
        """A cache for `batch` rows and at least `length` positions (a multiple of CACHE_BUCKET)."""
        size = -(-length // CACHE_BUCKET) * CACHE_BUCKET
        c = self.cache
        if c is None or c.k[0].shape[0] != batch or c.max_len < size:
            w = self.model.embed_tokens.weight
            self.cache = KVCache(self.model.args, batch, size, w.dtype, w.device)
        self.cache.pos = 0
        device = self.model.embed_tokens.weight.device
        self.rope = self.model.rope(self.cache.max_len, device)[:self.cache.max_len]
        self.key_valid = torch.ones(batch, self.cache.max_len, dtype=torch.bool, device=device)
        self.fused = fuse_projections(self.model) if self.fuse else None  # layers cannot change mid-generation
        self.native = None
        if not self.want_compile and why_not(self.model, self.head, self.fused) is None:
            self.native = NativeStep(self.model, self.head, self.fused, self.cache, self.rope)

    def prefill(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt (B, T) into the cache -> last position's fp32 logits (B, vocab): through the C step in chunks
        when it runs this model (prompts up to NATIVE_PREFILL_MAX tokens), else through the plain model."""
        if attention_mask is not None:
            self.key_valid[:, :attention_mask.shape[1]] = attention_mask.bool()
        if self.native is None or tokens.shape[1] > NATIVE_PREFILL_MAX:
            h = self.model.hidden(tokens, attention_mask, self.cache, positions)
            return linear(self.head, h[:, -1], traced=False).float()
        B, T = tokens.shape
        c = self.cache
        if c.pos + T > c.max_len:
            raise ValueError(f"the decode cache holds {c.max_len} positions; a prompt of {T} tokens does not fit")
        if positions is None:
            positions = torch.arange(c.pos, c.pos + T, device=tokens.device).expand(B, T)
        chunk = max(1, PREFILL_ROWS // B)
        for s in range(0, T, chunk):
            logits = self.native(tokens[:, s:s + chunk], c.pos + s, positions[:, s:s + chunk], self.key_valid)
        c.pos += T
        return logits

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1) at RoPE positions (B, 1), stored in the next cache slot -> fp32 logits (B, vocab)."""
        c = self.cache
        if c.pos >= c.max_len:
            raise ValueError(f"the decode cache holds {c.max_len} positions; a step past them was asked for")
        if self.native is not None:
            logits = self.native(tokens, c.pos, positions, self.key_valid)
            c.pos += 1
            return logits
        slot = torch.tensor([c.pos], device=tokens.device)
        args = (self.model, self.head, c.k, c.v, tokens, slot, positions, self.key_valid, self.rope, self.fused)
        logits = self._compiled(args) if self.want_compile else decode_step(*args)
        c.pos += 1
        return logits

    def _compiled(self, args) -> torch.Tensor:
        shape = (args[4].shape[0], self.cache.max_len)
        if shape in self._graphs:
            return compiled_step()(*args)
        t0 = time.perf_counter()
        try:
            logits = compiled_step()(*args)
        except Exception as e:  # any compiler failure (no C++ compiler, an inductor bug): eager, never a crash
            self.want_compile = False
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            print(f"lora-core: torch.compile of the decode step failed ({type(e).__name__}: {first}); "
                  "decoding eagerly", file=sys.stderr)
            return decode_step(*args)
        dt = time.perf_counter() - t0
        self._graphs.add(shape)
        self.stats.compiled, self.stats.compile_s = True, self.stats.compile_s + dt
        print(f"lora-core: compiled the decode step (batch {shape[0]}, cache {shape[1]}) in {dt:.1f} s",
              file=sys.stderr)
        return logits


def decoder_of(model: Transformer, head: nn.Module, compile: bool) -> StaticDecoder:
    """The model's decoder, kept on the model so its cache and compiled graph serve later generations."""
    d = getattr(model, "_static_decoder", None)
    if d is None or d.head is not head or d.requested != compile:
        d = StaticDecoder(model, head, compile)
        model._static_decoder = d
    return d
