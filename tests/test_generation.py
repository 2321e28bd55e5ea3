"""Generation with the KV cache on real SmolLM2: against transformers, with adapters, streaming, stops."""
import io
import json

import pytest
import torch

from lora_core.batch_generation import generate_batch, left_pad
from lora_core.chat import Conversation
from lora_core.cli import generate as generate_cli
from lora_core.data import ALPACA, VICUNA_CHAT
from lora_core.generation import TextStopper, generate
from lora_core.sampling import Sampling

from helpers import randomize_lora, run_cli

GREEDY = Sampling(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)
ZH = "骆驼是一种大型哺乳动物，生活在沙漠里。它们能够长时间不喝水。"


@pytest.mark.parametrize("prompt,penalty", [(ALPACA.prompt("Name three colours."), 1.0),
                                            (ALPACA.prompt("Write a haiku about rain."), 1.3),
                                            ("Once upon a time", 1.0)])
def test_greedy_equals_transformers(smollm2, hf_smollm2, prompt, penalty):
    model, tok = smollm2
    ids = tok.encode(prompt)
    g = generate(model, tok, ids, Sampling(0, 0, 1.0, penalty), max_new_tokens=40)
    with torch.no_grad():
        ref = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, repetition_penalty=penalty,
                                  eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    if ref and ref[-1] == tok.eos_id:
        ref, reason = ref[:-1], "eos"
    else:
        reason = "length"
    assert g.token_ids == ref and g.stop_reason == reason
    assert g.text == tok.decode(ref)


@pytest.mark.parametrize("penalty,stop", [(1.0, ()), (1.3, ("\n",))])
def test_batched_greedy_equals_batch_one(smollm2, penalty, stop):
    """Left-padded rows of different lengths decode exactly as each prompt alone (RoPE positions, padding mask,
    per-row penalty context and stop strings)."""
    model, tok = smollm2
    questions = ["Name three colours.", "Why is the sky blue? Answer in one sentence, please.", "What is 2 + 2?",
                 "Write a haiku about rain."]
    prompts = [tok.encode(ALPACA.prompt(q)) for q in questions]
    assert len({len(p) for p in prompts}) == len(prompts)  # every row padded differently
    s = Sampling(0, 0, 1.0, penalty)
    batched = generate_batch(model, tok, prompts, s, max_new_tokens=20, stop=stop)
    for p, b in zip(prompts, batched):
        one = generate(model, tok, p, s, max_new_tokens=20, stop=stop)
        assert (b.token_ids, b.text, b.stop_reason) == (one.token_ids, one.text, one.stop_reason)
    assert len({tuple(b.token_ids) for b in batched}) == len(prompts)


def test_left_pad():
    tokens, mask, positions = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_adapter_changes_output_and_unmerged_equals_merged(smollm2_path):
    import lora_core
    from lora_core.lora import apply_lora, set_merged

    model, tok = lora_core.load(smollm2_path, dtype="fp32")
    ids = tok.encode(ALPACA.prompt("Who are you?"))
    base = generate(model, tok, ids, GREEDY, max_new_tokens=24).token_ids
    apply_lora(model, "all", r=8, alpha=16)
    randomize_lora(model, std=0.05, a_too=True)
    unmerged = generate(model, tok, ids, GREEDY, max_new_tokens=24).token_ids
    set_merged(model, True)
    merged = generate(model, tok, ids, GREEDY, max_new_tokens=24).token_ids
    assert unmerged != base
    assert merged == unmerged


def test_seeded_sampling_is_reproducible(smollm2):
    model, tok = smollm2
    ids = tok.encode(ALPACA.prompt("Tell me a story."))
    s = Sampling(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1)
    a = generate(model, tok, ids, s, max_new_tokens=20, seed=3).token_ids
    b = generate(model, tok, ids, s, max_new_tokens=20, seed=3).token_ids
    c = generate(model, tok, ids, s, max_new_tokens=20, seed=4).token_ids
    assert a == b and a != c


def test_streamed_pieces_equal_one_shot_decode(smollm2):
    """Sampled continuation of a Chinese prompt: byte-level tokens split characters, pieces never do."""
    model, tok = smollm2
    pieces = []
    g = generate(model, tok, tok.encode(ZH), Sampling(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.0),
                 max_new_tokens=48, seed=0, on_text=pieces.append)
    assert "".join(pieces) == g.text == tok.decode(g.token_ids)
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in g.text) > 10 and len(pieces) > 10
    assert not any("\ufffd" in p for p in pieces)


def test_stream_of_chinese_tokens_one_by_one(smollm2):
    _, tok = smollm2
    ids = tok.encode(ZH)
    assert len(ids) > len(ZH) / 2, "expected byte-level pieces for Chinese"
    dec, stopper, out = tok.stream(), TextStopper(()), []
    for i in ids:
        out.append(stopper.add(dec.put(i)))
    out.append(stopper.add(dec.flush()))
    assert "".join(out) == tok.decode(ids) == ZH
    assert not any("\ufffd" in p for p in out)


def test_stop_string_cuts_and_held_back_text_is_released():
    s = TextStopper(("### Instruction:",))
    assert s.add("Paris is the capital.\n\n#") == "Paris is the capital.\n\n"  # '#' could start the stop
    assert s.add("## Instr") == ""
    assert s.add("uction: more") == "" and s.stopped
    assert s.text == "Paris is the capital.\n\n"
    s = TextStopper(("### Instruction:",))
    assert s.add("C# #") == "C# "
    assert s.add("x") == "#x" and not s.stopped
    assert s.flush() == ""


def test_generation_stops_at_stop_string(smollm2):
    model, tok = smollm2
    ids = tok.encode("1, 2, 3, 4,")
    g = generate(model, tok, ids, GREEDY, max_new_tokens=30, stop=(" 7",))
    assert g.stop_reason == "stop" and g.text.rstrip().endswith("6,") and " 7" not in g.text


def test_prompt_longer_than_context_refused(smollm2):
    model, tok = smollm2
    with pytest.raises(ValueError, match="context"):
        generate(model, tok, [1] * model.args.max_seq_len, GREEDY)


def test_conversation_trims_oldest_turns(smollm2):
    _, tok = smollm2
    conv = Conversation(tok, VICUNA_CHAT, context=120, max_new_tokens=20)
    for i in range(6):
        conv.add(f"Question number {i} about camels?", f"Answer number {i}: camels live in deserts.")
    ids = conv.prompt_ids("And what do they eat?")
    assert len(ids) + 20 <= 120 and conv.trimmed > 0
    kept = tok.decode(ids)
    assert "Question number 5" in kept and "Question number 0" not in kept
    assert kept.endswith("User:And what do they eat?\n\nAssistant:")


@pytest.fixture
def run_generate(capsys, monkeypatch):
    """generate.py's main(argv) in this process (fp32 base): (exit code, stdout, stderr)."""
    def run(*args, stdin=None):
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        return run_cli(generate_cli.main, ["--base-dtype", "fp32", *args], capsys)
    return run


def test_cli_prompt_prints_only_the_response(smollm2, run_generate):
    model, tok = smollm2
    code, out, err = run_generate("--prompt", "Name three colours.", "--temperature", "0", "--repetition-penalty",
                                  "1", "--max-new-tokens", "16")
    assert code == 0, err
    want = generate(model, tok, tok.encode(ALPACA.prompt("Name three colours.")), GREEDY, 16, ALPACA.stop).text
    assert out == want + "\n"
    assert "decode" in err and "tok/s" in err


def test_cli_input_file_and_interactive(tmp_path, run_generate):
    data = tmp_path / "q.jsonl"
    data.write_text('{"instruction": "Say hi."}\nnot json\n{"instruction": "Add", "input": "2 and 3"}\n')
    out = tmp_path / "a.jsonl"
    code, _, err = run_generate("--input-file", data, "--output-file", out, "--max-new-tokens", "8", "--seed", "1")
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["instruction"] for row in rows] == ["Say hi.", "Add"] and all(row["response"] for row in rows)
    assert "q.jsonl:2" in err and "1 bad records skipped" in err
    code, stdout, err = run_generate("--interactive", "--template", "vicuna_chat", "--max-new-tokens", "8",
                                     stdin="Hello!\n/reset\nWhat is 2+2?\n/quit\n")
    assert code == 0, err
    assert stdout.count("Assistant: ") == 2 and "new conversation" in err


@pytest.mark.parametrize("args,match", [
    (["--prompt", "a", "--interactive"], "choose one of"),
    (["--input", "x"], "choose one of"),
    (["--prompt", "a", "--raw", "--template", "alpaca"], "--raw"),
    (["--prompt", "a", "--top-p", "2"], "top-p"),
    (["--input-file", "q.json"], "needs --output-file"),
    (["--prompt", "a", "--merge"], "--merge folds an adapter into the base weights: give --adapter"),
    (["--input-file", "q.json", "--output-file", "a.jsonl", "--batch-size", "0"], "--batch-size 0"),
])
def test_cli_refuses_conflicting_settings(args, match, run_generate):
    code, _, err = run_generate(*args)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("generate.py: error:") and match in last


def test_cli_warns_about_settings_without_effect(run_generate):
    code, _, err = run_generate("--prompt", "Hi", "--temperature", "0", "--top-k", "5", "--seed", "2",
                                "--max-new-tokens", "2")
    assert code == 0, err
    assert "--top-k and --top-p have no effect" in err and "--seed has no effect" in err


def test_adapter_of_another_base_refused(smollm2_path, tmp_path):
    import lora_core
    from lora_core.adapter import save_adapter
    from lora_core.lora import apply_lora

    model, _ = lora_core.load(smollm2_path, dtype="fp32")
    apply_lora(model, "q_proj,v_proj", r=4, alpha=8)
    save_adapter(model, tmp_path / "a", "some-other-base", extras={"base": "some-other-base",
                                                                    "fingerprint": "0123456789abcdef",
                                                                    "vocab_size": model.args.vocab_size})
    with pytest.raises(ValueError, match="trained on some-other-base.*fingerprint 0123456789abcdef"):
        lora_core.load(smollm2_path, dtype="int8", adapter=tmp_path / "a")
    save_adapter(model, tmp_path / "b", "x", extras={"base": "x", "vocab_size": 32000})
    with pytest.raises(ValueError, match="32000-token vocabulary"):
        lora_core.load(smollm2_path, dtype="fp32", adapter=tmp_path / "b")


def test_loaded_adapter_with_dropout_is_deterministic(smollm2_path, tmp_path):
    """Dropout modules made while applying an adapter must follow the loaded model into eval mode."""
    import lora_core
    from lora_core.adapter import save_adapter
    from lora_core.lora import apply_lora

    model, tok = lora_core.load(smollm2_path, dtype="fp32")
    apply_lora(model, "q_proj,v_proj", r=4, alpha=8, dropout=0.3)
    randomize_lora(model, std=0.05)
    save_adapter(model, tmp_path / "a", str(smollm2_path))
    tuned, _ = lora_core.load(smollm2_path, dtype="fp32", adapter=tmp_path / "a")
    assert not tuned.training and not any(m.training for m in tuned.modules())
    x = torch.tensor([tok.encode("Hello there")])
    with torch.no_grad():
        assert torch.equal(tuned(x), tuned(x))


def test_unfinished_character_at_the_length_limit_is_dropped(smollm2, monkeypatch):
    """Stopping after the first byte token of a Chinese character shows nothing rather than U+FFFD."""
    import lora_core.generation as generation

    model, tok = smollm2
    ids = tok.encode("骆驼")
    assert len(ids) > 2 and "\ufffd" in tok.decode(ids[:1])  # byte-level: characters span several tokens
    forced = iter(ids)
    monkeypatch.setattr(generation, "next_token", lambda *args: next(forced))
    pieces = []
    g = generate(model, tok, tok.encode("Hi"), GREEDY, max_new_tokens=1, on_text=pieces.append)
    assert g.token_ids == ids[:1] and g.text == "" and "\ufffd" not in "".join(pieces)
    forced = iter(ids)
    g = generate(model, tok, tok.encode("Hi"), GREEDY, max_new_tokens=len(ids), on_text=pieces.append)
    assert g.text == "骆驼"
