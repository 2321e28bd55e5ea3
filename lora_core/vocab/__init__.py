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
from .bpe_mining import AUTO, BYTE_CHARS, bpe_merges, is_cjk, mine_bpe
from .extend import check_extends, extend, extended_tokenizer, tokens_per_char
from .resize import ExtendedEmbedding, base_splits, grow_rows, resize_model
from .sentencepiece_merge import merge_sentencepiece, read_sentencepiece, train_sentencepiece

__all__ = ["AUTO", "BYTE_CHARS", "ExtendedEmbedding", "base_splits", "bpe_merges", "check_extends", "extend",
           "extended_tokenizer", "grow_rows", "is_cjk", "merge_sentencepiece", "mine_bpe", "read_sentencepiece",
           "resize_model", "tokens_per_char", "train_sentencepiece"]
