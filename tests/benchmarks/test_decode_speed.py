"""Decode speed, SmolLM2-135M, 128 new tokens (greedy, EOS ignored), in one run: our fp32 / int8 / int4 bases and
int8 with a LoRA adapter merged (--merge), each eager and compiled (--compile, lora_core.fast_decode), batch 1,
and int8 at batch 8; int8 eager runs our C decode step (lora_core.native_decode), measured again with the torch
step it replaces; against llama.cpp (llama-cpp-python) on the shipped Q4_1 GGUF and on Q8_0 and F16 GGUFs our
exporter writes from the same base. Columns: prefill tok/s (38-token prompt), decode tok/s (batch 8: all rows'
tokens), first-token latency (prompt in -> first token out), compile s (paid once per process and shape).
Medians of 3 runs after a warm-up. A second benchmark: --input-file's batches, batch 8 against batch 1."""
import statistics
import time

import pytest

from lora_core.data import ALPACA

pytestmark = pytest.mark.benchmark
NEW_TOKENS, RUNS, BATCH = 128, 3, 8
PROMPT = ALPACA.prompt("Write a long story about a camel who crosses the desert.")


def random_adapter(smollm2_path, out):
    """A rank-8 adapter on all seven projections with random A and B (a trained one's size and cost)."""
    import lora_core
    from lora_core.adapter import save_adapter
    from lora_core.lora import apply_lora

    from helpers import randomize_lora

    model, _ = lora_core.load(smollm2_path, dtype="fp32")
    apply_lora(model, "all", r=8, alpha=16)
    randomize_lora(model, std=0.02, a_too=True)
    return save_adapter(model, out, str(smollm2_path))


def ours(model, tok, compile: bool, batch: int = 1):
    """(prefill tok/s, decode tok/s, first-token ms, compile s) of generate() / generate_batch()."""
    from lora_core.batch_generation import generate_batch
    from lora_core.generation import generate
    from lora_core.sampling import Sampling

    ids = tok.encode(PROMPT)
    greedy = Sampling(0, 0, 1.0, 1.0)

    def run(n):
        if batch == 1:
            return generate(model, tok, ids, greedy, n, ignore_eos=True, compile=compile)
        return generate_batch(model, tok, [ids] * batch, greedy, n, ignore_eos=True, compile=compile)[0]

    warm = run(8)  # compiles here when asked to
    runs = [run(NEW_TOKENS) for _ in range(RUNS)]
    if compile and not warm.compiled:
        return None
    return (statistics.median(batch * len(ids) / g.prefill_s for g in runs),
            statistics.median(batch * g.decode_steps / g.decode_s for g in runs),
            statistics.median(1000 * g.prefill_s for g in runs), warm.compile_s)


def llama_cpp_speed(path, quantized: bool, ids):
    from llama_cpp import Llama

    extra = {"use_extra_bufts": False} if quantized else {}  # AMX weight buffers crash on quantized GGUFs here
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, **extra)
    prefill, decode, first = [], [], []
    for _ in range(RUNS + 1):
        llm.reset()
        t0 = time.perf_counter()
        stamps = []
        for _tok in llm.generate(ids, temp=0.0, repeat_penalty=1.0):
            stamps.append(time.perf_counter())
            if len(stamps) == NEW_TOKENS:
                break
        prefill.append(len(ids) / (stamps[0] - t0))  # prompt evaluation + first token
        first.append(1000 * (stamps[0] - t0))
        decode.append((NEW_TOKENS - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(prefill[1:]), statistics.median(decode[1:]), statistics.median(first[1:]), 0.0


def test_decode_speed_vs_llama_cpp(smollm2_path, tmp_path, monkeypatch):
    import lora_core
    from lora_core import native_decode
    from lora_core.export import export
    from lora_core.kernels import cpu_info

    _, tok = lora_core.load(smollm2_path, dtype="fp32")
    ids = tok.encode(PROMPT)
    adapter = random_adapter(smollm2_path, tmp_path / "adapter")
    configs = [("fp32", {"dtype": "fp32"}, 1), ("int8", {"dtype": "int8"}, 1), ("int4", {"dtype": "int4"}, 1),
               ("int8 + adapter, --merge", {"dtype": "int8", "adapter": adapter, "merge": True}, 1),
               (f"int8, batch {BATCH}", {"dtype": "int8"}, BATCH)]
    rows = {}
    for name, kw, batch in configs:
        model, _ = lora_core.load(smollm2_path, **kw)
        for compile in (False, True):
            r = ours(model, tok, compile, batch)
            rows[f"ours {name}, {'compiled' if compile else 'eager'}"] = r
        if kw["dtype"] == "int8":  # eager above ran our C step (lora_core.native_decode): its baseline, the torch step
            monkeypatch.setenv(native_decode.ENV, "0")
            rows[f"ours {name}, eager, torch step"] = ours(model, tok, False, batch)
            monkeypatch.delenv(native_decode.ENV)
        del model
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("\nllama-cpp-python is not installed: no llama.cpp rows")
    else:
        files = {"Q4_1 (shipped)": (smollm2_path, True),
                 "Q8_0 (our export)": (export(smollm2_path, None, "gguf", tmp_path / "q8.gguf", "q8_0"), True),
                 "F16 (our export)": (export(smollm2_path, None, "gguf", tmp_path / "f16.gguf", "f16"), False)}
        rows.update({f"llama.cpp {k}": llama_cpp_speed(p, q, ids) for k, (p, q) in files.items()})
    base = "llama.cpp Q8_0 (our export)" if "llama.cpp Q8_0 (our export)" in rows else "ours int8, eager"
    print(f"\nSmolLM2-135M, {NEW_TOKENS} new tokens, {len(ids)}-token prompt, 2 threads; median of {RUNS}; "
          f"{cpu_info.describe()}")
    print(f"{'':48} {'prefill tok/s':>14} {'decode tok/s':>13} {'first token ms':>15} {'compile s':>10} "
          f"{'decode / ' + base.split(' (')[0]:>24}")
    for name, r in rows.items():
        if r is None:
            print(f"{name:48} torch.compile failed here: see stderr")
            continue
        prefill, decode, first, compile_s = r
        print(f"{name:48} {prefill:14.1f} {decode:13.1f} {first:15.1f} {compile_s:10.1f} "
              f"{decode / rows[base][1]:24.2f}")
    assert all(r[1] > 0 for r in rows.values() if r is not None)


QUESTIONS = ["Name three colours.", "Why is the sky blue?", "What is 2 + 2?", "Write a haiku about rain.",
             "Who wrote Hamlet?", "Give me five fruits and their colours.", "Translate 'hello' into French.",
             "Explain photosynthesis in one sentence."]
BATCH_TOKENS = 64


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_batched_answers(smollm2_path, dtype):
    """generate.py --input-file: 8 alpaca prompts answered one at a time and as one left-padded batch (prefill
    included, EOS ignored so both make 8 x 64 tokens); tokens/s and the ratio, same run, medians of 3."""
    import lora_core
    from lora_core.batch_generation import generate_batch
    from lora_core.generation import generate
    from lora_core.kernels import cpu_info
    from lora_core.sampling import Sampling

    model, tok = lora_core.load(smollm2_path, dtype=dtype)
    prompts = [tok.encode(ALPACA.prompt(q)) for q in QUESTIONS]
    greedy = Sampling(0, 0, 1.0, 1.0)
    generate_batch(model, tok, prompts, greedy, 4, ignore_eos=True)  # warm-up

    def one_by_one():
        for p in prompts:
            generate(model, tok, p, greedy, BATCH_TOKENS, ignore_eos=True)

    def batched():
        generate_batch(model, tok, prompts, greedy, BATCH_TOKENS, ignore_eos=True)

    def median_s(fn):
        times = []
        for _ in range(RUNS):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    t1, t8 = median_s(one_by_one), median_s(batched)
    n = len(prompts) * BATCH_TOKENS
    print(f"\n{dtype}: {len(prompts)} prompts x {BATCH_TOKENS} new tokens, median of {RUNS}; {cpu_info.describe()}")
    print(f"batch 1: {n / t1:7.1f} tok/s   batch 8: {n / t8:7.1f} tok/s   batch 8 / batch 1: {t1 / t8:.2f}x")
    assert t1 > 0 and t8 > 0
