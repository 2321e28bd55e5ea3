"""Vocabulary extension, Chinese-LLaMA's recipe: a base's tokenizer grown with new tokens, the embedding and
output rows grown to match (each new row starts at the mean of the rows of the pieces the base vocabulary
split its text into), and the extended tokenizer kept beside the adapter, where load(), generate and export
find it.

    python -m lora_core.vocab --base llama-2-dir --merge chinese_sp.model --out zh-vocab
    python -m lora_core.vocab --base smollm2-135m --mine data.json --out zh-vocab
    python train.py --extend-vocab auto | chinese_sp.model | zh-vocab ...

- SentencePiece bases (LLaMA 1/2, Chinese-LLaMA): the pieces of another SentencePiece model (or of one
  sentencepiece trains on the data) are appended once each, as merge_tokenizers.py in Chinese-LLaMA-Alpaca
  does, but scored below every base piece, so the base's own merges always come first (with score 0, as
  there, pieces such as 'eat' pre-empt LLaMA's and English text changes: 'feathers' became f|eat|h|ers), and
  without pieces holding digits when the base splits numbers digit by digit.
- Byte-level BPE bases (SmolLM2): merges continued on the Chinese text of the data (characters, then words),
  appended after the base's merges: our tokenizer, transformers and llama.cpp run the same BPE on them.
"""
from __future__ import annotations

import argparse
import collections
import heapq
import io
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

AUTO = "auto"
MIN_COUNT = 3  # a mined token occurs at least this often in the data
MAX_NEW = 20000  # at most this many new tokens (chinese_sp.model, merged into LLaMA, brings 17953)
SP_TRAIN_SIZE = 20000  # pieces of the SentencePiece model trained on the data (chinese_sp.model's size)


@dataclass(frozen=True)
class Extension:
    """What an extended tokenizer adds to its base: the ids from base_size on are new (a byte-level BPE also
    keeps the base's base_merges merges first); `source` says where the new tokens came from."""

    base_size: int
    base_merges: int = 0
    source: str = ""


def is_cjk(ch: str) -> bool:
    """CJK ideographs (all planes), radicals, CJK punctuation, kana, compatibility and full-width forms."""
    o = ord(ch)
    return 0x2E80 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF or 0xFE30 <= o <= 0xFE4F or 0xFF00 <= o <= 0xFFEF or (
        0x20000 <= o <= 0x3FFFF)


def tokens_per_char(tok: Tokenizer, texts: list[str]) -> float:
    """Tokens (no BOS/EOS) per character over the texts, each encoded on its own."""
    return sum(len(tok.encode(t, bos=False)) for t in texts) / max(sum(len(t) for t in texts), 1)


# ---------------------------------------------------------------------------------------------------------------
# SentencePiece bases


def _pb():
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise ImportError("editing SentencePiece vocabularies needs protobuf: pip install protobuf") from e
    return pb


def _proto(tok: SentencePieceTokenizer):
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


def merge_sentencepiece(base: SentencePieceTokenizer, other, source: str) -> SentencePieceTokenizer:
    """`base` + the ordinary pieces of `other` (a ModelProto) it lacks, appended in `other`'s order.

    Scores continue below the base's lowest (one float32 step each: LLaMA's lowest is -1e9, where integers
    are 64 apart), so the base merges first and its own text keeps its tokens, and the merge order is the
    order of ids, as transformers and llama.cpp rank merges; pieces with digits are left out when the base
    splits digits. A piece of `other` that spells one of the
    base's special tokens (control, unknown, byte) would tokenize differently in sentencepiece, transformers
    and llama.cpp (which match special tokens in text first): refused.
    """
    pb = _pb()
    proto = _proto(base)
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise ValueError(f"{base.path}: a unigram SentencePiece model; pieces can be merged only into BPE models "
                         "(LLaMA's and Chinese-LLaMA's are)")
    normal = pb.ModelProto.SentencePiece.NORMAL
    special = {p.piece: i for i, p in enumerate(proto.pieces) if p.type != normal}
    have = {p.piece for p in proto.pieces}
    no_digits = splits_digits(p.piece for p in proto.pieces if p.type == normal)
    score = np.float32(min(p.score for p in proto.pieces))
    for i, p in enumerate(other.pieces):
        if p.type != normal:
            continue  # <unk>, <s>, </s>, byte pieces: the base has its own
        clash = next((s for s in special if s in p.piece), None)
        if clash is not None:
            raise ValueError(f"{source}: piece {i} {p.piece!r} is ordinary text there but holds {clash!r}, the base's "
                             f"special token {special[clash]}; retrain that model with {clash!r} as a control symbol "
                             "or without it")
        if p.piece in have or (no_digits and any(c.isdigit() for c in p.piece)):
            continue
        score = np.nextafter(score, np.float32(-np.inf))
        proto.pieces.add(piece=p.piece, score=float(score), type=normal)
        have.add(p.piece)
    added = len(proto.pieces) - base.vocab_size
    if added == 0:
        raise ValueError(f"{source}: every ordinary piece of it is already in the base's vocabulary; nothing to add")
    return _sentencepiece(base, proto.SerializeToString(), Extension(base.vocab_size, source=source))


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


# ---------------------------------------------------------------------------------------------------------------
# byte-level BPE bases


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: each byte as a printable character (what byte-level BPE vocabularies spell)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


BYTE_CHARS = _byte_alphabet()
CHAR_BYTES = {c: b for b, c in BYTE_CHARS.items()}


def _bpe_state(tok: HFTokenizer) -> dict:
    """The tokenizer.json of a byte-level BPE tokenizer, refused with a message for any other kind."""
    state = json.loads(tok.tok.to_str())
    if state["model"].get("type") != "BPE" or "ByteLevel" not in json.dumps(state.get("pre_tokenizer")):
        raise ValueError(f"{tok.path}: not a byte-level BPE vocabulary (GPT-2 / SmolLM2 style); new tokens can be "
                         "mined only for those and for SentencePiece bases")
    state["model"]["merges"] = [m.split(" ", 1) if isinstance(m, str) else m for m in state["model"]["merges"]]
    return state


def bpe_merges(tok: HFTokenizer) -> list[str]:
    """A byte-level BPE tokenizer's merges as GGUF stores them ('a b'), in rank order."""
    return [" ".join(m) for m in _bpe_state(tok)["model"]["merges"]]


def _spelled(token: str) -> bytes | None:
    """The bytes a byte-level token stands for (None for special tokens spelled outside the byte alphabet)."""
    try:
        return bytes(CHAR_BYTES[c] for c in token)
    except KeyError:
        return None


def _mergeable(b: bytes) -> bool:
    """A mined token: whole CJK characters, or a piece of one CJK character's bytes (a step towards it)."""
    try:
        text = b.decode("utf-8")
    except UnicodeDecodeError:
        leads = [i for i, x in enumerate(b) if x >= 0xC0]
        return len(b) <= 3 and leads in ([], [0]) and (not leads or b[0] >= 0xE2)  # CJK starts at U+2E80
    return all(is_cjk(c) for c in text)


def _cjk_runs(tok: HFTokenizer, texts: list[str]) -> collections.Counter:
    """How often each run of CJK characters occurs inside the base's pre-tokens (the units BPE merges within)."""
    runs = collections.Counter()
    for text in texts:
        for word, _ in tok.tok.pre_tokenizer.pre_tokenize_str(text):
            chars, run = (_spelled(word) or b"").decode("utf-8", errors="replace"), []
            for c in chars + "\0":
                if is_cjk(c):
                    run.append(c)
                elif run:
                    runs["".join(run)] += 1
                    run = []
    return runs


def mine_bpe(base: HFTokenizer, texts: list[str], min_count: int = MIN_COUNT, max_new: int = MAX_NEW,
             source: str = AUTO) -> HFTokenizer:
    """`base` + BPE merges learned on the CJK text of `texts`, after the base's: the most frequent adjacent pair
    (at least min_count times) is merged, again and again, as BPE training does, but only into whole CJK
    characters and words (or a piece of one character on the way to it). Deterministic: ties go to the
    smaller byte string."""
    state = _bpe_state(base)
    vocab, merges = state["model"]["vocab"], state["model"]["merges"]
    spelled = {i: b for t, i in vocab.items() if (b := _spelled(t)) is not None}
    ids = {b: i for i, b in spelled.items()}
    runs = _cjk_runs(base, texts)
    words = [[t.id for t in base.tok.model.tokenize("".join(BYTE_CHARS[x] for x in r.encode()))] for r in runs]
    counts = list(runs.values())
    ok = {}

    def mergeable(pair) -> bool:
        if pair not in ok:
            ok[pair] = _mergeable(spelled[pair[0]] + spelled[pair[1]])
        return ok[pair]

    def pairs_of(word) -> collections.Counter:
        return collections.Counter(p for p in zip(word, word[1:]) if mergeable(p))

    pairs, where = collections.Counter(), collections.defaultdict(set)  # pair -> count, words holding it
    for w, word in enumerate(words):
        for p, k in pairs_of(word).items():
            pairs[p] += k * counts[w]
            where[p].add(w)
    heap = [(-n, spelled[a] + spelled[b], (a, b)) for (a, b), n in pairs.items()]
    heapq.heapify(heap)
    new_merges, next_id = [], base.vocab_size
    while heap and len(new_merges) < max_new:
        n, joined, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -n:  # a stale entry: the count changed since it was pushed
            continue
        if -n < min_count:
            break
        if joined not in ids:
            ids[joined], spelled[next_id] = next_id, joined
            next_id += 1
        new, changed = ids[joined], set()
        for w in where.pop(pair):
            old, merged, i = words[w], [], 0
            while i < len(old):  # left to right, as BPE applies one merge to a word
                if i + 1 < len(old) and (old[i], old[i + 1]) == pair:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(old[i])
                    i += 1
            words[w] = merged
            before, after = pairs_of(old), pairs_of(merged)
            for p, k in (after - before).items():
                pairs[p] += k * counts[w]
                where[p].add(w)
                changed.add(p)
            for p, k in (before - after).items():
                pairs[p] -= k * counts[w]
                changed.add(p)
        del pairs[pair]
        ok[pair] = False  # merged once: a pair that reappears (next to a reused token) is never merged again
        new_merges.append(pair)
        for p in changed:
            if pairs.get(p, 0) > 0:
                heapq.heappush(heap, (-pairs[p], spelled[p[0]] + spelled[p[1]], p))
    if not new_merges:
        raise ValueError(f"{source}: no CJK character or word occurs {min_count} times in the data that the base's "
                         "vocabulary does not already hold; nothing to add")
    spell = {i: "".join(BYTE_CHARS[x] for x in b) for i, b in spelled.items()}
    for i in range(base.vocab_size, next_id):
        vocab[spell[i]] = i
    merges += [[spell[a], spell[b]] for a, b in new_merges]
    return _bpe(base, state, Extension(base.vocab_size, len(merges) - len(new_merges), source))


def _bpe(base: HFTokenizer, state: dict, extension: Extension) -> HFTokenizer:
    from tokenizers import Tokenizer as TkTokenizer

    tok = HFTokenizer(base.path, TkTokenizer.from_str(json.dumps(state)), base.bos_id, base.eos_id, base.pad_id,
                      base.add_bos)
    tok.extension = extension
    return tok


# ---------------------------------------------------------------------------------------------------------------
# extended tokenizers: made, checked against their base, split into the base's pieces


def extend(base: Tokenizer, how: str, texts: list[str] | None = None, min_count: int = MIN_COUNT,
           max_new: int = MAX_NEW) -> Tokenizer:
    """The base's tokenizer extended: `how` is "auto" (new tokens from `texts`), a SentencePiece .model to merge,
    or a directory holding an extended tokenizer (python -m lora_core.vocab --out, or a training run's output)."""
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
    return merge_sentencepiece(base, read_sentencepiece(path), str(path))


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
        ours, theirs = _bpe_state(tok)["model"]["merges"], _bpe_state(base)["model"]["merges"]
        merges = len(theirs)
        if ours[:merges] != theirs:
            raise ValueError(f"{wrong}: its merges do not start with the base's; it was made for another base")
    tok.extension = Extension(n, merges, (tok.extension.source if tok.extension else "") or str(where))
    return tok


def base_splits(tok: Tokenizer, base: Tokenizer) -> list[list[int]]:
    """For every new token of `tok`, the base ids its text is made of (as the base alone would tokenize it)."""
    new = range(tok.extension.base_size, tok.vocab_size)
    if isinstance(tok, SentencePieceTokenizer):
        import sentencepiece as spm

        proto = _proto(base)  # the base, minus the leading space it adds to a text: a piece is mid-text
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


def extended_tokenizer(how: str, base: Tokenizer, vocab_size: int, data, resume_from: Path | None = None,
                       log=print) -> Tokenizer:
    """train.py --extend-vocab: the extended tokenizer of a run (the checkpoint's own when resuming)."""
    if vocab_size != base.vocab_size:
        raise ValueError(f"{base.path}: the base embeds {vocab_size} rows for a {base.vocab_size}-token vocabulary; "
                         "extending a padded vocabulary is not supported")
    if resume_from is not None and any((resume_from / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        return check_extends(load_tokenizer(resume_from), base, resume_from)
    from .data import texts_of

    texts = texts_of(data)
    tok = extend(base, how, texts)
    if log:
        log(f"vocabulary: {base.vocab_size} -> {tok.vocab_size} tokens ({tok.extension.source}); tokens per "
            f"character of the data: {tokens_per_char(base, texts):.3f} -> {tokens_per_char(tok, texts):.3f}")
    return tok


# ---------------------------------------------------------------------------------------------------------------
# python -m lora_core.vocab


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_core.vocab", description="Extend a base's vocabulary and write "
                                "the extended tokenizer (for train.py --extend-vocab DIR).")
    p.add_argument("--base", default="smollm2-135m", help="model directory, .gguf file or smollm2-135m")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--merge", help="a SentencePiece .model whose pieces to merge (SentencePiece bases)")
    how.add_argument("--mine", nargs="+", help="data files (alpaca JSON / JSONL, raw .txt) to learn new tokens from")
    p.add_argument("--min-count", type=int, default=MIN_COUNT, help="byte-level BPE: occurrences a mined token needs")
    p.add_argument("--max-new", type=int, default=MAX_NEW, help="byte-level BPE: at most this many new tokens")
    p.add_argument("--measure", nargs="+", default=None, help="files to report tokens per character on (default: "
                   "--mine's)")
    p.add_argument("--out", required=True, help="directory for the extended tokenizer (created; must not exist)")
    a = p.parse_args(argv)
    from .api import open_base
    from .data import texts_of
    from .tokenizer import write_tokenizer_files

    out = Path(a.out)
    try:
        if out.exists():
            raise FileExistsError(f"{out}: already exists; choose another --out")
        if a.min_count < 1 or a.max_new < 1:
            raise ValueError("--min-count and --max-new must be at least 1")
        src, base = open_base(a.base)
        texts = texts_of(a.mine) if a.mine else None
        tok = extend(base, AUTO if a.mine else a.merge, texts, a.min_count, a.max_new)
        if src.args.vocab_size != base.vocab_size:
            raise ValueError(f"{src.path}: the base embeds {src.args.vocab_size} rows for a {base.vocab_size}-token "
                             "vocabulary; extending a padded vocabulary is not supported")
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.mkdir(parents=True)
        try:
            write_tokenizer_files(tok, tmp)
            tmp.rename(out)
        finally:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
    except (ValueError, OSError) as e:
        print(f"python -m lora_core.vocab: error: {e}", file=sys.stderr)
        return 1
    print(f"vocabulary: {base.vocab_size} -> {tok.vocab_size} tokens; written to {out}")
    measure = texts_of(a.measure) if a.measure else texts
    if measure:
        print(f"tokens per character: {tokens_per_char(base, measure):.3f} -> {tokens_per_char(tok, measure):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
