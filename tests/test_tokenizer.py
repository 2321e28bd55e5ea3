"""Tokenizers against reference libraries: sentencepiece, HF tokenizers/transformers, llama.cpp."""
import json

import pytest

from lora_core.tokenizer import SentencePieceTokenizer, load_tokenizer

from gguf_fixtures import write_gguf
from helpers import DATA, TOKENIZERS, need_shared, random_meta_state

SAMPLES = [
    "Hello world! How are you today?",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "我们的名字是骆驼，一个中文指令模型。",
    "Mixed 中英文 text with numbers 12345 and symbols #@!",
    "Emoji 🦙 and rare characters 㐀 𠀀 ñ é",
    "",
]


def real_texts(n=6):
    texts = []
    for name in ("alpaca_zh_demo.json", "alpaca_en_demo.json"):
        rows = json.loads(need_shared(DATA / name).read_text(encoding="utf-8"))[:n]
        texts += [r["instruction"] + "\n" + r["output"] for r in rows]
    return texts


@pytest.fixture(scope="module")
def texts():
    return SAMPLES + real_texts()


@pytest.fixture(scope="module", params=["llama2_tokenizer.model", "chinese_sp.model"])
def sp_pair(request):
    import sentencepiece as spm

    path = need_shared(TOKENIZERS / request.param)
    return SentencePieceTokenizer(path), spm.SentencePieceProcessor(model_file=str(path))


def test_sentencepiece_ids(sp_pair, texts):
    ours, ref = sp_pair
    for t in texts:
        assert ours.encode(t, bos=False) == ref.encode(t)
        assert ours.encode(t) == [ref.bos_id()] + ref.encode(t)  # LLaMA adds BOS by default
        assert ours.encode(t, eos=True)[-1] == ref.eos_id()


def test_sentencepiece_round_trip(sp_pair, texts):
    ours, ref = sp_pair
    for t in texts:
        assert ours.decode(ours.encode(t)) == ref.decode(ref.encode(t))


def test_llama2_special_ids():
    tok = load_tokenizer(need_shared(TOKENIZERS / "llama2_tokenizer.model"))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    assert tok.pad_id == 0 and tok.pad_id != tok.eos_id  # alpaca-lora's choice: pad with unk, never EOS


@pytest.fixture(scope="module")
def llama_vocab_gguf(tmp_path_factory):
    """A tiny llama GGUF carrying LLaMA-2's SentencePiece vocabulary, as convert_hf_to_gguf.py stores it."""
    params = dict(dim=32, n_layers=1, n_heads=4, multiple_of=32, norm_eps=1e-5)
    path = tmp_path_factory.mktemp("gguf") / "llama2-vocab.gguf"
    write_gguf(path, random_meta_state(params, 32000, tie=False), params, 96,
               sp_model=need_shared(TOKENIZERS / "llama2_tokenizer.model"))
    return path


def test_gguf_sentencepiece_vocab(llama_vocab_gguf, texts):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(TOKENIZERS / "llama2_tokenizer.model"))
    tok = load_tokenizer(llama_vocab_gguf)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    for t in texts:
        assert tok.encode(t, bos=False) == ref.encode(t), t
        assert tok.decode(tok.encode(t)) == ref.decode(ref.encode(t))


def llama_cpp_vocab(path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def test_gguf_sentencepiece_vocab_against_llama_cpp(llama_vocab_gguf, texts):
    ref = llama_cpp_vocab(llama_vocab_gguf)
    tok = load_tokenizer(llama_vocab_gguf)
    for t in texts:
        if not t:
            continue
        assert tok.encode(t) == ref.tokenize(t.encode(), add_bos=True, special=False), t


@pytest.fixture(scope="module")
def hf_smollm2_tokenizer(smollm2_path):
    """transformers' tokenizer for the GGUF, with SmolLM2's own pre-tokenizer restored.

    transformers converts every gpt2-type GGUF vocabulary with the plain GPT-2 pre-tokenizer, but
    SmolLM2's tokenizer.json (and llama.cpp's "smollm" pre-type) splits digits one by one first,
    which changes e.g. "\n\n1." (llama.cpp itself is compared in test_smollm2_against_llama_cpp).
    """
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    ref = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return ref


def test_smollm2_against_transformers(smollm2, hf_smollm2_tokenizer, texts):
    ref = hf_smollm2_tokenizer
    _, tok = smollm2
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, False, 49152)
    for t in texts + ["<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(t) == ref(t).input_ids, t
        assert tok.decode(tok.encode(t)) == t


def test_smollm2_against_llama_cpp(smollm2, smollm2_path, texts):
    ref = llama_cpp_vocab(smollm2_path)
    _, tok = smollm2
    for t in texts:
        if t:
            assert tok.encode(t) == ref.tokenize(t.encode(), add_bos=False, special=False), t


def test_tokenizer_json_directory(hf_smollm2_tokenizer, tmp_path, texts):
    """An HF directory with tokenizer.json (+ tokenizer_config.json) as save_pretrained writes it."""
    ref = hf_smollm2_tokenizer
    ref.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.path.name == "tokenizer.json"
    assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    for t in texts:
        assert tok.encode(t) == ref(t).input_ids


@pytest.mark.parametrize("which", ["llama2_tokenizer.model", "smollm2"])
def test_stream_decode_equals_one_shot(which, smollm2, texts):
    tok = smollm2[1] if which == "smollm2" else load_tokenizer(need_shared(TOKENIZERS / which))
    for t in texts:
        ids = tok.encode(t, bos=False)
        stream = tok.stream()
        pieces = [stream.put(i) for i in ids] + [stream.flush()]
        assert all("\ufffd" not in p for p in pieces), pieces
        assert "".join(pieces) == tok.decode(ids)


def test_stream_holds_split_character():
    """骆 is three UTF-8 bytes; with byte fallback LLaMA-2 may split it over byte tokens."""
    tok = load_tokenizer(need_shared(TOKENIZERS / "llama2_tokenizer.model"))
    ids = tok.encode("㐀", bos=False)  # a rare CJK character, certainly byte-encoded
    assert len(ids) >= 3
    stream = tok.stream()
    assert [stream.put(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream.put(ids[-1]).strip() == "㐀"
