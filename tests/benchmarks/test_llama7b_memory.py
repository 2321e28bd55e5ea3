"""LLaMA-7B-shaped model, int8 base + LoRA r=8 on all linear layers: one 256-token micro-batch,
forward + backward, peak RSS and seconds, with and without activation recomputation.

Random weights are made in memory one tensor at a time and quantized as they "load" (the real loader
and hook), so no 7B file is needed and a full-precision copy never exists. Each run is a fresh process.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.benchmark
CHILD = Path(__file__).with_name("llama7b_int8_child.py")


def test_llama7b_int8_lora_micro_batch():
    print("\nLLaMA-7B shape (32 x 4096, FFN 11008, vocab 32000), int8 base, LoRA r=8 on all 7 projections, "
          "256 tokens")
    print(f"{'activations':<24}{'after load GiB':>15}{'peak GiB':>10}{'forward s':>11}{'backward s':>12}"
          f"{'LoRA params':>13}")
    for mode in ("kept", "checkpointing"):
        r = subprocess.run([sys.executable, str(CHILD), "256", mode], capture_output=True, text=True, check=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{mode:<24}{m['after_load']:>15.2f}{m['peak']:>10.2f}{m['forward_s']:>11.1f}{m['backward_s']:>12.1f}"
              f"{m['lora_params']:>13,}")
