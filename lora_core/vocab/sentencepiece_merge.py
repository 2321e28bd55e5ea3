"""SentencePiece bases (LLaMA 1/2, Chinese-LLaMA): the pieces of another SentencePiece model appended, as
merge_tokenizers.py in Chinese-LLaMA-Alpaca does, with the scores and additions that keep every tool splitting
text the same way (see merge_sentencepiece)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..tokenizer import Extension, SentencePieceTokenizer

SP_TRAIN_SIZE = 20000  # pieces of the SentencePiece model trained on the data (chinese_sp.model's size)


def _pb():
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise ImportError("editing SentencePiece vocabularies needs protobuf: pip install protobuf") from e
    return pb


def model_proto(tok: SentencePieceTokenizer):
    return _pb().ModelProto.FromString(tok.sp.serialized_model_proto())


def read_sentencepiece(path: str | Path):
    """The ModelProto of a .model file, with a one-line error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SentencePiece model; --extend-vocab takes auto, a .model file or a "
                                "directory written by python -m lora_core.vocab")
    try:
        proto = _pb().ModelProto.FromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError, or a file that happens to parse as an empty message
        raise ValueError(f"{path}: not a SentencePiece model ({type(e).__name__}); give a tokenizer .model file") from e
    if not proto.pieces:
        raise ValueError(f"{path}: not a SentencePiece model (no pieces); give a tokenizer .model file")
    return proto


def splits_digits(pieces) -> bool:
    """Whether a vocabulary writes numbers digit by digit (LLaMA's split_digits): no piece holds two digits."""
    return not any(sum(c.isdigit() for c in p) > 1 for p in pieces)


def merge_sentencepiece(base: SentencePieceTokenizer, other, source: str,
                        digit_pieces: bool | None = None) -> SentencePieceTokenizer:
    """`base` + the ordinary pieces of `other` (a ModelProto) it lacks, appended in `other`'s order.

    Scores continue below the base's lowest (one float32 step each: LLaMA's lowest is -1e9, where integers
    are 64 apart), so the base merges first and its own text keeps its tokens, and the merge order is the
    order of ids, as transformers and llama.cpp rank merges.

    BPE forms a piece only by joining two pieces it has already formed, so a piece of a unigram model such as
    chinese_sp.model ('意大利', when neither '意大' nor '大利' is a piece) would never appear: its missing
    prefixes are added just before it ('意大'), as BPE training would have made them. Pieces holding digits are
    left out when the base splits numbers digit by digit (LLaMA does), unless digit_pieces says to keep them
    (Chinese-LLaMA's merge keeps them: fewer Chinese tokens, but English numbers are split differently too).

    A piece of `other` that spells one of the base's special tokens (control, unknown, byte) would tokenize
    differently in sentencepiece, transformers and llama.cpp (which match special tokens in text first): refused.
    """
    pb = _pb()
    proto = model_proto(base)
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise ValueError(f"{base.path}: a unigram SentencePiece model; pieces can be merged only into BPE models "
                         "(LLaMA's and Chinese-LLaMA's are)")
    normal = pb.ModelProto.SentencePiece.NORMAL
    special = {p.piece: i for i, p in enumerate(proto.pieces) if p.type != normal}
    have = {p.piece for p in proto.pieces}
    if digit_pieces is None:
        digit_pieces = not splits_digits(p.piece for p in proto.pieces if p.type == normal)
    new = []
    for i, p in enumerate(other.pieces):
        if p.type != normal:
            continue  # <unk>, <s>, </s>, byte pieces: the base has its own
        clash = next((s for s in special if s in p.piece), None)
        if clash is not None:
            raise ValueError(f"{source}: piece {i} {p.piece!r} is ordinary text there but holds {clash!r}, the base's "
                             f"special token {special[clash]}; retrain that model with {clash!r} as a control symbol "
                             "or without it")
        if p.piece not in have and (digit_pieces or not any(c.isdigit() for c in p.piece)):
            new.append(p.piece)
            have.add(p.piece)
    if not new:
        raise ValueError(f"{source}: every ordinary piece of it is already in the base's vocabulary; nothing to add")
    score = np.float32(min(p.score for p in proto.pieces))
    for piece in _with_missing_prefixes(new, have):
        score = np.nextafter(score, np.float32(-np.inf))
        proto.pieces.add(piece=piece, score=float(score), type=normal)
    return _sentencepiece(base, proto.SerializeToString(), Extension(base.vocab_size, source=source))


def _with_missing_prefixes(new: list[str], have: set[str]) -> list[str]:
    """The new pieces in order, each preceded by the prefixes it needs to be formed by BPE merges from the
    pieces of `have` (which holds every piece, new ones included, and gains the added prefixes)."""
    formed = {}

    def can_form(piece: str) -> bool:  # joined from two pieces that can be formed; one character always can
        if piece not in formed:
            formed[piece] = len(piece) == 1 or piece in have and any(
                can_form(piece[:k]) and can_form(piece[k:]) for k in range(1, len(piece)))
        return formed[piece]

    out = []
    for piece in new:
        if not can_form(piece):
            for k in range(2, len(piece)):
                if piece[:k] not in have:
                    out.append(piece[:k])
                    have.add(piece[:k])
            formed.clear()
        out.append(piece)
    return out


def _sentencepiece(base: SentencePieceTokenizer, model_proto: bytes, extension: Extension) -> SentencePieceTokenizer:
    tok = SentencePieceTokenizer(base.path, model_proto=model_proto)
    tok.add_bos, tok.extension = base.add_bos, extension
    return tok


def train_sentencepiece(texts: list[str], vocab_size: int = SP_TRAIN_SIZE):
    """A SentencePiece BPE model trained on the texts (sentencepiece's trainer, identity normalization, digits
    split): the pieces `--extend-vocab auto` merges into a SentencePiece base. BPE, not unigram: its pieces come
    with the shorter pieces they are merged from, which a BPE base needs to reach them."""
    import sentencepiece as spm

    lines = [line for t in texts for line in t.splitlines() if line.strip()]
    if not lines:
        raise ValueError("the data holds no text to train a SentencePiece model on")
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, model_type="bpe", vocab_size=vocab_size,
            hard_vocab_limit=False, character_coverage=0.9995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, byte_fallback=False, max_sentence_length=1 << 16,
            num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece could not train on the data ({e}); give --extend-vocab a .model file") from e
    return _pb().ModelProto.FromString(out.getvalue())
