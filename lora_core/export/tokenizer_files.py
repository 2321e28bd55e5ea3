"""The base's tokenizer carried into an export: GGUF vocabulary fields, or HF / Meta tokenizer files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..tokenizer import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
)

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def add_gguf_vocabulary(writer, tok: Tokenizer, source_gguf=None):
    """tokenizer.* keys for llama.cpp: copied from a GGUF base, or built from a SentencePiece model."""
    if source_gguf is not None:
        for key, field in source_gguf._reader.fields.items():
            if key.startswith("tokenizer."):
                sub = field.types[1] if len(field.types) > 1 else None
                writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
        return
    if not isinstance(tok, SentencePieceTokenizer):
        raise ValueError(f"{tok.path}: GGUF export embeds SentencePiece vocabularies or those of a GGUF base; for this "
                         "tokenizer.json use --format hf and llama.cpp's convert_hf_to_gguf.py")
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(tok.sp.serialized_model_proto())
    kinds = {pb.ModelProto.SentencePiece.NORMAL: TOKEN_NORMAL, pb.ModelProto.SentencePiece.UNKNOWN: TOKEN_UNKNOWN,
             pb.ModelProto.SentencePiece.CONTROL: TOKEN_CONTROL,
             pb.ModelProto.SentencePiece.USER_DEFINED: TOKEN_USER_DEFINED,
             pb.ModelProto.SentencePiece.UNUSED: TOKEN_UNUSED, pb.ModelProto.SentencePiece.BYTE: TOKEN_BYTE}
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([p.piece.encode() for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([kinds[p.type] for p in proto.pieces])
    writer.add_unk_token_id(max(tok.sp.unk_id(), 0))
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        writer.add_eos_token_id(tok.eos_id)
    if tok.sp.pad_id() >= 0:
        writer.add_pad_token_id(tok.sp.pad_id())
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)


def write_tokenizer_files(tok: Tokenizer, out: Path):
    """Tokenizer files beside exported weights: the base's own files when it has them, else rebuilt ones
    (a GGUF base's vocabulary as tokenizer.model for SentencePiece, tokenizer.json for byte-level BPE)."""
    src = Path(tok.path)
    own = [src.parent / n for n in HF_TOKENIZER_FILES if src.suffix != ".gguf" and (src.parent / n).is_file()]
    if src.suffix == ".model" and src.is_file() and src.parent / "tokenizer.model" not in own:
        own.append(src)  # a tokenizer.model found one level up (Meta's layout)
    for f in own:
        shutil.copyfile(f, out / ("tokenizer.model" if f.suffix == ".model" else f.name))
    if any(f.name == "tokenizer_config.json" for f in own):
        return
    if isinstance(tok, SentencePieceTokenizer):
        if not own:
            (out / "tokenizer.model").write_bytes(tok.sp.serialized_model_proto())
        cls, piece = "LlamaTokenizer", tok.sp.id_to_piece
    else:
        assert isinstance(tok, HFTokenizer)
        if not own:
            tok.tok.save(str(out / "tokenizer.json"))
        cls, piece = "PreTrainedTokenizerFast", tok.tok.id_to_token
    config = {"tokenizer_class": cls, "add_bos_token": tok.add_bos, "add_eos_token": False,
              "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
    for name, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        if i is not None:
            config[f"{name}_token"] = piece(i)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
