"""What this CPU can do (torch's own ISA probes), what it is called, and where per-machine files go."""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

# the flags that decide int8 paths, and how they are shown in messages and benchmark headers
SHOWN_FLAGS = {"avx2": "AVX2", "fma3": "FMA", "avx512_f": "AVX-512", "avx512_vnni": "AVX-512 VNNI",
               "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX-512 BF16", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16"}


MASK_ENV = "LORA_CORE_CPU_FLAGS_OFF"  # e.g. "avx512_vnni,avx_vnni,amx_int8": choose paths as a CPU without them


@functools.lru_cache(maxsize=1)
def capabilities() -> dict:
    """torch's cpuinfo probes: {'avx2': True, 'avx512_vnni': False, ...} (empty off x86), minus the flags
    $LORA_CORE_CPU_FLAGS_OFF hides, so a VNNI machine can pick (and test) the paths of an AVX2-only one."""
    try:
        probes = dict(torch._C._cpu._get_cpu_capability())
    except (AttributeError, RuntimeError):
        return {}
    for flag in filter(None, (f.strip() for f in os.environ.get(MASK_ENV, "").split(","))):
        probes[flag] = False
    return probes


def has(flag: str) -> bool:
    return bool(capabilities().get(flag, False))


def has_int8_dot() -> bool:
    """int8 dot-product units (VNNI or AMX): what torch._int_mm needs to be fast rather than a reference loop."""
    return has("avx512_vnni") or has("avx_vnni") or has("amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """'AMD EPYC 7B13', 'Intel(R) Xeon(R) Platinum 8481C', ... from /proc/cpuinfo, else what platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "Hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def flags_summary() -> str:
    """The int8-relevant flags this CPU has, e.g. 'AVX2, FMA, AVX-512, AVX-512 VNNI' (or 'none of ...')."""
    present = [shown for flag, shown in SHOWN_FLAGS.items() if has(flag)]
    return ", ".join(present) if present else f"none of {', '.join(SHOWN_FLAGS.values())}"


def describe() -> str:
    """One line for logs and benchmark headers: model, flags, threads, torch."""
    hidden = f"; hidden by {MASK_ENV}: {os.environ[MASK_ENV]}" if os.environ.get(MASK_ENV) else ""
    return (f"{cpu_model()} ({platform.machine()}; {flags_summary()}; AMX {'on' if has('amx_int8') else 'off'}"
            f"{hidden}); {torch.get_num_threads()} threads; torch {torch.__version__}")


def user_cache_dir() -> Path:
    """$LORA_CORE_CACHE, else $XDG_CACHE_HOME/lora-core, else ~/.cache/lora-core."""
    if os.environ.get("LORA_CORE_CACHE"):
        return Path(os.environ["LORA_CORE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lora-core"
