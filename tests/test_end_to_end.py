"""End to end on real weights and data: train SmolLM2 on the Luotuo identity set, then ask its name."""
import subprocess
import sys

import pytest
import torch

from lora_core.data import ALPACA

from helpers import DATA, ROOT, need_shared


def greedy(model, tok, prompt, n=32):
    ids = tok.encode(ALPACA.prompt(prompt))
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(x)[:, -1:].argmax(-1)
            if nxt.item() == tok.eos_id:
                break
            x = torch.cat([x, nxt], 1)
    return tok.decode(x[0, len(ids):].tolist())


@pytest.mark.slow
def test_luotuo_identity(tmp_path, smollm2_path):
    """About 16 minutes on 2 cores (16 min 17 s measured; 27 with other work running): 120 steps of 8 examples."""
    import lora_core

    data = need_shared(DATA / "luotuo_developer_instruction.json")
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--output", str(tmp_path / "luotuo"),
           "--batch-size", "8", "--epochs", "20", "--lr", "2e-3", "--warmup-steps", "5", "--targets", "all",
           "--val-size", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    base, tok = lora_core.load(smollm2_path, dtype="int8")
    tuned, _ = lora_core.load(smollm2_path, dtype="int8", adapter=tmp_path / "luotuo")
    question = "你的名字是什么？"
    before, after = greedy(base, tok, question), greedy(tuned, tok, question)
    print(f"\nbase: {before!r}\ntuned: {after!r}")
    assert "骆驼" not in before
    assert "骆驼" in after
