"""Adapters on disk in PEFT's format: adapter_config.json + adapter_model.safetensors.

PEFT keys name HF modules ('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight') and HF's
q/k rows are permuted relative to our Meta layout, so lora_B of q_proj/k_proj is permuted on the way
in and out. Our extras (base fingerprint, vocab size) ride in the safetensors metadata, which PEFT ignores.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint import hf_to_meta_rows, meta_to_hf_rows, rope_heads
from .lora import apply_lora, enable_modules_to_save, lora_layers

PEFT_PREFIX = "base_model.model.model."
CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"


def saved_module_key(name: str) -> str:
    """PEFT's key for a modules_to_save weight: lm_head sits beside the inner model, the rest inside it."""
    return f"base_model.model.{name}.weight" if name == "lm_head" else f"{PEFT_PREFIX}{name}.weight"


def _atomic_write(path: Path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_adapter(model: nn.Module, out_dir: str | Path, base_name: str = "", extras: dict | None = None,
                 modules_to_save: tuple[str, ...] = ()) -> Path:
    """Write the model's LoRA layers (and fully trained modules) as a PEFT adapter.

    Refuses an adapter with no LoRA tensors and re-reads what it wrote.
    """
    from safetensors.torch import load_file, save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: nothing to save (apply_lora first)")
    ranks = {m.r for m in layers.values()}
    alphas = {m.alpha for m in layers.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(f"PEFT's format needs one r and alpha for all layers; found r={ranks}, alpha={alphas}")
    tensors = {}
    for name, m in layers.items():
        b = m.lora_B.detach().float()
        heads = rope_heads(model.args, name)
        if heads is not None:
            b = meta_to_hf_rows(b, heads)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    for name in modules_to_save:
        tensors[saved_module_key(name)] = model.get_submodule(name).weight.detach().contiguous()
    first = next(iter(layers.values()))
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_name),
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout, "bias": "none",
        "target_modules": sorted({n.rpartition(".")[2] for n in layers}), "modules_to_save": list(modules_to_save) or None,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"lora_core": json.dumps(extras or {})}
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=meta))
    _atomic_write(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2)))
    back = load_file(str(out / WEIGHTS_NAME))
    if set(back) != set(tensors) or any(not torch.equal(back[k], tensors[k]) for k in tensors):
        raise OSError(f"{out / WEIGHTS_NAME}: the adapter read back differs from what was written; check the disk")
    return out


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(adapter_config, PEFT-named tensors, our extras) from a PEFT adapter directory."""
    d = Path(adapter_dir)
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: malformed JSON ({e.msg} at line {e.lineno})") from e
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    extras = {}
    if (d / WEIGHTS_NAME).is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                extras = json.loads((f.metadata() or {}).get("lora_core", "{}"))
        except SafetensorError as e:
            raise ValueError(f"{d / WEIGHTS_NAME}: corrupt or truncated ({e}); retrain or re-copy the adapter") from e
    elif (d / LEGACY_WEIGHTS_NAME).is_file():
        tensors = torch.load(d / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{d}: no {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME}")
    if not any(".lora_A" in k for k in tensors):
        raise ValueError(f"{d}: the adapter holds no LoRA tensors (an empty adapter file); retrain it")
    return config, tensors, extras


def adapter_extras(adapter_dir: str | Path) -> dict:
    """What lora-core recorded with the adapter (base, fingerprint, vocab_size); {} for PEFT's own adapters."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("lora_core", "{}"))
    except SafetensorError as e:
        raise ValueError(f"{path}: corrupt or truncated ({e}); retrain or re-copy the adapter") from e


def check_base(adapter_dir: str | Path, extras: dict, fingerprint: str, vocab_size: int, base: str):
    """Refuse a base other than the one the adapter was trained on (when the adapter recorded it)."""
    want_vocab, want_fp = extras.get("vocab_size"), extras.get("fingerprint")
    trained_on = extras.get("base", "another base")
    if want_vocab is not None and want_vocab != vocab_size:
        raise ValueError(f"{adapter_dir}: trained on {trained_on} with a {want_vocab}-token vocabulary; {base} has "
                         f"{vocab_size}: pass the adapter's own base with --base")
    if want_fp and want_fp != fingerprint:
        raise ValueError(f"{adapter_dir}: trained on {trained_on} (fingerprint {want_fp}); {base} has fingerprint "
                         f"{fingerprint}: pass the adapter's own base with --base")


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> dict:
    """Apply a PEFT LoRA adapter (ours or PEFT's) to the model, unmerged; returns our extras."""
    config, tensors, extras = read_adapter(adapter_dir)
    if config.get("use_rslora") or config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: rsLoRA, DoRA and per-layer rank/alpha patterns are not supported")
    training = model.training  # new dropout modules start in training mode; keep the model's mode
    apply_lora(model, config["target_modules"], r=config["r"], alpha=config["lora_alpha"],
               dropout=config.get("lora_dropout", 0.0))
    model.train(training)
    layers = lora_layers(model)
    for name, m in layers.items():
        key = f"{PEFT_PREFIX}{name}"
        a, b = (tensors.get(f"{key}.lora_{x}.weight", tensors.get(f"{key}.lora_{x}.default.weight")) for x in "AB")
        if a is None or b is None:
            raise ValueError(f"{adapter_dir}: no lora_A/lora_B for {name}; the adapter was trained on another model")
        if a.shape != m.lora_A.shape or b.shape != m.lora_B.shape:
            raise ValueError(f"{adapter_dir}: {name} has A {tuple(a.shape)}, B {tuple(b.shape)}; this base needs "
                             f"{tuple(m.lora_A.shape)}, {tuple(m.lora_B.shape)}: the adapter was trained on another base")
        heads = rope_heads(model.args, name)
        b = hf_to_meta_rows(b.float(), heads) if heads is not None else b.float()
        with torch.no_grad():
            m.lora_A.copy_(a.float())
            m.lora_B.copy_(b)
    for name in enable_modules_to_save(model, config.get("modules_to_save") or []):
        weight = tensors.get(saved_module_key(name))
        target = model.get_submodule(name).weight
        if weight is None or weight.shape != target.shape:
            raise ValueError(f"{adapter_dir}: modules_to_save {name!r} is missing or has the wrong shape "
                             f"({None if weight is None else tuple(weight.shape)} vs {tuple(target.shape)})")
        with torch.no_grad():
            target.copy_(weight.float())
    return extras
