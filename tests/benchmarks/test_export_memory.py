"""Peak RSS of exporting SmolLM2-135M with a LoRA adapter on all projections, per format, each in a
fresh process. The merge is streamed, so growth should stay near a few tensors (the largest, the fp32
49152 x 576 embedding, is 108 MiB) rather than the model (513 MiB in fp32)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.benchmark
CHILD = Path(__file__).with_name("export_rss_child.py")


def test_export_peak_rss(smollm2_path, tmp_path):
    import lora_core
    from lora_core.adapter import save_adapter
    from lora_core.loader import base_fingerprint
    from lora_core.lora import apply_lora, lora_layers

    model, _ = lora_core.load(smollm2_path, dtype="fp32")
    extras = {"base": str(smollm2_path), "fingerprint": base_fingerprint(model), "vocab_size": model.args.vocab_size}
    apply_lora(model, "all", r=8, alpha=16)
    for m in lora_layers(model).values():
        m.lora_B.data.normal_(0, 0.01)
    save_adapter(model, tmp_path / "adapter", str(smollm2_path), extras)
    del model
    print("\nexport of SmolLM2-135M + LoRA r=8 on all projections; VmHWM in a fresh process per row")
    print(f"{'format':<6}{'dtype':<6}{'after imports MiB':>18}{'peak MiB':>10}{'growth MiB':>11}{'anon MiB at end':>16}"
          f"{'seconds':>9}{'output MiB':>11}")
    for fmt, dtype, name in (("gguf", "f16", "m.gguf"), ("gguf", "q8_0", "q.gguf"), ("hf", "bf16", "hf"),
                             ("meta", "bf16", "meta"), ("gguf", "f32", "f.gguf")):
        out = tmp_path / name
        r = subprocess.run([sys.executable, str(CHILD), str(smollm2_path), str(tmp_path / "adapter"), fmt, dtype,
                            str(out)], capture_output=True, text=True, cwd=CHILD.parent)
        assert r.returncode == 0, r.stderr[-1000:]
        m = json.loads(r.stdout.strip().splitlines()[-1])
        size = sum(f.stat().st_size for f in ([out] if out.is_file() else out.iterdir())) / 2**20
        print(f"{fmt:<6}{dtype:<6}{m['before']:>18.0f}{m['after']:>10.0f}{m['after'] - m['before']:>11.0f}"
              f"{m['anon']:>16.0f}{m['seconds']:>9.1f}{size:>11.0f}")
        assert torch.tensor(m["after"]) > 0
