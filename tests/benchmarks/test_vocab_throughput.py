"""Training throughput per Chinese character, SmolLM2's own vocabulary against it extended with Chinese tokens
mined from alpaca_zh_demo.json (python -m lora_core.vocab --mine): the same 48 records, one epoch of 6 steps
(batch 8, micro-batch 4, cutoff 1024: nothing truncated), the default int8 base, each run a fresh train.py
process, the two alternated and repeated in the same pytest run. The extended run also trains embed_tokens and
lm_head in full (modules_to_save), as --extend-vocab does. Step 1 (warm-up) is left out of the figures.

    pytest -m benchmark -s tests/benchmarks/test_vocab_throughput.py
"""
import json
import statistics
import subprocess
import sys

import pytest

from lora_core.kernels import cpu_info
from lora_core.vocab import is_cjk

from helpers import DATA, ROOT, need_shared

pytestmark = pytest.mark.benchmark
RECORDS, STEPS, REPEATS = 48, 6, 2


def train(data, out, *extra) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", data, "--output", out, "--batch-size", "8",
           "--micro-batch-size", "4", "--epochs", "1", "--cutoff-len", "1024", "--val-size", "0", "--warmup-steps", "1",
           "--force", *map(str, extra)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in rows if "tokens_per_s" in x]
    assert len(steps) == STEPS and "0 truncated" in r.stdout + r.stderr
    return {"seconds": sum(x["seconds"] for x in steps[1:]), "tokens": sum(x["tokens"] for x in steps[1:]),
            "per_step": statistics.median(x["seconds"] for x in steps[1:])}


def test_throughput_per_chinese_character(tmp_path):
    rows = json.loads(need_shared(DATA / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    short = [r for r in rows if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 300][:RECORDS]
    data = tmp_path / "zh48.json"
    data.write_text(json.dumps(short, ensure_ascii=False), encoding="utf-8")
    vocab = tmp_path / "zh-vocab"
    from lora_core.vocab.cli import main

    assert main(["--mine", str(DATA / "alpaca_zh_demo.json"), "--out", str(vocab)]) == 0
    chars = sum(is_cjk(c) for r in short for k in ("instruction", "input", "output") for c in r[k])
    chars_timed = chars * (STEPS - 1) / STEPS  # one epoch in 6 equal steps of 8 records; step 1 left out (about)
    runs = {"SmolLM2 vocabulary": [], "extended (--extend-vocab)": []}
    for i in range(REPEATS):
        runs["SmolLM2 vocabulary"].append(train(data, tmp_path / f"before{i}"))
        runs["extended (--extend-vocab)"].append(train(data, tmp_path / f"after{i}", "--extend-vocab", vocab))
    print(f"\nSmolLM2-135M int8, LoRA r=8 q,v, {RECORDS} alpaca_zh records ({chars} Chinese characters), {STEPS} steps "
          f"of 8, median of {REPEATS} runs each; {cpu_info.describe()}")
    print(f"{'vocabulary':<28}{'tokens/step':>12}{'s/step':>8}{'tokens/s':>10}{'zh chars/s':>12}{'x before':>10}")
    base = None
    for name, ms in runs.items():
        seconds = statistics.median(m["seconds"] for m in ms)
        tokens = ms[0]["tokens"] / (STEPS - 1)
        rate = chars_timed / seconds
        base = base or rate
        print(f"{name:<28}{tokens:>12.0f}{statistics.median(m['per_step'] for m in ms):>8.2f}"
              f"{ms[0]['tokens'] / seconds:>10.0f}{rate:>12.1f}{rate / base:>10.2f}")
