"""Raw text for continued pretraining: .txt files and {text} records, documents joined with EOS and packed into
blocks in which every token but the very first is learned exactly once; mixable with instruction data."""
import json

import pytest
import sentencepiece as spm

from lora_core.data import ALPACA, IGNORE, load_examples, pack_documents, texts_of
from lora_core.tokenizer import load_tokenizer

from helpers import DATA, TOKENIZERS, need_shared


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(need_shared(TOKENIZERS / "llama2_tokenizer.model"))


@pytest.fixture(scope="module")
def documents():
    rows = json.loads(need_shared(DATA / "alpaca_zh_demo.json").read_text(encoding="utf-8"))[:40]
    return [r["output"] for r in rows]


@pytest.mark.parametrize("cutoff", [9, 64, 257])
def test_blocks_learn_every_token_once(tok, documents, cutoff):
    ref = spm.SentencePieceProcessor(model_file=str(TOKENIZERS / "llama2_tokenizer.model"))
    stream = [i for d in documents for i in [ref.bos_id()] + ref.encode(d) + [ref.eos_id()]]  # BOS ... EOS each
    blocks = pack_documents(documents, tok, cutoff)
    assert all(2 <= len(b.input_ids) <= cutoff and b.labels == b.input_ids for b in blocks)
    assert all(a.input_ids[-1] == b.input_ids[0] for a, b in zip(blocks, blocks[1:]))  # overlap by one token
    assert blocks[0].input_ids[:1] + [i for b in blocks for i in b.input_ids[1:]] == stream
    assert sum(b.n_targets for b in blocks) == len(stream) - 1  # each token after the first predicted once


def test_text_files_and_records_mix_with_instructions(tok, documents, tmp_path):
    (tmp_path / "book.txt").write_text(documents[0], encoding="utf-8")
    (tmp_path / "web.jsonl").write_text("".join(json.dumps({"text": d, "url": "x"}, ensure_ascii=False) + "\n"
                                                for d in documents[1:5]) + '{"text": ""}\n{"text": 3}\n',
                                        encoding="utf-8")
    luotuo = need_shared(DATA / "luotuo_developer_instruction.json")
    paths = [luotuo, tmp_path / "book.txt", tmp_path / "web.jsonl"]
    examples, report = load_examples(paths, tok, ALPACA, 128)
    instructions, _ = load_examples(luotuo, tok, ALPACA, 128)
    blocks = pack_documents(documents[:5], tok, 128)
    assert examples == instructions + blocks  # instruction examples as before, then the packed raw text
    assert (report.documents, report.blocks, len(report.bad)) == (5, len(blocks), 2)
    assert report.bad[0].startswith(f"{tmp_path / 'web.jsonl'}:5: empty 'text'")
    assert "raw text" in report.summary() and any(IGNORE in e.labels for e in examples)  # prompts still masked
    with pytest.raises(ValueError, match=r"web.jsonl:5: empty 'text' \(drop --strict"):
        load_examples(paths, tok, ALPACA, 128, strict=True)
    assert texts_of([tmp_path / "book.txt", tmp_path / "web.jsonl"]) == documents[:5]


def test_smollm2_documents_end_with_its_eos(smollm2_path, documents):
    tok = load_tokenizer(smollm2_path)  # no BOS in SmolLM2's template; <|im_end|> is its EOS
    blocks = pack_documents(documents[:2], tok, 10_000)
    assert len(blocks) == 1
    assert blocks[0].input_ids == tok.encode(documents[0]) + [tok.eos_id] + tok.encode(documents[1]) + [tok.eos_id]
