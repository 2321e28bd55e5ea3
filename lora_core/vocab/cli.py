"""python -m lora_core.vocab: extend a base's vocabulary and write the extended tokenizer."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..api import open_base
from ..data import texts_of
from ..tokenizer import write_tokenizer_files
from .bpe_mining import AUTO, MAX_NEW, MIN_COUNT
from .extend import extend, tokens_per_char


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_core.vocab", description="Extend a base's vocabulary and write "
                                "the extended tokenizer (for train.py --extend-vocab DIR).")
    p.add_argument("--base", default="smollm2-135m", help="model directory, .gguf file or smollm2-135m")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--merge", help="a SentencePiece .model whose pieces to merge (SentencePiece bases)")
    how.add_argument("--mine", nargs="+", help="data files (alpaca JSON / JSONL, raw .txt) to learn new tokens from")
    p.add_argument("--min-count", type=int, default=MIN_COUNT, help="byte-level BPE: occurrences a mined token needs")
    p.add_argument("--max-new", type=int, default=MAX_NEW, help="byte-level BPE: at most this many new tokens")
    p.add_argument("--keep-digit-pieces", action="store_true", help="--merge: keep the pieces that hold digits "
                   "(Chinese-LLaMA's merge does: fewer Chinese tokens, but numbers in any text split differently); "
                   "by default they are left out when the base splits numbers digit by digit, as LLaMA's does")
    p.add_argument("--measure", nargs="+", default=None, help="files to report tokens per character on (default: "
                   "--mine's)")
    p.add_argument("--out", required=True, help="directory for the extended tokenizer (created; must not exist)")
    a = p.parse_args(argv)
    out = Path(a.out)
    try:
        if out.exists():
            raise FileExistsError(f"{out}: already exists; choose another --out")
        if a.min_count < 1 or a.max_new < 1:
            raise ValueError("--min-count and --max-new must be at least 1")
        src, base = open_base(a.base)
        texts = texts_of(a.mine) if a.mine else None
        tok = extend(base, AUTO if a.mine else a.merge, texts, a.min_count, a.max_new, a.keep_digit_pieces or None)
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
                shutil.rmtree(tmp)
    except (ValueError, OSError) as e:
        print(f"python -m lora_core.vocab: error: {e}", file=sys.stderr)
        return 1
    print(f"vocabulary: {base.vocab_size} -> {tok.vocab_size} tokens; written to {out}")
    measure = texts_of(a.measure) if a.measure else texts
    if measure:
        print(f"tokens per character: {tokens_per_char(base, measure):.3f} -> {tokens_per_char(tok, measure):.3f}")
    return 0
