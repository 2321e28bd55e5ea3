"""The device a run uses (--device): CUDA when present unless told otherwise, and what goes with it."""
from __future__ import annotations

import contextlib

import torch

DEVICES = ("auto", "cpu", "cuda")


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when a CUDA device is present, else cpu; 'cuda' / 'cuda:1' / 'cpu' as given, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device; "
                             "use --device cpu (or install a CUDA build of torch)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA (tensor cores; LoRA weights, optimizer and loss stay fp32); nothing on CPU, where
    bf16 matmuls run slower than fp32 on CPUs without AMX (tests/benchmarks/test_int8_kernels.py)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
