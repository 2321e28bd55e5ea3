"""One optimizer step on SmolLM2-135M (micro-batch 4 x 256 tokens, LoRA r=8 on q,v and on all linear
layers): our trainer's forward/backward with fp32, bf16 and int8 bases, and HF transformers + PEFT on
the same model and batch, measured in the same run (fresh process each; median of 3 timed steps).
"+ckpt" rows recompute each block in backward (activation recomputation, --recompute). The columns are the alpaca
benchmark's (test_alpaca_train.py): seconds per step, real tokens/s (random tokens, no padding: every token is
real), peak RSS, both as ratios to HF fp32, and the loss of the last step."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_core.kernels import cpu_info

pytestmark = pytest.mark.benchmark
CHILD = Path(__file__).with_name("train_step_child.py")


def run(impl, dtype, targets, *extra):
    r = subprocess.run([sys.executable, str(CHILD), impl, dtype, targets, *extra], capture_output=True, text=True)
    if r.returncode:
        return None, r.stderr.strip().splitlines()[-1][:80]
    return json.loads(r.stdout.strip().splitlines()[-1]), ""


def test_train_step_against_hf_peft():
    pytest.importorskip("peft")
    print(f"\nSmolLM2-135M, one optimizer step, micro-batch 4 x 256 tokens, LoRA r=8; {cpu_info.describe()}")
    print(f"{'targets':<10}{'impl':<18}{'base':<6}{'s/step':>8}{'real tok/s':>12}{'peak GiB':>10}{'x HF tok/s':>12}"
          f"{'x HF RSS':>10}{'loss':>8}")
    all_seven = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    for targets, label in (("q_proj,v_proj", "q,v"), (all_seven, "all")):
        ref, _ = run("hf", "fp32", targets)
        rows = [("HF+PEFT", "fp32", ref, "")] + [("HF+PEFT", "bf16", *run("hf", "bf16", targets))]
        rows += [("lora-core", d, *run("ours", d, targets)) for d in ("fp32", "bf16", "int8")]
        rows += [("lora-core +ckpt", d, *run("ours", d, targets, "checkpointing")) for d in ("fp32", "int8")]
        for impl, dtype, m, err in rows:
            if m is None:
                print(f"{label:<10}{impl:<18}{dtype:<6}  failed: {err}")
                continue
            ratio = (f"{m['tokens_per_s'] / ref['tokens_per_s']:>12.2f}{m['peak_gib'] / ref['peak_gib']:>10.2f}"
                     if ref else f"{'':>22}")
            print(f"{label:<10}{impl:<18}{dtype:<6}{m['seconds']:>8.2f}{m['tokens_per_s']:>12.0f}{m['peak_gib']:>10.2f}"
                  f"{ratio}{m['loss']:>8.3f}")
