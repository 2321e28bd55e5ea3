"""Extended tokenizers: made from a base's (merged or mined), checked to extend a base, measured."""
from __future__ import annotations

from pathlib import Path

from ..data import texts_of
from ..tokenizer import Extension, HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer
from .bpe_mining import AUTO, MAX_NEW, MIN_COUNT, bpe_state, mine_bpe
from .sentencepiece_merge import merge_sentencepiece, read_sentencepiece, train_sentencepiece


def tokens_per_char(tok: Tokenizer, texts: list[str]) -> float:
    """Tokens (no BOS/EOS) per character over the texts, each encoded on its own."""
    return sum(len(tok.encode(t, bos=False)) for t in texts) / max(sum(len(t) for t in texts), 1)


def extend(base: Tokenizer, how: str, texts: list[str] | None = None, min_count: int = MIN_COUNT,
           max_new: int = MAX_NEW, digit_pieces: bool | None = None) -> Tokenizer:
    """The base's tokenizer extended: `how` is "auto" (new tokens from `texts`), a SentencePiece .model to merge,
    or a directory holding an extended tokenizer (python -m lora_core.vocab --out, or a training run's output).
    digit_pieces: keep a merged model's pieces that hold digits (see merge_sentencepiece)."""
    if base.extension is not None:
        raise ValueError(f"{base.path}: this tokenizer is already extended; extend the base's own")
    if how == AUTO:
        if texts is None:
            raise ValueError("--extend-vocab auto learns new tokens from the training data; give --data")
        if isinstance(base, SentencePieceTokenizer):
            return merge_sentencepiece(base, train_sentencepiece(texts), "sentencepiece trained on the data")
        return mine_bpe(base, texts, min_count, max_new)
    path = Path(how)
    if path.is_dir():
        return check_extends(load_tokenizer(path), base, path)
    if path.suffix == ".json":
        return check_extends(load_tokenizer(path), base, path)  # an extended tokenizer.json
    if not isinstance(base, SentencePieceTokenizer):
        read_sentencepiece(path)  # a missing or broken file says so first
        raise ValueError(f"{path}: a SentencePiece model merges only into a SentencePiece base; {base.path.name} is "
                         "a byte-level BPE vocabulary: use --extend-vocab auto to mine tokens from the data")
    return merge_sentencepiece(base, read_sentencepiece(path), str(path), digit_pieces)


def _kind(tok: Tokenizer) -> str:
    return "SentencePiece" if isinstance(tok, SentencePieceTokenizer) else "byte-level BPE"


def _entry(tok: Tokenizer, i: int) -> str:
    """What must match for id i in a base and its extension: the piece (and a SentencePiece piece's score,
    which orders its merges)."""
    return f"{tok.piece(i)}\t{tok.sp.get_score(i)}" if isinstance(tok, SentencePieceTokenizer) else tok.piece(i)


def check_extends(tok: Tokenizer, base: Tokenizer, where) -> Tokenizer:
    """`tok` if it is `base` plus new tokens (same kind, same first tokens, the base's merges first), with its
    Extension set; else a one-line error naming `where`."""
    wrong = f"{where}: this vocabulary does not extend {base.path.name}'s"
    if type(tok) is not type(base):
        raise ValueError(f"{wrong} (it is a {_kind(tok)} vocabulary, the base's is {_kind(base)}); it was made for "
                         "another base")
    if tok.vocab_size <= base.vocab_size:
        raise ValueError(f"{wrong}: it has {tok.vocab_size} tokens, the base {base.vocab_size}; it was made for "
                         "another base")
    n = base.vocab_size
    first = next((i for i in range(n) if _entry(tok, i) != _entry(base, i)), None)
    if first is not None:
        raise ValueError(f"{wrong}: token {first} is {tok.piece(first)!r} there and {base.piece(first)!r} in the "
                         "base; it was made for another base")
    (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) = (base.bos_id, base.eos_id, base.pad_id, base.add_bos)
    merges = 0
    if isinstance(base, HFTokenizer):
        ours, theirs = bpe_state(tok)["model"]["merges"], bpe_state(base)["model"]["merges"]
        merges = len(theirs)
        if ours[:merges] != theirs:
            raise ValueError(f"{wrong}: its merges do not start with the base's; it was made for another base")
    tok.extension = Extension(n, merges, (tok.extension.source if tok.extension else "") or str(where))
    return tok


def extended_tokenizer(how: str, base: Tokenizer, vocab_size: int, data, resume_from: Path | None = None,
                       log=print) -> Tokenizer:
    """train.py --extend-vocab: the extended tokenizer of a run (the checkpoint's own when resuming)."""
    if vocab_size != base.vocab_size:
        raise ValueError(f"{base.path}: the base embeds {vocab_size} rows for a {base.vocab_size}-token vocabulary; "
                         "extending a padded vocabulary is not supported")
    if resume_from is not None and any((resume_from / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        return check_extends(load_tokenizer(resume_from), base, resume_from)
    texts = texts_of(data)
    tok = extend(base, how, texts)
    if log:
        log(f"vocabulary: {base.vocab_size} -> {tok.vocab_size} tokens ({tok.extension.source}); tokens per "
            f"character of the data: {tokens_per_char(base, texts):.3f} -> {tokens_per_char(tok, texts):.3f}")
    return tok
