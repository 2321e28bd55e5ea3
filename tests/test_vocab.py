"""Vocabulary extension: chinese_sp.model merged into LLaMA-2's SentencePiece model and Chinese tokens mined for
SmolLM2's byte-level BPE, checked against sentencepiece, transformers and llama.cpp; the grown embeddings;
training on them end to end (a SentencePiece and a byte-level BPE base) into adapters that carry their
tokenizer, load in PEFT and export to GGUF that llama.cpp runs with the same greedy tokens; bad input."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open

import lora_core
from lora_core.cli import export as export_cli
from lora_core.cli import generate as generate_cli
from lora_core.cli import train as train_cli
from lora_core.tokenizer import load_tokenizer
from lora_core.vocab import extend, is_cjk, resize_model, tokens_per_char

from gguf_fixtures import write_gguf
from helpers import DATA, TOKENIZERS, meta_hidden_dim, need_shared, random_meta_state, run_cli, write_hf

SAMPLES = ["Hello world! How are you today?", "我们的名字是骆驼，一个中文指令模型。",
           "Mixed 中英文 text with numbers 12345 and symbols #@!", "  leading spaces,\ttabs\nand newlines\n\n",
           "Emoji 🦙 and rare characters 㐀 𠀀 ñ é", "中华人民共和国成立于1949年。越来越多的人喜欢意大利面。"]
PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5)


def fields(name):
    rows = json.loads(need_shared(DATA / name).read_text(encoding="utf-8"))
    return [r[k] for r in rows for k in ("instruction", "input", "output") if r.get(k)]


@pytest.fixture(scope="module")
def zh():
    return fields("alpaca_zh_demo.json")


@pytest.fixture(scope="module")
def en():
    return fields("alpaca_en_demo.json")


@pytest.fixture(scope="module")
def llama2():
    return load_tokenizer(need_shared(TOKENIZERS / "llama2_tokenizer.model"))


@pytest.fixture(scope="module")
def merged(llama2):
    return extend(llama2, str(need_shared(TOKENIZERS / "chinese_sp.model")))


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def mined(smol, zh):
    return extend(smol, "auto", zh)


# ---------------------------------------------------------------------------------------------------------------
# the vocabularies


def fewest_tokens(text: str, pieces: set[str]) -> int:
    """The fewest tokens any SentencePiece split of text into `pieces` takes (dynamic programming over the text
    as SentencePiece sees it: a leading space, spaces as '▁'; a character outside the pieces costs its UTF-8
    bytes, byte fallback)."""
    s = "\u2581" + text.replace(" ", "\u2581")
    longest = max(map(len, pieces))
    best = [0] + [len(s) * 4] * len(s)
    for i in range(len(s)):
        one = best[i] + (1 if s[i] in pieces else len(s[i].encode()))
        best[i + 1] = min(best[i + 1], one)
        for j in range(i + 2, min(i + longest, len(s)) + 1):
            if s[i:j] in pieces:
                best[j] = min(best[j], best[i] + 1)
    return best[-1]


def test_chinese_sp_merged_into_llama2(llama2, merged, zh, en):
    """Chinese-LLaMA's merge (49953 pieces there): chinese_sp's ordinary pieces appended once, in its order,
    below every LLaMA-2 score, without the pieces that join digits (LLaMA-2 splits numbers digit by digit), each
    preceded by the prefixes BPE needs to form it. 0.614 tokens/char on alpaca_zh, English unchanged."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    base = pb.ModelProto.FromString(llama2.sp.serialized_model_proto())
    other = pb.ModelProto.FromString((TOKENIZERS / "chinese_sp.model").read_bytes())
    ours = pb.ModelProto.FromString(merged.sp.serialized_model_proto())
    have = {p.piece for p in base.pieces}
    want = [p.piece for p in other.pieces if p.type == 1 and p.piece not in have and not any(map(str.isdigit, p.piece))]
    assert [(p.piece, p.score, p.type) for p in ours.pieces[:32000]] == [(p.piece, p.score, p.type)
                                                                          for p in base.pieces]
    new = [p.piece for p in ours.pieces[32000:]]
    assert len(set(new)) == len(new) and [p for p in new if p in set(want)] == want
    vocab = have | set(new)
    for i, piece in enumerate(new):
        if piece not in set(want):  # an added prefix: of the next piece of chinese_sp, which needed it
            nxt = next(p for p in new[i + 1:] if p in set(want))
            assert nxt.startswith(piece) and len(piece) < len(nxt), (piece, nxt)
        # every piece can be formed by BPE: its prefix one character shorter is a piece, or it is two pieces
        assert len(piece) == 1 or piece[:-1] in vocab or any(
            piece[:k] in vocab and piece[k:] in vocab for k in range(1, len(piece))), piece
    scores = [p.score for p in ours.pieces[32000:]]
    assert max(scores) < min(p.score for p in base.pieces) and all(a > b for a, b in zip(scores, scores[1:]))
    assert merged.extension.base_size == 32000 and merged.vocab_size == 32000 + len(new) > 32000 + len(want)
    before, after = tokens_per_char(llama2, zh), tokens_per_char(merged, zh)
    en_change = tokens_per_char(merged, en) / tokens_per_char(llama2, en) - 1
    print(f"\nLLaMA-2 + chinese_sp.model: {before:.4f} -> {after:.4f} tokens/char on alpaca_zh ({before / after:.2f}x "
          f"fewer); English {en_change:+.3%}")
    assert before == pytest.approx(1.28, abs=0.005) and after < 0.615 and abs(en_change) < 0.001
    # no tokenizer made of these pieces can do much better: the fewest tokens a split needs is above 0.60
    normal = {p.piece for p in ours.pieces if p.type == 1}
    bound = sum(fewest_tokens(t, normal) for t in zh) / sum(map(len, zh))
    print(f"fewest tokens/char any split into these pieces needs: {bound:.4f}")
    assert 0.60 < bound <= after < bound * 1.01


def test_chinese_sp_merged_with_its_digit_pieces(llama2, zh, en):
    """Chinese-LLaMA's choice, kept digit pieces (python -m lora_core.vocab --keep-digit-pieces): at most 0.60
    tokens/char on alpaca_zh, the issue's figure; numbers then split differently in English text as well (fewer
    tokens there too), which is why it is not the default."""
    merged = extend(llama2, str(need_shared(TOKENIZERS / "chinese_sp.model")), digit_pieces=True)
    assert any(c.isdigit() for i in range(32000, merged.vocab_size) for c in merged.piece(i))
    after = tokens_per_char(merged, zh)
    en_change = tokens_per_char(merged, en) / tokens_per_char(llama2, en) - 1
    print(f"\nwith digit pieces: {after:.4f} tokens/char on alpaca_zh; English {en_change:+.3%}")
    assert after <= 0.60 and en_change < -0.01
    assert merged.encode("1949年", bos=False) != llama2.encode("1949年", bos=False)


def test_mined_smollm2_vocabulary(smol, mined, zh, en):
    """Byte-level BPE: merges learned on the Chinese text, appended after SmolLM2's; English is untouched."""
    from lora_core.vocab import BYTE_CHARS

    assert mined.extension.base_size == smol.vocab_size == 49152 and mined.vocab_size > 49152
    before, after = tokens_per_char(smol, zh), tokens_per_char(mined, zh)
    print(f"\nSmolLM2 + {mined.vocab_size - 49152} mined tokens: {before:.4f} -> {after:.4f} tokens/char on alpaca_zh "
          f"({before / after:.2f}x fewer)")
    assert before / after >= 1.8
    assert all(mined.encode(t) == smol.encode(t) for t in en if not any(is_cjk(c) for c in t))
    assert tokens_per_char(mined, en) == pytest.approx(tokens_per_char(smol, en), rel=0.01)
    for i in range(49152, mined.vocab_size):  # whole CJK characters and words, or a piece of one character
        raw = bytes({c: b for b, c in BYTE_CHARS.items()}[c] for c in mined.piece(i))
        try:
            assert all(is_cjk(c) for c in raw.decode("utf-8")), raw
        except UnicodeDecodeError:
            assert len(raw) <= 3, raw
    assert mined.decode(mined.encode(zh[0])) == zh[0]


def test_mining_is_deterministic_and_needs_counts(smol):
    texts = fields("luotuo_developer_instruction.json")
    a, b = extend(smol, "auto", texts), extend(smol, "auto", texts)
    assert a.tok.to_str() == b.tok.to_str()
    with pytest.raises(ValueError, match="no CJK character or word occurs 3 times"):
        extend(smol, "auto", ["hello world", "骆驼"])


def test_mined_vocabulary_ids_equal_transformers(mined, zh, en, tmp_path):
    """The mined vocabulary as written beside an adapter (tokenizer.json) splits text as transformers does."""
    transformers = pytest.importorskip("transformers")
    from lora_core.tokenizer import write_tokenizer_files

    write_tokenizer_files(mined, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == mined.vocab_size
    for t in SAMPLES + zh[:TEXTS_ZH] + en[:100] + ["<|im_start|>user\n你好<|im_end|>"]:
        assert hf(t)["input_ids"] == mined.encode(t), t


# ---------------------------------------------------------------------------------------------------------------
# tiny bases trained end to end with an extended vocabulary, exported, run in transformers and llama.cpp


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    rows = json.loads(need_shared(DATA / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    (d / "zh.json").write_text(json.dumps(rows[:300], ensure_ascii=False), encoding="utf-8")
    (d / "raw.jsonl").write_text("".join(json.dumps({"text": r["output"]}, ensure_ascii=False) + "\n"
                                         for r in rows[300:340]), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def sp_base(work):
    """A small random LLaMA-2-shaped base (HF layout, untied, GQA) with LLaMA-2's tokenizer."""
    write_hf(work / "sp-base", random_meta_state(PARAMS, 32000, tie=False), PARAMS, 32000, tie=False)
    shutil.copy(need_shared(TOKENIZERS / "llama2_tokenizer.model"), work / "sp-base" / "tokenizer.model")
    return work / "sp-base"


@pytest.fixture(scope="module")
def bpe_base(work, smollm2_path):
    """A small random LLaMA (GGUF, tied) carrying SmolLM2's byte-level BPE vocabulary."""
    path = work / "bpe-base.gguf"
    write_gguf(path, random_meta_state(PARAMS, 49152, tie=True), PARAMS, meta_hidden_dim(64, 32, None),
               vocab_from=smollm2_path)
    return path


def train_args(base, out, data, how, *extra) -> list[str]:
    return [str(a) for a in ["--data", *data, "--base", base, "--output", out, "--base-dtype", "fp32", "--batch-size",
                             "4", "--micro-batch-size", "2", "--max-steps", "2", "--warmup-steps", "1", "--val-size",
                             "0", "--cutoff-len", "64", "--lr", "1e-2", "--extend-vocab", how, *extra]]


def train(base, out, data, how, capsys, *extra):
    return run_cli(train_cli.main, train_args(base, out, data, how, *extra), capsys)


def trained(work, name, base, how):
    """A base trained (instruction data mixed with raw text), then exported: gguf f32 and hf f32."""
    from lora_core.export import export

    d = work / f"{name}-run"
    assert train_cli.main(train_args(base, d / "adapter", [work / "zh.json", work / "raw.jsonl"], how)) == 0
    export(base, d / "adapter", "gguf", d / "m.gguf", "f32")
    export(base, d / "adapter", "hf", d / "hf", "f32")
    return base, d


@pytest.fixture(scope="module")
def sp_run(work, sp_base):
    return trained(work, "sp", sp_base, str(TOKENIZERS / "chinese_sp.model"))


@pytest.fixture(scope="module")
def bpe_run(work, bpe_base):
    return trained(work, "bpe", bpe_base, "auto")


RUNS = ["sp_run", pytest.param("bpe_run", marks=pytest.mark.slow)]  # the byte-level BPE base: under -m slow


TEXTS_ZH = 400  # alpaca_zh fields compared in every tool (all 3000 in the BPE case, whose tools are quick)


@pytest.mark.parametrize("run", RUNS)
def test_adapter_directory_carries_the_tokenizer(run, request):
    base, d = request.getfixturevalue(run)
    files = {p.name for p in (d / "adapter").iterdir()}
    assert {"tokenizer_config.json", "tokenizer.model" if run == "sp_run" else "tokenizer.json"} <= files
    model, tok = lora_core.load(base, adapter=d / "adapter")
    base_tok = load_tokenizer(base)
    assert tok.extension.base_size == base_tok.vocab_size and tok.vocab_size > base_tok.vocab_size
    assert model.args.vocab_size == model.embed_tokens.weight.shape[0] == model.lm_head.weight.shape[0] == (
        tok.vocab_size)
    with safe_open(str(d / "adapter" / "adapter_model.safetensors"), "pt") as f:
        extras = json.loads(f.metadata()["lora_core"])
    assert (extras["vocab_size"], extras["extended_vocab_size"]) == (base_tok.vocab_size, tok.vocab_size)
    cfg = json.loads((d / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["modules_to_save"]) == {"embed_tokens", "lm_head"}


def test_sentencepiece_extension_ids_everywhere(sp_run, zh, en):
    """ours == sentencepiece (the written tokenizer.model) == our GGUF reader == llama.cpp; transformers'
    LlamaTokenizer agrees wherever it agrees with sentencepiece on LLaMA-2's own vocabulary (it merges runs
    of spaces in another order, for the base as for the extension)."""
    import sentencepiece as spm

    base, d = sp_run
    _, ours = lora_core.load(base, adapter=d / "adapter")
    ref = spm.SentencePieceProcessor(model_file=str(d / "adapter" / "tokenizer.model"))
    _, from_gguf = lora_core.load(d / "m.gguf")
    texts = SAMPLES + zh[:TEXTS_ZH] + en[:100]
    for t in texts:
        assert ours.encode(t) == [1] + ref.encode(t) == from_gguf.encode(t), t
    transformers = pytest.importorskip("transformers")
    llama2_dir = d / "llama2-tokenizer"
    llama2_dir.mkdir(exist_ok=True)
    shutil.copy(TOKENIZERS / "llama2_tokenizer.model", llama2_dir / "tokenizer.model")
    shutil.copy(d / "hf" / "tokenizer_config.json", llama2_dir / "tokenizer_config.json")
    hf_base = transformers.AutoTokenizer.from_pretrained(llama2_dir)
    llama2 = spm.SentencePieceProcessor(model_file=str(TOKENIZERS / "llama2_tokenizer.model"))
    hf = transformers.AutoTokenizer.from_pretrained(d / "hf")
    base_differs = {t for t in texts if hf_base(t)["input_ids"] != [1] + llama2.encode(t)}
    assert {t for t in texts if hf(t)["input_ids"] != ours.encode(t)} == base_differs
    assert len(base_differs) < len(texts) // 20
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed")
    llm = llama_cpp.Llama(model_path=str(d / "m.gguf"), vocab_only=True, verbose=False)
    for t in texts:
        if t:
            assert llm.tokenize(t.encode(), add_bos=True, special=False) == ours.encode(t), t


@pytest.mark.slow
def test_bpe_extension_ids_everywhere(bpe_run, zh, en):
    """ours == transformers (the adapter's and the export's tokenizer.json) == our GGUF reader == llama.cpp."""
    base, d = bpe_run
    _, ours = lora_core.load(base, adapter=d / "adapter")
    _, from_gguf = lora_core.load(d / "m.gguf")
    texts = SAMPLES + zh + en[:300] + ["<|im_start|>user\n你好<|im_end|>"]
    transformers = pytest.importorskip("transformers")
    hf, beside = (transformers.AutoTokenizer.from_pretrained(p) for p in (d / "hf", d / "adapter"))
    for t in texts:
        want = ours.encode(t)
        assert want == from_gguf.encode(t) == hf(t)["input_ids"] == beside(t)["input_ids"], t
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed")
    llm = llama_cpp.Llama(model_path=str(d / "m.gguf"), vocab_only=True, verbose=False)
    for t in texts:
        if t:
            assert llm.tokenize(t.encode(), add_bos=False, special=True) == ours.encode(t), t


@pytest.mark.parametrize("run", RUNS)
def test_exports_equal_base_plus_adapter_and_run_in_llama_cpp(run, request):
    """Every export format reproduces base + adapter; llama.cpp answers a Chinese prompt with our greedy tokens."""
    from lora_core.generation import generate
    from lora_core.sampling import Sampling

    base, d = request.getfixturevalue(run)
    ref, tok = lora_core.load(base, adapter=d / "adapter")
    prompt = "### Instruction:\n请用一句话介绍中华人民共和国的首都。\n\n### Response:\n"
    ids = tok.encode(prompt)
    assert any(i >= tok.extension.base_size for i in ids)  # the prompt uses new tokens
    with torch.no_grad():
        want = ref(torch.tensor([ids]))[0, -1]
    for path in (d / "m.gguf", d / "hf"):
        model, t2 = lora_core.load(path)
        assert t2.encode(prompt) == ids
        with torch.no_grad():
            torch.testing.assert_close(model(torch.tensor([ids]))[0, -1], want, atol=1e-4, rtol=0)
    greedy = Sampling(0, 0, 1.0, 1.0)
    mine = generate(ref, tok, ids, greedy, max_new_tokens=16, ignore_eos=True).token_ids
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(d / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits[0, -1], want, atol=1e-4, rtol=0)
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed")
    llm = llama_cpp.Llama(model_path=str(d / "m.gguf"), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    assert (torch.tensor(llm.scores[len(ids) - 1]) - want).abs().max().item() < 1e-2  # llama.cpp: f16 KV cache
    llm.reset()
    theirs = [t for t, _ in zip(llm.generate(ids, temp=0.0, repeat_penalty=1.0), range(16))]
    assert theirs == mine, (tok.decode(mine), tok.decode(theirs))


def test_new_rows_start_at_the_mean_of_their_pieces(sp_base, merged, llama2, smol, mined, bpe_base):
    """Rows for new tokens: the mean of the rows of the pieces the base vocabulary splits them into (found here
    with sentencepiece / transformers); old rows and old-vocabulary logits unchanged; a tied base stays tied."""
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(TOKENIZERS / "llama2_tokenizer.model"))
    model, _ = lora_core.load(sp_base)
    old_emb, old_head = model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    x = torch.tensor([llama2.encode("Hello, 我们")])
    with torch.no_grad():
        before = model(x)
    resize_model(model, merged, llama2)
    i = merged.sp.piece_to_id("中国")
    parts = [ref.piece_to_id("中"), ref.piece_to_id("国")]
    torch.testing.assert_close(model.embed_tokens.weight[i], old_emb[parts].mean(0))
    torch.testing.assert_close(model.lm_head.weight[i], old_head[parts].mean(0))
    assert torch.equal(model.embed_tokens.weight[:32000], old_emb)
    assert torch.equal(model.lm_head.weight[:32000], old_head)
    with torch.no_grad():
        after = model(x)
    assert after.shape[-1] == merged.vocab_size and torch.equal(after[..., :32000], before)

    transformers = pytest.importorskip("transformers")
    hf_smol = transformers.AutoTokenizer.from_pretrained(str(smol.path.parent), gguf_file=smol.path.name)
    model, _ = lora_core.load(bpe_base)
    old = model.embed_tokens.weight.clone()
    resize_model(model, mined, smol)
    i = mined.encode("我们")
    assert len(i) == 1 and i[0] >= 49152
    torch.testing.assert_close(model.embed_tokens.weight[i[0]], old[hf_smol("我们")["input_ids"]].mean(0))
    assert model.lm_head.weight is model.embed_tokens.weight  # SmolLM2 ties them; training unties (modules_to_save)


@pytest.mark.parametrize("tie", [False, True])
def test_grown_adapter_loads_in_peft(work, merged, llama2, tie):
    """PEFT's way: resize the base's embeddings to the tokenizer the adapter carries, then load it."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lora_core.adapter import save_adapter
    from lora_core.lora import apply_lora, enable_modules_to_save

    from helpers import randomize_lora

    d = work / f"peft-{tie}"
    write_hf(d / "base", random_meta_state(PARAMS, 32000, tie=tie), PARAMS, 32000, tie=tie)
    shutil.copy(TOKENIZERS / "llama2_tokenizer.model", d / "base" / "tokenizer.model")
    model, _ = lora_core.load(d / "base")
    resize_model(model, merged, llama2)
    apply_lora(model, "q_proj,v_proj", r=4, alpha=8)
    randomize_lora(model, std=0.1)
    enable_modules_to_save(model, ["embed_tokens", "lm_head"])
    with torch.no_grad():
        model.embed_tokens.weight[32000:] += torch.randn(model.embed_tokens.weight[32000:].shape) * 0.1
    save_adapter(model, d / "adapter", modules_to_save=("embed_tokens", "lm_head"))
    ids = torch.tensor([merged.encode("我们的名字是骆驼，中华人民共和国。")])
    assert ids.max() >= 32000
    hf = transformers.LlamaForCausalLM.from_pretrained(d / "base", torch_dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(d / "adapter")
    assert len(hf_tok) == merged.vocab_size and hf_tok("中华人民共和国")["input_ids"] == merged.encode("中华人民共和国")
    hf.resize_token_embeddings(len(hf_tok))
    peft_model = peft.PeftModel.from_pretrained(hf, d / "adapter").eval()
    ours, _ = lora_core.load(d / "base", adapter=d / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), peft_model(ids).logits, atol=3e-5, rtol=1e-5)


@pytest.mark.slow
def test_training_moves_the_new_rows_and_resume_keeps_the_vocabulary(work, sp_base, capsys):
    from safetensors.torch import load_file

    data = [work / "zh.json"]
    how = str(TOKENIZERS / "chinese_sp.model")
    full, cut = work / "resume-full", work / "resume-cut"
    assert train(sp_base, full, data, how, capsys, "--max-steps", "4", "--save-every", "2")[0] == 0
    assert train(sp_base, cut, data, how, capsys, "--max-steps", "2", "--save-every", "2")[0] == 0
    code, out, err = train(sp_base, cut, data, how, capsys, "--max-steps", "4", "--save-every", "2", "--resume")
    assert code == 0, err

    def losses(run):
        rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert losses(cut) == pytest.approx(losses(full), rel=1e-5) and sorted(losses(cut)) == [1, 2, 3, 4]
    emb = load_file(str(full / "adapter_model.safetensors"))["base_model.model.model.embed_tokens.weight"]
    loaded, base_tok = lora_core.load(sp_base)
    trained, _ = lora_core.load(sp_base, adapter=full)
    assert emb.shape[0] == 49801 and torch.equal(trained.embed_tokens.weight, emb)  # load() applies what was trained
    _, grown = lora_core.open_base(sp_base, adapter=full)
    resize_model(loaded, grown, base_tok)
    moved = (emb[32000:] - loaded.embed_tokens.weight[32000:]).abs().amax(1) > 0
    assert moved.any() and not moved.all()  # the rows of new tokens in the batches moved, the others did not


# ---------------------------------------------------------------------------------------------------------------
# the standalone command and bad input


def test_vocab_command_writes_a_tokenizer_train_reuses(work, sp_base, capsys):
    from lora_core.vocab.cli import main

    out = work / "zh-vocab"
    code, printed, err = run_cli(main, ["--base", sp_base, "--merge", TOKENIZERS / "chinese_sp.model", "--out", out,
                                        "--measure", DATA / "alpaca_zh_demo.json"], capsys)
    assert code == 0, err
    assert "32000 -> 49801 tokens" in printed and "tokens per character: 1.280 ->" in printed
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    code, _, err = run_cli(main, ["--base", sp_base, "--merge", TOKENIZERS / "chinese_sp.model", "--out", out], capsys)
    assert code == 1 and "already exists" in err
    code, _, err = train(sp_base, work / "from-dir", [work / "zh.json"], out, capsys)
    assert code == 0, err
    assert (work / "from-dir" / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_vocabulary_colliding_with_special_tokens_refused(work, sp_base, tmp_path, capsys):
    from sentencepiece import sentencepiece_model_pb2 as pb

    from lora_core.vocab.cli import main

    proto = pb.ModelProto.FromString((TOKENIZERS / "chinese_sp.model").read_bytes())
    proto.pieces[7].piece = "</s>"  # ordinary text in this model, LLaMA's EOS in the base
    (tmp_path / "bad.model").write_bytes(proto.SerializeToString())
    code, _, err = train(sp_base, tmp_path / "o", [work / "zh.json"], tmp_path / "bad.model", capsys)
    assert code == 1 and last_line(err).startswith("train.py: error: ")
    assert "bad.model: piece 7 '</s>' is ordinary text there but holds '</s>', the base's special token 2" in err
    assert len(err.strip().splitlines()) == 1 and not list((tmp_path / "o").glob("*.safetensors"))
    argv = ["--base", sp_base, "--merge", tmp_path / "bad.model", "--out", tmp_path / "v"]
    code, _, err = run_cli(main, argv, capsys)
    assert code == 1 and "special token" in last_line(err) and not (tmp_path / "v").exists()


def test_extension_for_the_wrong_base_refused(work, sp_base, bpe_base, sp_run, tmp_path, capsys):
    code, _, err = train(bpe_base, tmp_path / "a", [work / "zh.json"], TOKENIZERS / "chinese_sp.model", capsys)
    assert code == 1 and "merges only into a SentencePiece base" in last_line(err)
    _, sp_run = sp_run
    code, _, err = train(bpe_base, tmp_path / "b", [work / "zh.json"], sp_run / "adapter", capsys)
    assert code == 1 and "does not extend" in last_line(err) and "SentencePiece vocabulary" in last_line(err)
    other = tmp_path / "other-base"  # LLaMA-shaped, with chinese_sp.model as its vocabulary
    write_hf(other, random_meta_state(PARAMS, 20000, tie=False), PARAMS, 20000, tie=False)
    shutil.copy(TOKENIZERS / "chinese_sp.model", other / "tokenizer.model")
    code, _, err = train(other, tmp_path / "c", [work / "zh.json"], sp_run / "adapter", capsys)
    assert code == 1 and "token 3 is '<0x00>' there and ',' in the base; it was made for another base" in last_line(err)
    for out in ("a", "b", "c"):
        assert not list((tmp_path / out).glob("*.safetensors"))
    with pytest.raises(ValueError, match="32000-token vocabulary"):  # the adapter itself on another base
        lora_core.load(bpe_base, adapter=sp_run / "adapter")


def test_grown_adapter_without_its_tokenizer_refused(sp_run, tmp_path, capsys):
    base, d = sp_run
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(d / "adapter" / name, bare / name)
    with pytest.raises(FileNotFoundError, match="grew the vocabulary from 32000 to .* tokenizer .* is not in the") as e:
        lora_core.load(base, adapter=bare)
    assert "\n" not in str(e.value)
    code, _, err = run_cli(export_cli.main, ["--base", base, "--adapter", bare, "--format", "gguf", "--out",
                                             tmp_path / "m.gguf"], capsys)
    assert code == 1 and "is not in the directory" in last_line(err) and not (tmp_path / "m.gguf").exists()
    code, _, err = run_cli(generate_cli.main, ["--base", base, "--adapter", bare, "--prompt", "你好", "--base-dtype",
                                               "fp32"], capsys)
    assert code == 1 and "is not in the directory" in last_line(err)
    shutil.copy(TOKENIZERS / "llama2_tokenizer.model", bare / "tokenizer.model")  # a tokenizer, but not its own
    with pytest.raises(ValueError, match="32000 tokens, but the adapter's embeddings have"):
        lora_core.load(base, adapter=bare)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare"]


@pytest.mark.slow
def test_smollm2_extended_trained_exported_and_answered_alike_in_llama_cpp(work, smollm2_path, zh, tmp_path, capsys):
    """The real thing: SmolLM2-135M with tokens mined from Chinese data (train.py --extend-vocab auto), trained,
    then generate.py and export.py take the adapter with no other flag, and llama.cpp, given the exported GGUF,
    splits the prompt and answers it greedily exactly as we do (about 5 minutes on 2 busy cores)."""
    from lora_core.data import ALPACA
    from lora_core.generation import generate
    from lora_core.sampling import Sampling

    out = tmp_path / "smol-zh"
    argv = ["--data", work / "zh.json", "--output", out, "--base-dtype", "fp32", "--batch-size", "4",
            "--micro-batch-size", "4", "--max-steps", "4", "--warmup-steps", "1", "--lr", "1e-3", "--cutoff-len", "96",
            "--val-size", "0", "--extend-vocab", "auto"]
    code, printed, err = run_cli(train_cli.main, [str(a) for a in argv], capsys)
    assert code == 0, err
    assert "vocabulary: 49152 -> " in printed + err
    model, tok = lora_core.load(smollm2_path, adapter=out)
    assert tok.vocab_size > 49152 and model.args.vocab_size == tok.vocab_size
    prompt = ALPACA.prompt("请用一句话介绍中国的首都。")
    ids = tok.encode(prompt)
    assert sum(i >= 49152 for i in ids) >= 5 and len(ids) < len(load_tokenizer(smollm2_path).encode(prompt))
    greedy = Sampling(0, 0, 1.0, 1.0)
    mine = generate(model, tok, ids, greedy, max_new_tokens=16, ignore_eos=True).token_ids
    code, answer, err = run_cli(generate_cli.main, ["--adapter", str(out), "--prompt", "请用一句话介绍中国的首都。",
                                                    "--base-dtype", "fp32", "--temperature", "0",
                                                    "--repetition-penalty", "1", "--max-new-tokens", "16"], capsys)
    assert code == 0, err
    assert answer.strip() and tok.decode(mine).strip().startswith(answer.strip())
    code, _, err = run_cli(export_cli.main, ["--adapter", str(out), "--format", "gguf", "--dtype", "f32", "--out",
                                             str(tmp_path / "m.gguf")], capsys)
    assert code == 0, err
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=256, n_threads=1, verbose=False,
                          use_extra_bufts=False)
    for t in [prompt] + zh[:200]:
        assert llm.tokenize(t.encode(), add_bos=False, special=True) == tok.encode(t), t
    theirs = [t for t, _ in zip(llm.generate(ids, temp=0.0, repeat_penalty=1.0), range(16))]
    print(f"\nours: {tok.decode(mine)!r}\nllama.cpp: {tok.decode(theirs)!r}")
    assert theirs == mine
