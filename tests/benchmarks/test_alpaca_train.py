"""The workload users run: alpaca-format data with the prompt masked, alpaca-lora's batch 128 / micro-batch 4,
LoRA r=8 on q,v or on all seven projections, cutoff 256 or 512; our train.py against alpaca-lora's recipe on
HF transformers' Trainer + PEFT (a float base: bitsandbytes' int8 needs a GPU), on the same 256 records of
../shared/data/alpaca_{zh,en}_demo.json, two optimizer steps each, every run in a fresh process, in the same
pytest run. Reports seconds per step, real (non-pad) tokens/s, peak RSS and the training loss of each.

    pytest -m benchmark -s tests/benchmarks/test_alpaca_train.py              # all 8 configurations
    pytest -m benchmark -s tests/benchmarks/test_alpaca_train.py -k "zh and 256"
"""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from lora_core.kernels import cpu_info

from helpers import DATA, need_shared

pytestmark = pytest.mark.benchmark
HERE = Path(__file__).parent
STEPS = "2"
BUDGET = "512"  # padded tokens per forward pass: an eighth of alpaca-lora's 4 x 512 ceiling, a quarter of 4 x 256
ALL = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def run(child, *args):
    r = subprocess.run([sys.executable, str(HERE / child), *args], capture_output=True, text=True)
    if r.returncode:
        return None, (r.stderr.strip().splitlines() or ["no output"])[-1][:100]
    return json.loads(r.stdout.strip().splitlines()[-1]), ""


@pytest.mark.parametrize("targets", ["q_proj,v_proj", ALL], ids=["qv", "all"])
@pytest.mark.parametrize("cutoff", ["256", "512"])
@pytest.mark.parametrize("data", ["zh", "en"])
def test_alpaca_steps_against_hf_peft(data, cutoff, targets):
    pytest.importorskip("peft")
    path = str(need_shared(DATA / f"alpaca_{data}_demo.json"))
    rows = [("HF Trainer + PEFT", "fp32", *run("alpaca_hf_child.py", path, cutoff, targets, STEPS)),
            ("lora-core", "int8", *run("alpaca_ours_child.py", path, cutoff, targets, STEPS, "int8")),
            ("lora-core", "fp32", *run("alpaca_ours_child.py", path, cutoff, targets, STEPS, "fp32")),
            (f"lora-core --micro-batch-tokens {BUDGET}", "int8",
             *run("alpaca_ours_child.py", path, cutoff, targets, STEPS, "int8", "--micro-batch-tokens", BUDGET)),
            (f"lora-core --micro-batch-tokens {BUDGET}", "fp32",
             *run("alpaca_ours_child.py", path, cutoff, targets, STEPS, "fp32", "--micro-batch-tokens", BUDGET))]
    print(f"\nalpaca_{data}_demo.json, cutoff {cutoff}, LoRA r=8 on {'q,v' if targets != ALL else 'all 7'}, "
          f"batch 128 / micro-batch 4, {STEPS} steps; {cpu_info.describe()}")
    print(f"{'impl':<36}{'base':<6}{'s/step':>8}{'real tok/s':>12}{'peak GiB':>10}{'x HF tok/s':>12}{'x HF RSS':>10}"
          f"{'losses':>18}")
    ref = rows[0][2]
    for impl, dtype, m, err in rows:
        if m is None:
            print(f"{impl:<36}{dtype:<6}  failed: {err}")
            continue
        tok_s = sum(m["tokens"]) / sum(m["seconds"])
        ratio = (f"{tok_s / (sum(ref['tokens']) / sum(ref['seconds'])):>12.2f}{m['peak_gib'] / ref['peak_gib']:>10.2f}"
                 if ref else f"{'':>22}")
        losses = " ".join(f"{v:.3f}" for v in m["losses"])
        print(f"{impl:<36}{dtype:<6}{statistics.median(m['seconds']):>8.1f}{tok_s:>12.0f}{m['peak_gib']:>10.2f}"
              f"{ratio}{losses:>18}")
    if ref:
        print("HF Trainer's own logged losses:", " ".join(f"{v:.3f}" for v in ref["logged_losses"]),
              "(the column above is summed over the step's target tokens / their count, as ours)")
    assert all(m is not None for _, _, m, _ in rows), [err for *_, err in rows if err]
