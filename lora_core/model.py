"""A plain LLaMA: RMSNorm, RoPE, grouped-query attention with a KV cache, SwiGLU.

No LoRA, no int8 and no loading code live here: those replace or fill the `nn.Linear`
modules afterwards. Module names follow HF's LlamaForCausalLM minus its leading "model."
so adapter keys map one to one; q/k rows are in Meta's interleaved RoPE layout
(the loaders convert HF checkpoints at load time).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelArgs

# the seven projection layers of a block (HF's names): what LoRA targets and what an int8 base quantizes
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 whatever the activation dtype, as Meta's and HF's references do
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """RoPE frequencies theta^(-2i/head_dim), with LLaMA 3.1's scaling of the long wavelengths if given."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    if not scaling:
        return inv_freq
    # Meta llama3.1 apply_scaling: wavelengths above original/low_freq_factor are divided by `factor`,
    # those below original/high_freq_factor are kept, and the band between is interpolated
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    long_scaled = torch.where(wavelen > original / low, inv_freq / factor, scaled)
    return torch.where(wavelen < original / high, inv_freq, long_scaled)


def rope_table(n: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """(cos, sin) of the angles pos·freq for positions 0..n-1: (n, head_dim/2, 2) fp32, angles computed in fp32."""
    angles = torch.arange(n, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq  # (n, head_dim/2)
    return torch.stack((angles.cos(), angles.sin()), -1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x: (B, T, H, head_dim) by the angles of rope:
    (B or 1, T, head_dim/2, 2) cos/sin rows of rope_table, Meta's interleaved layout, in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, head_dim/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]  # (B or 1, T, 1, head_dim/2)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2).to(x.dtype)


class KVCache:
    """Keys and values of past positions for every layer, preallocated for max_len positions."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype: torch.dtype, device="cpu"):
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.max_len = max_len
        self.pos = 0  # number of positions already stored

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, n_kv_heads, T, head_dim) at the current position; return all keys/values so far."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, rope, mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, n_kv_heads, S, head_dim), S = past + T
        is_causal = mask is None and T > 1
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads
        )  # (B, n_heads, T, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, rope, mask, cache):
        h = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        # activation recomputation: keep only each block's input, recompute the block during backward
        self.recompute_activations = False
        self._rope: torch.Tensor | None = None  # rope_table rows, grown on demand (rope())
        self.tie_weights()

    def tie_weights(self):
        """Share the embedding with the output layer when the checkpoint does (SmolLM2)."""
        if self.args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope(self, n: int, device: torch.device) -> torch.Tensor:
        """rope_table for at least n positions, cached on the model (rebuilt only to grow or to move)."""
        if self._rope is None or self._rope.shape[0] < n or self._rope.device != torch.device(device):
            a = self.args
            size = max(n, 256, 2 * self._rope.shape[0] if self._rope is not None else 0)
            self._rope = rope_table(size, rope_inv_freq(a.head_dim, a.rope_theta, a.rope_scaling, device))
        return self._rope

    def forward(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab) in fp32; the arguments are those of hidden()."""
        return self.lm_head(self.hidden(tokens, attention_mask, cache, positions)).float()

    def hidden(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> final normalised hidden states (B, T, dim), the input of lm_head.

        attention_mask: (B, S) with 1 for real tokens and 0 for padding, S = positions cached before
        plus T; padded keys are never attended to. positions: (B, T) RoPE positions, by default
        past..past+T-1 (pass them for left-padded batches). With `cache`, the new keys/values are
        stored and the cache position advances by T.
        """
        B, T = tokens.shape
        past = cache.pos if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + T, device=tokens.device)[None, :]  # (1, T)
            n = past + T
        else:
            n = int(positions.max()) + 1  # a host sync, for padded batches only
        rope = self.rope(n, tokens.device)[positions]  # (B or 1, T, head_dim/2, 2)
        mask = self._mask(attention_mask, B, T, past, tokens.device)
        h = self.embed_tokens(tokens)
        recompute = self.recompute_activations and cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                h = checkpoint(layer, h, rope, mask, None, use_reentrant=False)
            else:
                h = layer(h, rope, mask, cache)
        if cache is not None:
            cache.pos += T
        return self.norm(h)

    @staticmethod
    def _mask(attention_mask, B, T, past, device) -> torch.Tensor | None:
        """Boolean (B, 1, T, S) mask, True where a query may attend; None when plain causal suffices."""
        if attention_mask is None and (past == 0 or T == 1):
            return None
        S = past + T
        q_pos = torch.arange(past, S, device=device)[:, None]  # (T, 1)
        mask = (torch.arange(S, device=device)[None, :] <= q_pos)[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            if attention_mask.shape != (B, S):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)}")
            diagonal = (torch.arange(S, device=device)[None, :] == q_pos)[None, None]  # (1, 1, T, S)
            # a padded query would see no key at all (NaN); let it see itself, its output is ignored
            mask = (mask & attention_mask.bool()[:, None, None, :]) | diagonal
        return mask
