"""export.py: merge a LoRA adapter into its base and write weights llama.cpp (and transformers) run.

    python export.py --adapter lora-out --format gguf --out smollm2-lora.gguf --verify
    python export.py --adapter lora-out --format hf --out merged-hf
    python export.py --adapter lora-out --format meta --out merged-meta
    python export.py --adapter lora-out --format lora-gguf --out adapter.gguf
    # then: llama-cli -m base.gguf --lora adapter.gguf
"""
from __future__ import annotations

import argparse
import sys

from lora_core.api import base_of
from lora_core.export import export


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Merge a LoRA adapter into its base and export the result.")
    p.add_argument("--base", default=None, help="model dir, .gguf or smollm2-135m (default: the adapter's own base)")
    p.add_argument("--adapter", default=None,
                   help="PEFT-format LoRA adapter directory (omit to convert the base alone)")
    p.add_argument("--format", required=True, choices=["gguf", "meta", "hf", "lora-gguf"],
                   help="merged gguf / meta / hf, or lora-gguf: the adapter alone for llama.cpp's --lora")
    p.add_argument("--out", required=True, help="output .gguf file (gguf) or directory (meta, hf)")
    p.add_argument("--dtype", default=None, choices=["f32", "f16", "bf16", "q8_0"],
                   help="weight type (default f16 for gguf, bf16 for meta/hf; q8_0 is gguf only)")
    p.add_argument("--verify", action="store_true", help="reload the export and compare logits with base + adapter")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="hf: GiB per safetensors shard")
    p.add_argument("--device", default="auto", help="where --verify runs the two models: auto, cpu, cuda")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        if not a.max_shard_size > 0:
            raise ValueError(f"--max-shard-size {a.max_shard_size}: must be a positive number of GiB")
        base = base_of(a.base, a.adapter)
        out = export(base, a.adapter, a.format, a.out, a.dtype, a.force, a.verify, int(a.max_shard_size * 2**30),
                     device=a.device)
    except (ValueError, OSError) as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nexport.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
