"""Data: templates, label masking, EOS, truncation, bad records."""
import json

import pytest

from lora_core.data import (
    ALPACA,
    IGNORE,
    VICUNA_CHAT,
    encode_segments,
    load_examples,
    load_template,
    segments_of,
    split_validation,
)
from lora_core.tokenizer import load_tokenizer

from helpers import DATA, TOKENIZERS, need_shared


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(need_shared(TOKENIZERS / "llama2_tokenizer.model"))


def test_alpaca_prompt_is_alpaca_loras():
    assert ALPACA.prompt("Say hi.") == ("Below is an instruction that describes a task. Write a response that "
                                        "appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n"
                                        "### Response:\n")
    assert "### Input:\nthere\n\n### Response:\n" in ALPACA.prompt("Say hi.", "there")


def test_labels_mask_prompt_and_learn_eos(tok):
    segs = segments_of({"instruction": "Name a color.", "input": "", "output": "Blue."}, ALPACA)
    ex, truncated = encode_segments(segs, tok, 256, train_on_inputs=False)
    prompt_len = len(tok.encode(ALPACA.prompt("Name a color.")))
    assert not truncated and ex.input_ids[0] == tok.bos_id and ex.input_ids[-1] == tok.eos_id
    assert ex.labels[:prompt_len] == [IGNORE] * prompt_len
    assert ex.labels[prompt_len:] == ex.input_ids[prompt_len:]  # the answer and the EOS are learned
    assert tok.decode(ex.input_ids[prompt_len:-1]) == "Blue."
    everything, _ = encode_segments(segs, tok, 256, train_on_inputs=True)
    assert everything.labels == everything.input_ids


def test_a_cut_answer_learns_no_eos(tok):
    """alpaca-lora's rule: the cutoff cuts the text, and the model must not learn to stop where it was cut."""
    segs = segments_of({"instruction": "Count.", "output": " ".join(["one"] * 200)}, ALPACA)
    ex, truncated = encode_segments(segs, tok, 64, train_on_inputs=False)
    whole = tok.encode("".join(text for text, _ in segs))
    assert truncated and ex.input_ids == whole[:64] and tok.eos_id not in ex.labels
    fits = segments_of({"instruction": "Count.", "output": " ".join(["one"] * 40)}, ALPACA)
    ex, truncated = encode_segments(fits, tok, len(tok.encode("".join(t for t, _ in fits))) + 1, False)
    assert not truncated and ex.labels[-1] == tok.eos_id  # exactly room for the EOS: nothing was cut
    too_long = segments_of({"instruction": "word " * 100, "output": "x"}, ALPACA)
    assert encode_segments(too_long, tok, 64, train_on_inputs=False)[0] is None


def test_chat_record_supervises_every_assistant_turn(tok):
    rec = {"input": ["你好", "再见"], "output": ["你好！有什么可以帮你？", "再见！"]}
    ex, _ = encode_segments(segments_of(rec, VICUNA_CHAT), tok, 512, train_on_inputs=False)
    learned = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE and t != tok.eos_id])
    assert "你好！有什么可以帮你？" in learned and "再见！" in learned and "User" not in learned


def test_real_files_and_bad_records(tok, tmp_path):
    examples, report = load_examples([need_shared(DATA / "luotuo_developer_instruction.json"),
                                      DATA / "chinese_vicuna_chat_sample.jsonl"], tok, ALPACA, 256)
    assert report.kept == 48 + 3 and not report.bad
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok", "output": "fine"}\n{not json\n{"instruction": "no output"}\n'
                   '{"instruction": 3, "output": "x"}\n[1, 2]\n', encoding="utf-8")
    examples, report = load_examples(bad, tok, ALPACA, 256)
    assert report.kept == 1 and len(report.bad) == 4
    assert report.bad[0].startswith(f"{bad}:2: not JSON") and "missing or empty 'output'" in report.bad[1]
    with pytest.raises(ValueError, match=rf"{bad.name}:2: not JSON"):
        load_examples(bad, tok, ALPACA, 256, strict=True)
    (tmp_path / "broken.json").write_text('[{"instruction": "a", "output": "b"},', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.json:1: malformed JSON"):
        load_examples(tmp_path / "broken.json", tok, ALPACA, 256)


def test_template_file_and_errors(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"prompt_input": "I:{instruction} {input}\nR:",
                                                 "prompt_no_input": "I:{instruction}\nR:"}))
    assert load_template(str(tmp_path / "t.json")).prompt("go") == "I:go\nR:"
    with pytest.raises(FileNotFoundError, match="not one of alpaca"):
        load_template("nope")


def test_validation_split(tok):
    examples, _ = load_examples(need_shared(DATA / "luotuo_developer_instruction.json"), tok, ALPACA, 256)
    train, val = split_validation(examples, 0.25, seed=1)
    assert len(val) == 12 and len(train) == 36 and split_validation(examples, 0.25, seed=1)[1] == val
    with pytest.raises(ValueError, match="leaves no training examples"):
        split_validation(examples, 48, seed=1)
