"""lora-train (python train.py): instruction-tune a LoRA adapter on a LLaMA-family base.

    python train.py --data examples/instructions.json
    torchrun --nproc_per_node 2 train.py --data data.json      # data parallel

Every flag is a TrainConfig field (lora_core/train_config.py): its help text and choices live there.
"""
from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from lora_core.train_config import TrainConfig
from lora_core.train_state import resume_hint


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description="Train a LoRA adapter (alpaca-lora's defaults).")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        meta, kind = f.metadata, hints[f.name]
        names = ["--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        default = f.default if f.default is not MISSING else f.default_factory()
        kw = {"dest": f.name, "help": meta["help"].replace("%", "%%")}
        if kind is bool:
            p.add_argument(*names, action="store_true", **kw)
            continue
        optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
        base = next(a for a in typing.get_args(kind) if a is not type(None)) if optional else kind
        if typing.get_origin(base) is list:
            kw.update(nargs="+", required=meta.get("required", False))
            if not kw["required"]:
                kw["default"] = default
        else:
            kw.update(type=base, default=default)
            for key in ("choices", "nargs", "const"):
                if key in meta:
                    kw[key] = meta[key]
        p.add_argument(*names, **kw)
    return p


def parse_args(argv=None) -> TrainConfig:
    return TrainConfig(**vars(parser().parse_args(argv)))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    from lora_core.trainer import train

    try:
        train(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, OSError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        ckpt_dir = Path(cfg.resume) if cfg.resume else Path(cfg.output) / "checkpoints"
        print(f"\ntrain.py: interrupted; {resume_hint(ckpt_dir)}", file=sys.stderr)
        return 130
    return 0
