"""Tokenizers: SentencePiece (.model), vocabularies embedded in GGUF (llama / gpt2), HF tokenizer.json.

One interface for all: encode(text, bos=None, eos=False), decode(ids), bos_id / eos_id / pad_id,
vocab_size, and StreamDecoder for printing ids as they arrive without broken UTF-8. write_tokenizer_files
writes one back out as HF / Meta tokenizer files (tokenizer.model or tokenizer.json + tokenizer_config.json).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .gguf_io import GGUFFile

# GGUF token types (llama.cpp llama_token_type) equal SentencePiece's ModelProto.SentencePiece.Type
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class Extension:
    """What an extended tokenizer adds to its base: the ids from base_size on are new (a byte-level BPE also
    keeps the base's base_merges merges first); `source` says where the new tokens came from."""

    base_size: int
    base_merges: int = 0
    source: str = ""


class Tokenizer:
    """Common interface; subclasses provide _encode (no specials) and decode."""

    path: Path
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    add_bos: bool
    # set on a vocabulary grown from a base's (lora_core.vocab): ids from extension.base_size on are new
    extension = None

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Token ids of text; bos=None follows the tokenizer's own add-BOS setting."""
        ids = self._encode(text)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)

    def piece(self, i: int) -> str:
        """The vocabulary's own string for id i (SentencePiece's '▁' for spaces, byte-level BPE's 'Ġ'...)."""
        raise NotImplementedError

    def __repr__(self):
        grown = f", extended from {self.extension.base_size}" if self.extension is not None else ""
        return (f"{type(self).__name__}({self.path.name}, vocab={self.vocab_size}{grown}, bos={self.bos_id}, "
                f"eos={self.eos_id})")


class StreamDecoder:
    """Turns a growing list of ids into text pieces, holding back bytes of an unfinished character.

    Decodes a short window (from the last emitted boundary) rather than everything, and compares it
    with the same window without the new ids, so SentencePiece's leading-space rules cancel out.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids already turned into emitted text

    def put(self, ids) -> str:
        """Add ids (an int or a list); return the newly completed text (maybe empty)."""
        self.ids.extend([ids] if isinstance(ids, int) else ids)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""  # a multi-byte character is still incomplete
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """Whatever is left at the end (replacement characters if the ids end mid-character)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


class SentencePieceTokenizer(Tokenizer):
    """LLaMA 1/2 and Chinese-LLaMA .model files (byte fallback decoded by sentencepiece itself)."""

    def __init__(self, path: Path, model_proto: bytes | None = None):
        import sentencepiece as spm

        self.path = Path(path)
        try:
            if model_proto is None:
                self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
            else:
                self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path}: not a SentencePiece model ({e}); pass the tokenizer.model file") from e
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = _id_or_none(self.sp.bos_id())
        self.eos_id = _id_or_none(self.sp.eos_id())
        # LLaMA defines no pad piece; alpaca-lora padded with unk (0), which keeps pad distinct from EOS
        self.pad_id = next(i for i in (self.sp.pad_id(), self.sp.unk_id(), self.sp.eos_id(), 0) if i >= 0)
        self.add_bos = True

    def _encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(list(ids))

    def piece(self, i):
        return self.sp.id_to_piece(i)


class HFTokenizer(Tokenizer):
    """A `tokenizers` Tokenizer: HF tokenizer.json, or a byte-level BPE built from a GGUF vocabulary."""

    def __init__(self, path: Path, tok, bos_id, eos_id, pad_id, add_bos: bool):
        self.path = Path(path)
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.add_bos = add_bos

    def _encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def piece(self, i):
        return self.tok.id_to_token(i)


def _id_or_none(i: int) -> int | None:
    return i if i is not None and i >= 0 else None


def _sentencepiece_from_gguf(f: GGUFFile) -> SentencePieceTokenizer:
    """Rebuild a SentencePiece BPE model from tokenizer.ggml.{tokens,scores,token_type}."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise ImportError("reading a SentencePiece vocabulary from GGUF needs protobuf: pip install protobuf") from e
    tokens = f.meta("tokenizer.ggml.tokens")
    scores = f.meta("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = f.meta("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(tokens)
    m.trainer_spec.byte_fallback = TOKEN_BYTE in types
    m.trainer_spec.unk_id = _id_or_none(f.meta("tokenizer.ggml.unknown_token_id", 0)) or 0
    m.trainer_spec.bos_id = _gguf_id(f, "bos", -1)
    m.trainer_spec.eos_id = _gguf_id(f, "eos", -1)
    m.trainer_spec.pad_id = _gguf_id(f, "padding", -1)
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(f.meta("tokenizer.ggml.add_space_prefix", True))
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    for piece, score, kind in zip(tokens, scores, types):
        m.pieces.add(piece=piece, score=float(score), type=int(kind))
    tok = SentencePieceTokenizer(f.path, model_proto=m.SerializeToString())
    tok.add_bos = bool(f.meta("tokenizer.ggml.add_bos_token", True))
    return tok


def _gguf_id(f: GGUFFile, name: str, default):
    value = f.meta(f"tokenizer.ggml.{name}_token_id")
    return default if value is None else int(value)


def _bpe_from_gguf(f: GGUFFile) -> HFTokenizer:
    """GPT-2 style byte-level BPE (SmolLM2) from tokenizer.ggml.{tokens,merges,token_type}."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as TkTokenizer

    tokens = f.meta("tokenizer.ggml.tokens")
    types = f.meta("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in f.meta("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = TkTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if f.meta("tokenizer.ggml.pre") == "smollm":  # SmolLM's tokenizer.json splits digits one by one first
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_CONTROL]
    tok.add_special_tokens(special)
    return HFTokenizer(
        f.path, tok, _gguf_id(f, "bos", None), _gguf_id(f, "eos", None), _gguf_id(f, "padding", None),
        add_bos=bool(f.meta("tokenizer.ggml.add_bos_token", False)),
    )


def tokenizer_from_gguf(f: GGUFFile) -> Tokenizer:
    kind = f.meta("tokenizer.ggml.model")
    if kind == "llama":
        return _sentencepiece_from_gguf(f)
    if kind == "gpt2":
        return _bpe_from_gguf(f)
    raise ValueError(f"{f.path}: GGUF vocabulary type {kind!r} is not supported (llama and gpt2 are)")


def _hf_token_id(tok, cfg: dict, model_cfg: dict, name: str):
    """Special token id from tokenizer_config.json (string or {content}) or config.json's *_token_id."""
    value = cfg.get(f"{name}_token")
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str) and tok.token_to_id(value) is not None:
        return tok.token_to_id(value)
    value = model_cfg.get(f"{name}_token_id")
    return value[0] if isinstance(value, list) else value


def _tokenizer_json(path: Path) -> HFTokenizer:
    from tokenizers import Tokenizer as TkTokenizer

    try:
        tok = TkTokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception subclass on bad files
        raise ValueError(f"{path}: not a valid tokenizer.json ({e}); re-save it with tokenizers") from e
    cfg = _json_or_empty(path.parent / "tokenizer_config.json")
    model_cfg = _json_or_empty(path.parent / "config.json")
    bos, eos, pad = (_hf_token_id(tok, cfg, model_cfg, n) for n in ("bos", "eos", "pad"))
    # does the file's own post-processor prepend BOS? that is the add-BOS setting HF users get
    plain, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a").ids
    prepends = bos is not None and len(full) > len(plain) and full[0] == bos
    add_bos = cfg.get("add_bos_token", prepends)
    return HFTokenizer(path, tok, bos, eos, pad, add_bos=bool(add_bos))


def _json_or_empty(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}); fix or delete the file") from e


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A .model, tokenizer.json, .gguf file, or a directory holding tokenizer.json / tokenizer.model."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer file not found")
    if path.suffix == ".gguf":
        return tokenizer_from_gguf(GGUFFile(path))
    if path.suffix == ".json":
        return _tokenizer_json(path)
    return SentencePieceTokenizer(path)


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def _replace_file(path: Path, write):
    """write(tmp) then rename over `path`: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_tokenizer_files(tok: Tokenizer, out: Path):
    """Tokenizer files transformers and our loader read: the base's own files when it has them, else rebuilt ones
    (tokenizer.model for SentencePiece, tokenizer.json for byte-level BPE), and a tokenizer_config.json. An
    extended vocabulary is always written from the tokenizer itself (its files on disk are the base's)."""
    src = Path(tok.path)
    own = []
    if tok.extension is None and src.suffix != ".gguf":
        own = [src.parent / n for n in HF_TOKENIZER_FILES if (src.parent / n).is_file()]
        if src.suffix == ".model" and src.is_file() and src.parent / "tokenizer.model" not in own:
            own.append(src)  # a tokenizer.model found one level up (Meta's layout)
    for f in own:
        name = "tokenizer.model" if f.suffix == ".model" else f.name
        _replace_file(out / name, lambda t, f=f: shutil.copyfile(f, t))
    if any(f.name == "tokenizer_config.json" for f in own):
        return
    if isinstance(tok, SentencePieceTokenizer):
        if not own:
            _replace_file(out / "tokenizer.model", lambda t: t.write_bytes(tok.sp.serialized_model_proto()))
        cls = "LlamaTokenizer"
    else:
        assert isinstance(tok, HFTokenizer)
        if not own:
            _replace_file(out / "tokenizer.json", lambda t: tok.tok.save(str(t)))
        cls = "PreTrainedTokenizerFast"
    config = {"tokenizer_class": cls, "add_bos_token": tok.add_bos, "add_eos_token": False,
              "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
    for name, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        if i is not None:
            config[f"{name}_token"] = tok.piece(i)
    text = json.dumps(config, indent=2, ensure_ascii=False)
    _replace_file(out / "tokenizer_config.json", lambda t: t.write_text(text, encoding="utf-8"))
