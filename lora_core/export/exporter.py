"""export(): merge an adapter into its base and write gguf / meta / hf, to a temporary name renamed only
when complete (and verified, with verify=True)."""
from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..api import load
from ..device import model_device
from ..loader import resolve_base
from ..weights import open_weights
from .gguf import write_gguf, write_lora_gguf
from .hf import write_hf
from .merge import plan_merge
from .meta import write_meta

FORMATS = ("gguf", "meta", "hf", "lora-gguf")
DTYPES = {"gguf": ("f32", "f16", "bf16", "q8_0"), "meta": ("f32", "f16", "bf16"), "hf": ("f32", "f16", "bf16"),
          "lora-gguf": ("f32", "f16")}
BYTES_PER_WEIGHT = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32}
# --verify: largest next-token logit difference accepted against base + adapter unmerged in fp32, as a
# fraction of the largest |logit|; SmolLM2 measured 3.9e-6, 1.4e-3, 1.1e-2 and 3.5e-2 for these types
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "bf16": 3e-2, "q8_0": 8e-2}
VERIFY_PROMPTS = ("The capital of France is", "你好，请介绍一下你自己。",
                  "### Instruction:\nWho are you?\n\n### Response:\n")


def _remove(path: Path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Temporary outputs (.NAME.tmp-PID) that exports killed before they could clean up left beside `out`."""
    removed = []
    for tmp in out.parent.glob(f".{out.stem}.tmp-*{out.suffix}"):
        pid = tmp.name.removeprefix(f".{out.stem}.tmp-").removesuffix(out.suffix)
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(tmp)
            removed.append(tmp)
    return removed


def _check_output(out: Path, sources: list[Path]):
    """Refuse an output that is, contains or lies inside what the export reads (the base, the adapter)."""
    target = out.resolve()
    for src in sources:
        src = src.resolve()
        if target == src or src.is_relative_to(target) or (src.is_dir() and target.is_relative_to(src)):
            raise ValueError(f"{out}: this output would overwrite {src}, which the export reads; choose an --out "
                             "outside the base and the adapter")
    parent = out.parent if out.parent.exists() else next(p for p in out.parents if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{parent}: not writable (permission denied); choose another --out")


def export(base, adapter, fmt: str, out, dtype: str | None = None, force: bool = False, verify: bool = False,
           max_shard_bytes: int = 5 << 30, device: str | torch.device = "cpu") -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose {', '.join(FORMATS)}")
    dtype = dtype or {"gguf": "f16", "lora-gguf": "f32"}.get(fmt, "bf16")
    if dtype not in DTYPES[fmt]:
        raise ValueError(f"--dtype {dtype} is not available for --format {fmt}: choose {', '.join(DTYPES[fmt])}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists; pass --force to overwrite it or choose another --out")
    if fmt == "lora-gguf" and adapter is None:
        raise ValueError("--format lora-gguf writes an adapter: give --adapter")
    if fmt in ("gguf", "lora-gguf") and out.suffix != ".gguf":
        raise ValueError(f"{out}: a GGUF export is one file; name it *.gguf")
    base_path = resolve_base(base)
    _check_output(out, [base_path] + ([Path(adapter)] if adapter is not None else []))
    ckpt = open_weights(base_path)
    plan = plan_merge(ckpt, adapter)
    tok = plan.tokenizer
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in remove_stale_temporaries(out):
        print(f"removed {old}, left by an export that was killed", file=sys.stderr)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    if fmt == "lora-gguf":
        return _export_lora(plan, out, tmp, dtype)
    if fmt == "meta":
        plan.untie()  # Meta checkpoints always carry output.weight
    copies = 2 if fmt == "meta" else 1  # meta: the raw stream, then consolidated.00.pth
    need = sum(torch.Size(s).numel() for s in plan.shapes.values()) * BYTES_PER_WEIGHT[dtype] * copies
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise OSError(f"{out.parent}: no room on disk: the export needs about {need / 2**30:.2f} GiB, "
                      f"{free / 2**30:.2f} GiB is free; free some space or choose another --out")
    bar = tqdm(total=len(plan.shapes), desc=f"exporting {fmt} {dtype}", unit="tensor", file=sys.stderr)
    try:
        if fmt == "gguf":
            write_gguf(plan, tok, tmp, dtype, name=out.stem, progress=lambda _: bar.update())
        else:
            tmp.mkdir()
            if fmt == "hf":
                write_hf(plan, tok, tmp, dtype, max_shard_bytes, progress=lambda _: bar.update())
            else:
                write_meta(plan, tok, tmp, dtype, progress=lambda _: bar.update())
        bar.close()
        if verify:
            verify_export(base, adapter, tmp, dtype, device)
        _remove(out)
        os.replace(tmp, out)
    except OSError as e:
        bar.close()
        _remove(tmp)
        if e.errno == errno.ENOSPC:
            raise OSError(f"{out.parent}: the disk filled up while exporting; nothing was written. Free some "
                          "space and run again") from e
        raise
    except BaseException:
        bar.close()
        _remove(tmp)
        raise
    return out


def _export_lora(plan, out: Path, tmp: Path, dtype: str) -> Path:
    try:
        write_lora_gguf(plan, tmp, dtype)
        _remove(out)
        os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    return out


@torch.inference_mode()
def verify_export(base, adapter, written: Path, dtype: str, device: str | torch.device = "cpu") -> float:
    """Next-token logits of the written model against base + adapter unmerged (fp32); raise above tolerance."""
    reference, tok = load(base, dtype="fp32", adapter=adapter, device=device)
    exported, _ = load(written, dtype="fp32", device=device)
    worst, scale = 0.0, 0.0
    for prompt in VERIFY_PROMPTS:
        x = torch.tensor([tok.encode(prompt)], device=model_device(reference))
        want, got = reference(x)[0, -1], exported(x)[0, -1]
        worst, scale = max(worst, (want - got).abs().max().item()), max(scale, want.abs().max().item())
    limit = TOLERANCE[dtype] * scale
    print(f"verify: max |logit difference| over {len(VERIFY_PROMPTS)} prompts = {worst:.2e} (largest |logit| "
          f"{scale:.1f}; {dtype} tolerance {limit:.2e})", file=sys.stderr)
    if not worst <= limit:
        raise ValueError(f"verification failed: the {dtype} export differs from base + adapter by {worst:.3g} "
                         f"in next-token logits (tolerance {limit:.3g}); nothing was written")
    return worst
