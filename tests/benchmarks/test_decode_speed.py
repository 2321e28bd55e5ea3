"""Decode speed, batch 1, SmolLM2-135M, 128 new tokens (greedy, EOS ignored): our fp32 / bf16 / int8
bases against llama.cpp (llama-cpp-python) in the same run, on the shipped Q4_1 GGUF and on Q8_0 and
F16 GGUFs our exporter writes from the same base. Medians of 3 runs; prefill of a 38-token prompt too."""
import statistics
import time

import pytest

from lora_core.data import ALPACA

pytestmark = pytest.mark.benchmark
NEW_TOKENS, RUNS = 128, 3
PROMPT = ALPACA.prompt("Write a long story about a camel who crosses the desert.")


def ours(smollm2_path, dtype):
    import lora_core
    from lora_core.generation import generate
    from lora_core.sampling import Sampling

    model, tok = lora_core.load(smollm2_path, dtype=dtype)
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

    _, tok = lora_core.load(smollm2_path, dtype="fp32")
    ids = tok.encode(PROMPT)
    rows = {f"ours {d}": ours(smollm2_path, d) for d in ("fp32", "bf16", "int8")}
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
    print(f"\ndecode, batch 1, {NEW_TOKENS} new tokens, {len(ids)}-token prompt, 2 threads; median of {RUNS}")
    print(f"{'':28} {'prefill tok/s':>14} {'decode tok/s':>13} {'ours int8 / this':>17}")
    for name, (prefill, decode) in rows.items():
        print(f"{name:28} {prefill:14.1f} {decode:13.1f} {int8 / decode:17.2f}")
    assert all(decode > 0 for _, decode in rows.values())
