"""export: merged weights in gguf / meta / hf, read back by our loader, transformers and llama.cpp."""
import json

import pytest
import torch

from lora_core.data import ALPACA

from helpers import randomize_lora, run_cli

PROMPTS = ["The capital of France is", "你好，请介绍一下你自己。", ALPACA.prompt("Who are you?")]


@pytest.fixture(scope="module")
def adapter(smollm2_path, tmp_path_factory):
    """A non-trivial adapter on SmolLM2: all seven projections, random B, and a trained lm_head."""
    import lora_core
    from lora_core.adapter import save_adapter
    from lora_core.loader import base_fingerprint
    from lora_core.lora import apply_lora, enable_modules_to_save

    model, _ = lora_core.load(smollm2_path, dtype="fp32")
    extras = {"base": str(smollm2_path), "fingerprint": base_fingerprint(model), "vocab_size": model.args.vocab_size}
    apply_lora(model, "all", r=4, alpha=8)
    randomize_lora(model, std=0.03, a_too=True)  # the same adapter whatever ran before
    g = torch.Generator().manual_seed(1)
    enable_modules_to_save(model, ["lm_head"])
    model.lm_head.weight.data += torch.randn(model.lm_head.weight.shape, generator=g) * 0.01
    out = tmp_path_factory.mktemp("adapter") / "a"
    save_adapter(model, out, str(smollm2_path), extras, modules_to_save=("lm_head",))
    return out


@pytest.fixture(scope="module")
def reference(smollm2_path, adapter):
    """Base + adapter unmerged, fp32: what every export must reproduce; last-position logits per prompt."""
    import lora_core

    model, tok = lora_core.load(smollm2_path, dtype="fp32", adapter=adapter)
    with torch.no_grad():
        logits = [model(torch.tensor([tok.encode(p)]))[0, -1] for p in PROMPTS]
    return model, tok, logits


def logits_of(model, tok):
    with torch.no_grad():
        return [model(torch.tensor([tok.encode(p)]))[0, -1] for p in PROMPTS]


def test_merge_is_w_plus_scaled_ba(smollm2_path, adapter):
    """Every merged tensor equals the checkpoint's W + (alpha/r)·B·A, computed here from the files."""
    from safetensors.torch import load_file

    from lora_core.export.merge import plan_merge
    from lora_core.names import hf_to_meta_rows
    from lora_core.weights import open_weights

    ckpt = open_weights(smollm2_path)
    peft = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    merged = dict(plan_merge(ckpt, adapter).tensors())
    name = "layers.3.self_attn.q_proj.weight"
    a = peft["base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"]
    b = hf_to_meta_rows(peft["base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"], ckpt.args.n_heads)
    torch.testing.assert_close(merged[name], ckpt.get(name) + scale * b @ a, rtol=0, atol=1e-6)
    name = "layers.7.mlp.down_proj.weight"
    a = peft["base_model.model.model.layers.7.mlp.down_proj.lora_A.weight"]
    b = peft["base_model.model.model.layers.7.mlp.down_proj.lora_B.weight"]
    torch.testing.assert_close(merged[name], ckpt.get(name) + scale * b @ a, rtol=0, atol=1e-6)
    assert torch.equal(merged["lm_head.weight"], peft["base_model.model.lm_head.weight"])
    assert torch.equal(merged["embed_tokens.weight"], ckpt.get("embed_tokens.weight"))  # untied, untouched
    assert torch.equal(merged["norm.weight"], ckpt.get("norm.weight"))


@pytest.mark.parametrize("fmt,out", [("gguf", "m.gguf"), ("hf", "hf"), ("meta", "meta")])
def test_f32_round_trip_through_our_loader(smollm2_path, adapter, reference, tmp_path, fmt, out):
    import lora_core
    from lora_core.export import export

    path = export(smollm2_path, adapter, fmt, tmp_path / out, "f32")
    model, tok = lora_core.load(path, dtype="fp32")
    assert tok.encode(PROMPTS[1]) == reference[1].encode(PROMPTS[1])
    for ours, ref in zip(logits_of(model, tok), reference[2]):
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=0)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_meta_export_has_meta_names_and_params(smollm2_path, adapter, tmp_path):
    from lora_core.export import export

    out = export(smollm2_path, adapter, "meta", tmp_path / "meta", "bf16")
    state = torch.load(out / "consolidated.00.pth", weights_only=True, mmap=True)
    assert "layers.0.attention.wq.weight" in state and "output.weight" in state and "tok_embeddings.weight" in state
    assert state["layers.0.feed_forward.w1.weight"].dtype == torch.bfloat16
    params = json.loads((out / "params.json").read_text())
    assert (params["dim"], params["n_layers"], params["n_heads"], params["n_kv_heads"]) == (576, 30, 9, 3)


def test_hf_export_loads_in_transformers(smollm2_path, adapter, reference, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lora_core.export import export

    out = export(smollm2_path, adapter, "hf", tmp_path / "hf", "f32", max_shard_bytes=200 << 20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2  # sharded above the threshold
    model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    _, tok, ref = reference
    for prompt, want in zip(PROMPTS, ref):
        ids = hf_tok(prompt, add_special_tokens=True)["input_ids"]
        assert ids == tok.encode(prompt)
        with torch.no_grad():
            got = model(torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(got, want, atol=3e-4, rtol=0)


@pytest.mark.parametrize("dtype,atol", [("f16", 0.15), ("q8_0", 1.5)])
def test_gguf_runs_in_llama_cpp(smollm2_path, adapter, reference, tmp_path, dtype, atol):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed")
    import lora_core
    from lora_core.export import export
    from lora_core.generation import generate
    from lora_core.sampling import Sampling

    path = export(smollm2_path, adapter, "gguf", tmp_path / f"m-{dtype}.gguf", dtype)  # --verify: its own test
    extra = {} if dtype == "f16" else {"use_extra_bufts": False}  # AMX buffers crash on quantized GGUFs here
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False, **extra)
    _, tok, ref = reference
    for prompt, want in zip(PROMPTS, ref):
        ids = tok.encode(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        got = torch.tensor(llm.scores[len(ids) - 1])
        assert (got - want).abs().max().item() < atol
    # greedy tokens: llama.cpp on the file against our own run of the same file. f16: the same 16 tokens.
    # q8_0: llama.cpp also rounds activations to 8 bits, so near-ties may go the other way; each of its
    # tokens must then be one of our near-best on the same prefix (within the logit tolerance)
    ours, _ = lora_core.load(path, dtype="fp32")
    ids = tok.encode(PROMPTS[2])
    mine = generate(ours, tok, ids, Sampling(0, 0, 1.0, 1.0), max_new_tokens=16, ignore_eos=True).token_ids
    llm.reset()
    theirs = [t for t, _ in zip(llm.generate(ids, temp=0.0, repeat_penalty=1.0), range(16))]
    if dtype == "f16":
        assert mine == theirs, (tok.decode(mine), tok.decode(theirs))
    with torch.no_grad():
        logits = ours(torch.tensor([ids + theirs]))[0, len(ids) - 1:-1]  # our logits before each of their tokens
    gaps = logits.max(-1).values - logits[torch.arange(len(theirs)), torch.tensor(theirs)]
    assert gaps.max().item() < atol, (gaps.tolist(), tok.decode(mine), tok.decode(theirs))
    assert mine[:2] == theirs[:2]  # and the answer starts the same


def test_existing_output_kept_without_force(smollm2_path, adapter, tmp_path):
    from lora_core.export import export

    out = tmp_path / "m.gguf"
    out.write_text("precious")
    with pytest.raises(FileExistsError, match="--force"):
        export(smollm2_path, adapter, "gguf", out)
    assert out.read_text() == "precious"


def test_interrupted_export_leaves_nothing(smollm2_path, adapter, tmp_path, monkeypatch):
    from lora_core.export import export
    from lora_core.export import hf as export_hf

    real = export_hf.SafetensorsWriter.write
    calls = []

    def failing(self, name, tensor):
        calls.append(name)
        if len(calls) == 50:
            raise KeyboardInterrupt
        real(self, name, tensor)

    monkeypatch.setattr(export_hf.SafetensorsWriter, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        export(smollm2_path, adapter, "hf", tmp_path / "hf", "f32")
    assert list(tmp_path.iterdir()) == []


def test_no_room_on_disk(smollm2_path, adapter, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from lora_core.export import export

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(OSError, match="no room on disk"):
        export(smollm2_path, adapter, "gguf", tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_adapter_of_another_base_refused(smollm2_path, adapter, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from lora_core.export import export

    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    meta = {"lora_core": json.dumps({"base": "llama-7b", "fingerprint": "feedfacefeedface", "vocab_size": 49152})}
    save_file(tensors, str(bad / "adapter_model.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="trained on llama-7b"):
        export(smollm2_path, bad, "gguf", tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="unknown format"):
        export(smollm2_path, adapter, "onnx", tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="q8_0 is not available for --format hf"):
        export(smollm2_path, adapter, "hf", tmp_path / "hf", "q8_0")


def test_cli_verify_and_errors(adapter, tmp_path, capsys):
    from lora_core.cli.export import main

    out = tmp_path / "m.gguf"
    argv = ["--adapter", adapter, "--format", "gguf", "--out", out]
    code, _, err = run_cli(main, argv + ["--dtype", "q8_0", "--verify"], capsys)
    assert code == 0, err
    assert "verify: max |logit difference|" in err and out.is_file()
    code, _, err = run_cli(main, argv, capsys)
    assert code == 1 and err.strip().splitlines()[-1].startswith("export.py: error:")
    assert "--force" in err


@pytest.fixture(scope="module")
def llama2_like(tmp_path_factory):
    """A small random LLaMA in Meta's layout (untied, GQA) with LLaMA-2's real SentencePiece tokenizer,
    plus a random adapter on it: the path of LLaMA 1/2 and Chinese-LLaMA users."""
    import shutil

    import lora_core
    from lora_core.adapter import save_adapter
    from lora_core.loader import base_fingerprint
    from lora_core.lora import apply_lora

    from helpers import TOKENIZERS, need_shared, random_meta_state, write_meta

    params = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=64, norm_eps=1e-5, vocab_size=-1)
    d = tmp_path_factory.mktemp("llama2like")
    write_meta(d / "base", random_meta_state(params, 32000, tie=False), params)
    shutil.copy(need_shared(TOKENIZERS / "llama2_tokenizer.model"), d / "base" / "tokenizer.model")
    model, _ = lora_core.load(d / "base")
    extras = {"base": str(d / "base"), "fingerprint": base_fingerprint(model), "vocab_size": model.args.vocab_size}
    apply_lora(model, "q_proj,k_proj,v_proj,o_proj", r=4, alpha=8)
    randomize_lora(model, std=0.05)
    save_adapter(model, d / "adapter", str(d / "base"), extras)
    return d / "base", d / "adapter"


def test_sentencepiece_base_exports_run_everywhere(llama2_like, tmp_path):
    import lora_core
    from lora_core.export import export

    base, adapter = llama2_like
    ref, tok = lora_core.load(base, adapter=adapter)
    want = logits_of(ref, tok)
    for fmt, name in (("gguf", "m.gguf"), ("meta", "meta"), ("hf", "hf")):
        model, tok2 = lora_core.load(export(base, adapter, fmt, tmp_path / name, "f32"))
        assert tok2.encode(PROMPTS[1]) == tok.encode(PROMPTS[1])
        for got, w in zip(logits_of(model, tok2), want):
            torch.testing.assert_close(got, w, atol=1e-4, rtol=0)
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(PROMPTS[1])["input_ids"] == tok.encode(PROMPTS[1])
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    for prompt, w in zip(PROMPTS, want):
        ids = tok.encode(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=True) == ids
        llm.reset()
        llm.eval(ids)
        assert (torch.tensor(llm.scores[len(ids) - 1]) - w).abs().max().item() < 1e-2


def test_lora_gguf_runs_in_llama_cpp_on_the_base(smollm2_path, tmp_path):
    """The adapter alone as a llama.cpp LoRA GGUF: llama.cpp's base + --lora equals our base + adapter."""
    import lora_core
    from lora_core.adapter import save_adapter
    from lora_core.export import export
    from lora_core.lora import apply_lora

    model, tok = lora_core.load(smollm2_path, dtype="fp32")
    apply_lora(model, "q_proj,k_proj,v_proj,down_proj", r=4, alpha=8)
    randomize_lora(model, std=0.03, seed=1)
    save_adapter(model, tmp_path / "a", str(smollm2_path))
    want = logits_of(model, tok)
    lora = export(smollm2_path, tmp_path / "a", "lora-gguf", tmp_path / "adapter.gguf")
    with pytest.raises(ValueError, match="give --adapter"):
        export(smollm2_path, None, "lora-gguf", tmp_path / "x.gguf")
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed")
    base = export(smollm2_path, None, "gguf", tmp_path / "base.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(base), lora_path=str(lora), n_ctx=256, n_threads=2, logits_all=True,
                          verbose=False)
    for prompt, w in zip(PROMPTS, want):
        ids = tok.encode(prompt)
        llm.reset()
        llm.eval(ids)
        assert (torch.tensor(llm.scores[len(ids) - 1]) - w).abs().max().item() < 2e-2


def test_lora_gguf_refuses_modules_to_save(smollm2_path, adapter, tmp_path):
    from lora_core.export import export

    with pytest.raises(ValueError, match="holds only A and B.*lm_head"):
        export(smollm2_path, adapter, "lora-gguf", tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []


def test_adapter_for_another_shape_or_vocabulary_refused(smollm2_path, llama2_like, tmp_path):
    """A LLaMA-2-shaped adapter on SmolLM2: refused by its recorded vocabulary, and, as a plain PEFT
    adapter without our metadata, by its tensor shapes."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lora_core.export import export

    _, other = llama2_like
    with pytest.raises(ValueError, match="32000-token vocabulary"):
        export(smollm2_path, other, "gguf", tmp_path / "m.gguf")
    plain = tmp_path / "plain"
    shutil.copytree(other, plain)
    save_file(load_file(str(plain / "adapter_model.safetensors")), str(plain / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="trained on another base"):
        export(smollm2_path, plain, "hf", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]
