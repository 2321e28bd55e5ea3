"""The int8 / int4 decode step in C (kernels/decode_step.c): every layer of one new token per row in one call,
or of a prompt's tokens (StaticDecoder.prefill calls it a chunk at a time).

The eager torch step (fast_decode.decode_step) spends most of a token in ~2,600 small ATen ops around the
weight reads; this step makes one ctypes call per token instead. StaticDecoder uses it when the model can be
read as quantized layers throughout (an int8 or int4 base, no adapter or a merged one: q|k|v and gate|up fused,
o and down int8 or int4, the output head int8, fp32 activations, on the CPU) and no int8 forward path is forced.
Otherwise, or with LORA_CORE_NATIVE_DECODE=0, the torch step runs.

int4 layers compute as lora_core.int4's own kernel does (activations quantized per 32). For int8 layers the
numerics are the int_mm path's: activations quantized per row, LLM.int8 outlier features kept in fp32, except
that the outliers are chosen per row (torch's path chooses columns over the batch), so a row decodes the same
alone or in a batch. The int32 products are exact, so the AVX-512 VNNI and AVX2 kernels agree bit for bit.

On VNNI, the step reads a packed copy of each weight (pack_vnni, pack_int4_vnni: 16 rows' bytes or nibbles side
by side per four features), kept on the layer beside the weight as stored. The copies double the weights' memory;
packs() makes them only when they fit in half of the memory available.
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch
from torch import nn

from .int4 import Int4Linear, unpack
from .kernels import dispatch, native
from .kernels.reference import EPS
from .model import KVCache, Transformer
from .quant import Int8Linear

ENV = "LORA_CORE_NATIVE_DECODE"
PACK_ENV = "LORA_CORE_NATIVE_PACK"
_said: set[str] = set()  # notices already given in this process
ISA_AVX2, ISA_VNNI = native.ISA_AVX2, native.ISA_VNNI


def isa() -> int:
    return native.dot_isa()


def library() -> tuple[ctypes.CDLL | None, str]:
    return native.decode_library()


def _int8(m: nn.Module) -> Int8Linear | None:
    return m if isinstance(m, Int8Linear) and m.bias is None and m.qweight.is_contiguous() else None


def _readable(m: nn.Module) -> bool:
    """A projection the step reads: bias-free int8, or int4 in groups of a multiple of 32 with its own dtypes."""
    return _int8(m) is not None or (isinstance(m, Int4Linear) and m.group > 0 and m.group % 32 == 0
                                    and m.kernel_ready())


def _projections(model: Transformer, fused: list) -> list[nn.Module]:
    """Every product layer the step reads but the head: fused q|k|v and gate|up, o and down of every block."""
    return ([f for pair in fused for f in pair]
            + [m for b in model.layers for m in (b.self_attn.o_proj, b.mlp.down_proj)])


def why_not(model: Transformer, head: nn.Module, fused: list | None) -> str | None:
    """None if the native step can decode this model, else why not (for a notice or a test)."""
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if dispatch.forward_forced():
        return "an int8 forward path is forced (--int8-path or LORA_CORE_INT8_PATH)"
    lib, why = library()
    if lib is None:
        return why
    w = model.embed_tokens.weight
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return f"needs fp32 activations on the CPU, not {w.dtype} on {w.device}"
    norms = [model.norm.weight] + [n.weight for b in model.layers for n in (b.input_layernorm,
                                                                             b.post_attention_layernorm)]
    if any(n.dtype != torch.float32 or n.device.type != "cpu" for n in norms):
        return "needs fp32 RMSNorm weights on the CPU"
    if model.args.n_heads % model.args.n_kv_heads:
        return "needs n_heads divisible by n_kv_heads"
    if fused is None or any(f is None for pair in fused for f in pair):
        return "needs q|k|v and gate|up fusable (int8 or int4 layers, no unmerged adapter)"
    layers = _projections(model, fused)
    if _int8(head) is None or not all(_readable(m) for m in layers):
        return "needs every projection as int8 or int4 layers, and the output head int8"
    if len({m.threshold for m in layers + [head] if isinstance(m, Int8Linear)}) != 1:
        return "needs one outlier threshold for every layer"
    return None


def _kept(m: nn.Module, name: str, make, *sources: torch.Tensor) -> torch.Tensor:
    """make(*sources), kept on the layer as `name` until a source is replaced or written in place."""
    key = []
    for t in sources:
        try:
            key.append((t.data_ptr(), t._version))
        except RuntimeError:  # a tensor made under torch.inference_mode keeps no version counter
            key.append((t.data_ptr(), None))
    kept = getattr(m, name, None)
    if kept is None or kept[0] != key:
        kept = (key, make(*sources))
        setattr(m, name, kept)
    return kept[1]


def _rowsum(m: Int8Linear) -> torch.Tensor:
    """The int32 sum of each weight row (the VNNI kernel's correction for x + 128)."""
    return _kept(m, "_native_rowsum", lambda w: w.sum(1, dtype=torch.int32), m.qweight)


def pack_vnni(w: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) -> decode_step.c's packed layout: blocks of 16 rows, each (K/4, 16, 4), N padded with zero rows
    to a multiple of 32 and K with zeros to a multiple of 4."""
    N, K = w.shape
    if N % 32 or K % 4:
        w = nn.functional.pad(w, (0, -K % 4, 0, -N % 32))
    N, K = w.shape
    fours = w.contiguous().view(torch.int32)  # each row's four bytes as one element: a 4x smaller transpose
    blocks = fours.reshape(N // 16, 16, K // 4).transpose(1, 2).contiguous()
    return blocks.view(torch.int8).reshape(N // 16, K // 4, 16, 4)


def pack_int4_vnni(packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """An Int4Linear's (packed, scale, lo) -> decode_step.c's packed int4 copy, one uint8 tensor: per block of 16
    rows (N padded with zero rows) and 32 features, 4 parts of 64 bytes, byte 4r + i of part c holding row r's
    weight 4c + i low and 16 + 4c + i high; then the scales and the minima, each (N / 16, groups, 16) fp32."""
    q = unpack(packed)
    N, K = q.shape
    q = nn.functional.pad(q, (0, 0, 0, -N % 16))
    halves = q.reshape(q.shape[0] // 16, 16, K // 32, 2, 4, 4)  # (block, r, 32 features, low/high, c, i)
    parts = (halves[:, :, :, 0] | (halves[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # (block, 32 features, c, r, i)

    def by_block(t):  # (N, groups) -> (N / 16, groups, 16)
        t = nn.functional.pad(t.float(), (0, 0, 0, -N % 16))
        return t.reshape(t.shape[0] // 16, 16, t.shape[1]).transpose(1, 2)
    return torch.cat([parts.flatten(), by_block(scale).flatten().view(torch.uint8),
                      by_block(lo).flatten().view(torch.uint8)])


def _packed(m: Int8Linear | Int4Linear) -> torch.Tensor:
    if isinstance(m, Int4Linear):
        return _kept(m, "_native_packed", pack_int4_vnni, m.packed, m.scale, m.lo)
    return _kept(m, "_native_packed", pack_vnni, m.qweight)


def _copy_bytes(m: nn.Module) -> int:
    if isinstance(m, Int4Linear):
        return m.packed.numel() + 8 * m.scale.numel()
    return m.qweight.numel() if _int8(m) is not None else 0


def available_memory() -> int | None:
    """Bytes the system can give without swapping: Linux's MemAvailable (free memory plus the page cache it can
    drop, which a freshly read checkpoint fills), else the free pages; None if neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def packs(model: Transformer, head: Int8Linear, fused: list) -> bool:
    """Whether the step reads packed copies of the int8 weights: on VNNI, when the copies not yet made
    take at most half of the memory available (said once per process when they would not). Off with
    LORA_CORE_NATIVE_PACK=0."""
    if os.environ.get(PACK_ENV, "1") == "0" or isa() != ISA_VNNI:
        return False
    layers = [head] + _projections(model, fused)
    need = sum(_copy_bytes(m) for m in layers if getattr(m, "_native_packed", None) is None)
    available = available_memory()
    if available is None:  # unknown: pack, as the copies are what the step needs to be fast
        return True
    if need > available // 2:
        if "pack" in _said:
            return False
        _said.add("pack")
        print(f"lora-core: decoding without the packed weight copies (they would take "
              f"{need / 2**20:.0f} MiB, over half of the {available / 2**20:.0f} MiB available; slower, same "
              f"results); set {PACK_ENV}=0 to silence this", file=sys.stderr)
        return False
    return True


class NativeStep:
    """The pointer table of one model and cache for decode_step.c; call it like fast_decode.decode_step."""

    def __init__(self, model: Transformer, head: Int8Linear, fused: list, cache: KVCache, rope: torch.Tensor):
        a = model.args
        self.model, self.cache, self.rope = model, cache, rope.contiguous()
        self.keep = []  # every tensor whose address the table holds
        self.packed = packs(model, head, fused)
        ptrs = []
        kinds = []
        for i, b in enumerate(model.layers):
            qkv, gate_up = fused[i]
            products = (qkv, b.self_attn.o_proj, gate_up, b.mlp.down_proj)
            kinds += [m.group if isinstance(m, Int4Linear) else 0 for m in products]
            for t in (b.input_layernorm.weight, *self._layer(qkv), *self._layer(b.self_attn.o_proj),
                      b.post_attention_layernorm.weight, *self._layer(gate_up), *self._layer(b.mlp.down_proj),
                      cache.k[i], cache.v[i]):
                ptrs.append(self._address(t))
        self.table = (ctypes.c_void_p * len(ptrs))(*ptrs)
        self.kinds = (ctypes.c_int64 * len(kinds))(*kinds)
        self.head = (ctypes.c_void_p * 4)(*(self._address(t) for t in self._layer(head)))
        self.final_norm = model.norm.weight.detach().contiguous()
        self.threshold = float(head.threshold)
        B, _, S, _ = cache.k[0].shape
        # decode_step.c's sizes, in its order; the slot, the kernels and the tokens per row follow at each call
        self.dims = [a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.hidden_dim, head.out_features, S, B]
        self.isa = isa()

    def _address(self, t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        t = t.detach()
        assert t.is_contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def _layer(self, m: Int8Linear | Int4Linear) -> tuple:
        packed = _packed(m) if self.packed else None
        if isinstance(m, Int4Linear):
            return m.packed, m.scale, m.lo, packed
        return m.qweight, m.scale.float().contiguous(), _rowsum(m), packed

    def __call__(self, tokens: torch.Tensor, slot: int, positions: torch.Tensor,
                 key_valid: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) at RoPE positions (B, T), written at cache slots slot..slot+T-1 -> fp32 logits (B, vocab)
        of each row's last token (T = 1: a decode step; more: a prompt, each token attending up to its slot)."""
        lib = library()[0]
        B, S = self.dims[8], self.dims[7]
        T = tokens.shape[-1] if tokens.dim() == 2 else 1
        if (tokens.numel() != B * T or positions.numel() != B * T or key_valid.shape != (B, S)
                or not (0 <= slot and slot + T <= S)):
            raise ValueError(f"the C decode step holds a cache of {B} rows x {S} positions; got tokens "
                             f"{tuple(tokens.shape)}, positions {tuple(positions.shape)}, key_valid "
                             f"{tuple(key_valid.shape)}, slot {slot}")
        pos = positions.reshape(B * T).to(torch.int64).contiguous()
        if int(pos.min()) < 0 or int(pos.max()) >= self.rope.shape[0]:
            raise ValueError(f"RoPE positions must lie in 0..{self.rope.shape[0] - 1}; got {pos.tolist()}")
        h = self.model.embed_tokens(tokens.reshape(B * T)).float().contiguous()  # (B * T, dim), overwritten
        logits = torch.empty(B, self.dims[6], dtype=torch.float32)
        valid = key_valid.to(torch.uint8).contiguous()
        dims = (ctypes.c_int64 * (len(self.dims) + 3))(*self.dims, slot, self.isa, T)
        if lib.decode_step(dims, self.table, self.kinds, self.final_norm.data_ptr(), self.head, h.data_ptr(),
                           pos.data_ptr(), valid.data_ptr(), self.rope.data_ptr(), logits.data_ptr(),
                           self.model.args.norm_eps, EPS, self.threshold):
            raise MemoryError("the C decode step could not allocate its scratch memory")
        return logits
