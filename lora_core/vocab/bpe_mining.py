"""Byte-level BPE bases (SmolLM2): merges continued on the Chinese text of the data (characters, then words),
appended after the base's merges, so our tokenizer, transformers and llama.cpp run the same BPE on them."""
from __future__ import annotations

import collections
import heapq
import json

from ..tokenizer import Extension, HFTokenizer

AUTO = "auto"
MIN_COUNT = 3  # a mined token occurs at least this often in the data
MAX_NEW = 20000  # at most this many new tokens (chinese_sp.model, merged into LLaMA, brings 17953)


def is_cjk(ch: str) -> bool:
    """CJK ideographs (all planes), radicals, CJK punctuation, kana, compatibility and full-width forms."""
    o = ord(ch)
    return 0x2E80 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF or 0xFE30 <= o <= 0xFE4F or 0xFF00 <= o <= 0xFFEF or (
        0x20000 <= o <= 0x3FFFF)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: each byte as a printable character (what byte-level BPE vocabularies spell)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


BYTE_CHARS = _byte_alphabet()
CHAR_BYTES = {c: b for b, c in BYTE_CHARS.items()}


def bpe_state(tok: HFTokenizer) -> dict:
    """The tokenizer.json of a byte-level BPE tokenizer, refused with a message for any other kind."""
    state = json.loads(tok.tok.to_str())
    if state["model"].get("type") != "BPE" or "ByteLevel" not in json.dumps(state.get("pre_tokenizer")):
        raise ValueError(f"{tok.path}: not a byte-level BPE vocabulary (GPT-2 / SmolLM2 style); new tokens can be "
                         "mined only for those and for SentencePiece bases")
    state["model"]["merges"] = [m.split(" ", 1) if isinstance(m, str) else m for m in state["model"]["merges"]]
    return state


def bpe_merges(tok: HFTokenizer) -> list[str]:
    """A byte-level BPE tokenizer's merges as GGUF stores them ('a b'), in rank order."""
    return [" ".join(m) for m in bpe_state(tok)["model"]["merges"]]


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
    state = bpe_state(base)
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
