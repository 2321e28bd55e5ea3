"""The model side of a vocabulary extension: embedding and output rows grown to the extended tokenizer, each
new row the mean of the rows of the pieces the base vocabulary splits its text into."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F

from ..tokenizer import SentencePieceTokenizer, Tokenizer
from .sentencepiece_merge import model_proto


def base_splits(tok: Tokenizer, base: Tokenizer) -> list[list[int]]:
    """For every new token of `tok`, the base ids its text is made of (as the base alone would tokenize it)."""
    new = range(tok.extension.base_size, tok.vocab_size)
    if isinstance(tok, SentencePieceTokenizer):
        import sentencepiece as spm

        proto = model_proto(base)  # the base, minus the leading space it adds to a text: a piece is mid-text
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        return [sp.encode(tok.piece(i).replace("\u2581", " ")) for i in new]
    return [[t.id for t in base.tok.model.tokenize(tok.piece(i))] for i in new]


def grow_rows(weight: torch.Tensor, splits: list[list[int]]) -> torch.Tensor:
    """`weight` (vocab, dim) with one row appended per split: the mean of the rows it lists (fp32 mean, the
    weight's dtype)."""
    ids = torch.tensor([i for s in splits for i in s], dtype=torch.long, device=weight.device)
    offsets = torch.tensor([0] + [len(s) for s in splits[:-1]], device=weight.device).cumsum(0)
    rows = F.embedding_bag(ids, weight.detach().float(), offsets, mode="mean")  # (len(splits), dim)
    return torch.cat([weight.detach(), rows.to(weight.dtype)])


class ExtendedEmbedding(nn.Embedding):
    """The token embedding of a model whose vocabulary was extended; it carries the extended tokenizer, which
    save_adapter writes beside the adapter (checkpoints included)."""

    def __init__(self, weight: torch.Tensor, tokenizer: Tokenizer):
        super().__init__(*weight.shape, _weight=weight, _freeze=True, device=weight.device, dtype=weight.dtype)
        self.tokenizer = tokenizer


def resize_model(model: nn.Module, tok: Tokenizer, base: Tokenizer):
    """Grow embed_tokens and lm_head to tok's vocabulary, new rows the mean of their base pieces' rows (a tied
    base stays tied); model.args.vocab_size follows. Training then updates them as modules_to_save."""
    args, n = model.args, tok.extension.base_size
    if args.vocab_size != n:
        raise ValueError(f"the model embeds {args.vocab_size} tokens, the vocabulary extends {n}: "
                         "the extended tokenizer was made for another base")
    splits = base_splits(tok, base)
    model.embed_tokens = ExtendedEmbedding(grow_rows(model.embed_tokens.weight, splits), tok)
    head = model.embed_tokens.weight if args.tie_embeddings else nn.Parameter(
        grow_rows(model.lm_head.weight, splits), requires_grad=False)
    with torch.device("meta"):
        model.lm_head = nn.Linear(args.dim, tok.vocab_size, bias=False)
    model.lm_head.weight = head
    model.args = replace(args, vocab_size=tok.vocab_size)
    if hasattr(model, "lm_head_int8"):  # lora_core.quant's decoding copy of the old lm_head
        del model.lm_head_int8
