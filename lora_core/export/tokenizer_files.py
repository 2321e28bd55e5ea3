"""The tokenizer carried into a GGUF export: the vocabulary fields llama.cpp reads (HF / Meta tokenizer files are
written by lora_core.tokenizer.write_tokenizer_files)."""
from __future__ import annotations

from ..tokenizer import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    SentencePieceTokenizer,
    Tokenizer,
)
from ..vocab import bpe_merges

VOCABULARY_KEYS = tuple(f"tokenizer.ggml.{k}" for k in ("tokens", "scores", "token_type", "merges"))


def add_gguf_vocabulary(writer, tok: Tokenizer, source_gguf=None):
    """tokenizer.* keys for llama.cpp: copied from a GGUF base, or built from a SentencePiece model. An extended
    vocabulary (lora_core.vocab) keeps a GGUF base's other tokenizer keys (pre-tokenizer, special ids, chat
    template) and takes its token lists (and merges) from the tokenizer."""
    grown = tok.extension is not None
    if source_gguf is not None:
        for key, field in source_gguf._reader.fields.items():
            if key.startswith("tokenizer.") and not (grown and key in VOCABULARY_KEYS):
                sub = field.types[1] if len(field.types) > 1 else None
                writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
        if grown and isinstance(tok, SentencePieceTokenizer):
            _sentencepiece_lists(writer, tok)
        elif grown:
            types = source_gguf.meta("tokenizer.ggml.token_type")
            writer.add_token_list([tok.piece(i) for i in range(tok.vocab_size)])
            writer.add_token_types(types + [TOKEN_NORMAL] * (tok.vocab_size - len(types)))
            writer.add_token_merges(bpe_merges(tok))
        return
    if not isinstance(tok, SentencePieceTokenizer):
        raise ValueError(f"{tok.path}: GGUF export embeds SentencePiece vocabularies or those of a GGUF base; for this "
                         "tokenizer.json use --format hf and llama.cpp's convert_hf_to_gguf.py")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    proto = _sentencepiece_lists(writer, tok)
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


def _sentencepiece_lists(writer, tok: SentencePieceTokenizer):
    """tokenizer.ggml.tokens / scores / token_type of a SentencePiece model; returns its ModelProto."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(tok.sp.serialized_model_proto())
    kinds = {pb.ModelProto.SentencePiece.NORMAL: TOKEN_NORMAL, pb.ModelProto.SentencePiece.UNKNOWN: TOKEN_UNKNOWN,
             pb.ModelProto.SentencePiece.CONTROL: TOKEN_CONTROL,
             pb.ModelProto.SentencePiece.USER_DEFINED: TOKEN_USER_DEFINED,
             pb.ModelProto.SentencePiece.UNUSED: TOKEN_UNUSED, pb.ModelProto.SentencePiece.BYTE: TOKEN_BYTE}
    writer.add_token_list([p.piece.encode() for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([kinds[p.type] for p in proto.pieces])
    return proto
