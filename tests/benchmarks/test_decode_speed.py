"""Decode speed, batch 1, SmolLM2-135M, 128 new tokens (greedy, EOS ignored): our fp32 / bf16 / int8
bases, and int8 with a LoRA adapter unmerged and merged (--merge), against llama.cpp (llama-cpp-python) in
the same run, on the shipped Q4_1 GGUF and on Q8_0 and F16 GGUFs our exporter writes from the same base.
Medians of 3 runs; prefill of a 38-token prompt too. A second benchmark: --input-file's batches, batch 8
against batch 1 in the same run."""
import statistics
import time

import pytest

from lora_core.data import ALPACA

pytestmark = pytest.mark.benchmark
NEW_TOKENS, RUNS = 128, 3
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


def ours(smollm2_path, dtype, adapter=None, merge=False):
    import lora_core
    from lora_core.generation import generate
    from lora_core.sampling import Sampling

    model, tok = lora_core.load(smollm2_path, dtype=dtype, adapter=adapter, merge=merge)
    ids = tok.encode(PROMPT)
    generate(model, tok, ids, Sampling(0, 0, 1.0, 1.0), 8, ignore_eos=True)  # warm-up
    runs = [generate(model, tok, ids, Sampling(0, 0, 1.0, 1.0), NEW_TOKENS, ignore_eos=True) for _ in range(RUNS)]
    return (statistics.median(len(ids) / g.prefill_s for g in runs), statistics.median(g.decode_tok_s for g in runs))


def llama_cpp_speed(path, quantized: bool, ids):
    from llama_cpp import Llama

    extra = {"use_extra_bufts": False} if quantized else {}  # AMX weight buffers crash on quantized GGUFs here
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, **extra)
    prefill, decode = [], []
    for _ in range(RUNS + 1):
        llm.reset()
        t0 = time.perf_counter()
        stamps = []
        for _tok in llm.generate(ids, temp=0.0, repeat_penalty=1.0):
            stamps.append(time.perf_counter())
            if len(stamps) == NEW_TOKENS:
                break
        prefill.append(len(ids) / (stamps[0] - t0))  # prompt evaluation + first token
        decode.append((NEW_TOKENS - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(prefill[1:]), statistics.median(decode[1:])


def test_decode_speed_vs_llama_cpp(smollm2_path, tmp_path):
    import lora_core
    from lora_core.export import export
    from lora_core.kernels import cpu_info

    _, tok = lora_core.load(smollm2_path, dtype="fp32")
    ids = tok.encode(PROMPT)
    rows = {f"ours {d}": ours(smollm2_path, d) for d in ("fp32", "bf16", "int8")}
    adapter = random_adapter(smollm2_path, tmp_path / "adapter")
    rows["ours int8 + adapter"] = ours(smollm2_path, "int8", adapter)
    rows["ours int8 + adapter, --merge"] = ours(smollm2_path, "int8", adapter, merge=True)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        llama = {}
        print("\nllama-cpp-python is not installed: no llama.cpp rows")
    else:
        files = {"Q4_1 (shipped)": (smollm2_path, True),
                 "Q8_0 (our export)": (export(smollm2_path, None, "gguf", tmp_path / "q8.gguf", "q8_0"), True),
                 "F16 (our export)": (export(smollm2_path, None, "gguf", tmp_path / "f16.gguf", "f16"), False)}
        llama = {f"llama.cpp {k}": llama_cpp_speed(p, q, ids) for k, (p, q) in files.items()}
    rows.update(llama)
    int8 = rows["ours int8"][1]
    print(f"\ndecode, batch 1, {NEW_TOKENS} new tokens, {len(ids)}-token prompt, 2 threads; median of {RUNS}; "
          f"{cpu_info.describe()}")
    print(f"{'':28} {'prefill tok/s':>14} {'decode tok/s':>13} {'ours int8 / this':>17}")
    for name, (prefill, decode) in rows.items():
        print(f"{name:28} {prefill:14.1f} {decode:13.1f} {int8 / decode:17.2f}")
    assert all(decode > 0 for _, decode in rows.values())


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
