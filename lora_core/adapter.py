"""Adapters on disk in PEFT's format: adapter_config.json + adapter_model.safetensors (or legacy .bin).

One reader, `read_adapter`, turns a directory into an `Adapter` in our layout; loading (apply_adapter)
and merging (export/merge.py) both consume it. PEFT keys name HF modules
('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight') and HF's q/k rows are permuted
relative to our Meta layout, so lora_B of q_proj/k_proj is permuted on the way in and out. Our extras
(base, fingerprint, vocab size) ride in the safetensors metadata, which PEFT ignores.

An adapter trained on an extended vocabulary (lora_core.vocab) holds embed_tokens and lm_head with the new
rows as modules_to_save (PEFT loads them once the base's embeddings are resized to the tokenizer it carries),
the extended tokenizer's files (tokenizer.model or tokenizer.json, tokenizer_config.json) and, in the extras,
extended_vocab_size; vocab_size and fingerprint stay the base's, so the adapter still names its base.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelArgs
from .lora import apply_lora, enable_modules_to_save, lora_layers
from .model import PROJECTIONS
from .names import hf_to_meta_rows, meta_to_hf_rows, rope_heads
from .tokenizer import Tokenizer, load_tokenizer, write_tokenizer_files
from .vocab import ExtendedEmbedding

PEFT_PREFIX = "base_model.model.model."
CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"


def saved_module_key(name: str) -> str:
    """PEFT's key for a modules_to_save weight: lm_head sits beside the inner model, the rest inside it."""
    return f"base_model.model.{name}.weight" if name == "lm_head" else f"{PEFT_PREFIX}{name}.weight"


@dataclass
class Adapter:
    """A LoRA adapter in our layout: A (r, in) and B (out, r) per module, B's q/k rows in Meta's order."""

    path: Path
    r: int
    alpha: float
    dropout: float
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # our module name -> (A, B), fp32
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save: module name -> weight
    base: str | None = None  # what lora-core recorded at training time (None for PEFT's own adapters)
    fingerprint: str | None = None
    vocab_size: int | None = None  # the base's vocabulary
    tokenizer: Tokenizer | None = None  # the extended tokenizer of an adapter that grew the vocabulary

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @property
    def targets(self) -> list[str]:
        return sorted({name.rpartition(".")[2] for name in self.layers})

    def check_base(self, fingerprint: str, vocab_size: int, base: str):
        """Refuse a base other than the one the adapter was trained on (when the adapter recorded it)."""
        check_trained_base(self.path, {"base": self.base, "fingerprint": self.fingerprint,
                                       "vocab_size": self.vocab_size}, fingerprint, vocab_size, base)


def check_trained_base(path: Path, extras: dict, fingerprint: str | None, vocab_size: int, base: str):
    """The refusal of Adapter.check_base, from the recorded extras (fingerprint None: the vocabulary alone)."""
    trained_on, trained_vocab, trained_print = extras.get("base") or "another base", extras.get("vocab_size"), (
        extras.get("fingerprint"))
    if trained_vocab is not None and trained_vocab != vocab_size:
        raise ValueError(f"{path}: trained on {trained_on} with a {trained_vocab}-token vocabulary; {base} has "
                         f"{vocab_size}: pass the adapter's own base with --base")
    if fingerprint is not None and trained_print and trained_print != fingerprint:
        raise ValueError(f"{path}: trained on {trained_on} (fingerprint {trained_print}); {base} has fingerprint "
                         f"{fingerprint}: pass the adapter's own base with --base")


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e}); fix it or re-save the adapter") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    if config.get("use_rslora") or config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{path}: rsLoRA, DoRA and per-layer rank/alpha patterns are not supported")
    for key, kind in (("r", int), ("lora_alpha", (int, float)), ("lora_dropout", (int, float))):
        value = config.get(key, 0.0 if key == "lora_dropout" else None)
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value < 0 or (
                key != "lora_dropout" and value <= 0):
            raise ValueError(f"{path}: {key} is {value!r}; it must be a positive number" +
                             (" (an integer)" if key == "r" else ""))
    return config


def _read_tensors(d: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(PEFT-named tensors, our extras) from adapter_model.safetensors or the legacy .bin."""
    if (d / WEIGHTS_NAME).is_file():
        try:
            with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                extras = json.loads((f.metadata() or {}).get("lora_core", "{}"))
        except (SafetensorError, json.JSONDecodeError) as e:
            raise ValueError(f"{d / WEIGHTS_NAME}: corrupt or truncated ({e}); retrain or re-copy the adapter") from e
        return tensors, extras if isinstance(extras, dict) else {}
    if (d / LEGACY_WEIGHTS_NAME).is_file():
        try:
            return torch.load(d / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True), {}
        except (RuntimeError, EOFError, OSError) as e:
            raise ValueError(f"{d / LEGACY_WEIGHTS_NAME}: unreadable ({e}); retrain or re-copy the adapter") from e
    raise FileNotFoundError(f"{d}: no {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME}")


def _saved_rows(d: Path, config: dict) -> int:
    """The most rows of an embed_tokens / lm_head saved in full (0: none), from the safetensors header, or from
    the tensors of a legacy .bin."""
    names = [saved_module_key(m) for m in config.get("modules_to_save") or [] if m in ("embed_tokens", "lm_head")]
    if not names:
        return 0
    if not (d / WEIGHTS_NAME).is_file():
        tensors = _read_tensors(d)[0]
        return max((tensors[k].shape[0] for k in names if k in tensors), default=0)
    try:
        with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
            return max((f.get_slice(k).get_shape()[0] for k in names if k in f.keys()), default=0)
    except SafetensorError as e:
        raise ValueError(f"{d / WEIGHTS_NAME}: corrupt or truncated ({e}); retrain or re-copy the adapter") from e


def _extended_tokenizer(d: Path, size: int, base_vocab: int) -> Tokenizer:
    """The tokenizer of an adapter whose vocabulary grew from base_vocab to `size` tokens: its own files."""
    if not any((d / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(f"{d}: the adapter grew the vocabulary from {base_vocab} to {size} tokens but its "
                                "tokenizer (tokenizer.json or tokenizer.model) is not in the directory; copy it from "
                                "the training output")
    tok = load_tokenizer(d)
    if tok.vocab_size != size:
        raise ValueError(f"{tok.path}: {tok.vocab_size} tokens, but the adapter's embeddings have {size} rows; this "
                         "tokenizer belongs to another run: copy the one it was trained with")
    return tok


def adapter_tokenizer(adapter_dir: str | Path, base_vocab: int, base: str = "this base") -> Tokenizer | None:
    """The extended tokenizer an adapter carries when it grew the base's vocabulary (recorded by lora-core, or
    seen in the rows of a PEFT adapter's embed_tokens / lm_head), without reading its tensors; None otherwise.
    An adapter recorded as trained on a base with another vocabulary is refused first, as check_base would."""
    d = Path(adapter_dir)
    extras = adapter_extras(d)
    check_trained_base(d, extras, None, base_vocab, base)
    size = extras.get("extended_vocab_size")
    if size is None and (d / CONFIG_NAME).is_file():
        size = _saved_rows(d, _read_config(d / CONFIG_NAME))
    return _extended_tokenizer(d, size, base_vocab) if size and size > base_vocab else None


def _module_of(key: str, which: str) -> str | None:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A(.default).weight' -> 'layers.0.self_attn.q_proj'."""
    for suffix in (f".lora_{which}.weight", f".lora_{which}.default.weight"):
        if key.endswith(suffix):
            return key.removesuffix(suffix).removeprefix(PEFT_PREFIX)
    return None


def read_adapter(adapter_dir: str | Path, args: ModelArgs) -> Adapter:
    """The adapter in our layout, checked for what a file can get wrong: an empty or truncated file, a rank
    or target list that disagrees with the tensors, A/B pairs that do not fit `args`, NaN or inf values."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such adapter directory (it holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = _read_config(d / CONFIG_NAME)
    tensors, extras = _read_tensors(d)
    r, alpha = config["r"], float(config["lora_alpha"])
    a_keys = {m: k for k in tensors if (m := _module_of(k, "A")) is not None}
    if not a_keys:
        raise ValueError(f"{d}: the adapter holds no LoRA tensors (an empty adapter file); retrain it")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    wanted = {t for t in targets if t in PROJECTIONS}
    held = {m.rpartition(".")[2] for m in a_keys}
    if isinstance(config.get("target_modules"), list) and held - wanted:
        raise ValueError(f"{d / CONFIG_NAME}: target_modules lists {sorted(wanted)} but the tensors also hold "
                         f"{sorted(held - wanted)}; the config does not belong to these weights")
    layers = {}
    for module, a_key in sorted(a_keys.items()):
        b = tensors.get(a_key.replace("lora_A", "lora_B"))
        a = tensors[a_key]
        if b is None:
            raise ValueError(f"{d}: {a_key} has no lora_B; the adapter file is incomplete")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"{d}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)} but {CONFIG_NAME} says "
                             f"r={r}; the config does not belong to these weights")
        a, b = a.float(), b.float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"{d}: {module} holds NaN or inf values; the adapter is damaged, retrain it or use an "
                             "earlier checkpoint")
        heads = rope_heads(args, module)
        if heads is not None and b.shape[0] % (2 * heads) == 0:  # other shapes cannot fit: refused where applied
            b = hf_to_meta_rows(b, heads)
        layers[module] = (a.contiguous(), b.contiguous())
    saved = {}
    for module in config.get("modules_to_save") or []:
        weight = tensors.get(saved_module_key(module))
        if weight is None:
            raise ValueError(f"{d}: modules_to_save lists {module!r} but the file holds no {saved_module_key(module)}")
        if not torch.isfinite(weight).all():
            raise ValueError(f"{d}: {module} holds NaN or inf values; the adapter is damaged")
        saved[module] = weight.float()
    tok = adapter_tokenizer(d, extras.get("vocab_size") or args.vocab_size)
    return Adapter(d, r, alpha, float(config.get("lora_dropout", 0.0)), layers, saved,
                   base=extras.get("base"), fingerprint=extras.get("fingerprint"), vocab_size=extras.get("vocab_size"),
                   tokenizer=tok)


def adapter_extras(adapter_dir: str | Path) -> dict:
    """What lora-core recorded with the adapter (base, fingerprint, vocab_size), without reading tensors;
    {} for PEFT's own adapters. The CLIs use it to find the adapter's base."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        if not Path(adapter_dir).is_dir():
            raise FileNotFoundError(f"{adapter_dir}: no such adapter directory (it holds {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME})")
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            extras = json.loads((f.metadata() or {}).get("lora_core", "{}"))
    except (SafetensorError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt or truncated ({e}); retrain or re-copy the adapter") from e
    return extras if isinstance(extras, dict) else {}


def apply_adapter(model: nn.Module, adapter: Adapter):
    """Wrap the adapter's layers in LoRALinear, unmerged, and copy its tensors in; the model keeps its mode. An
    adapter that grew the vocabulary needs the model grown first (lora_core.vocab.resize_model; load() does it)."""
    if adapter.tokenizer is not None and model.args.vocab_size != adapter.tokenizer.vocab_size:
        raise ValueError(f"{adapter.path}: the adapter grew the vocabulary to {adapter.tokenizer.vocab_size} tokens; "
                         f"this model embeds {model.args.vocab_size}: load it with lora_core.load(base, adapter=...), "
                         "which grows the embeddings")
    training = model.training  # new dropout modules start in training mode; keep the model's mode
    apply_lora(model, adapter.targets, r=adapter.r, alpha=adapter.alpha, dropout=adapter.dropout)
    model.train(training)
    layers = lora_layers(model)
    missing = sorted(set(layers) - set(adapter.layers))
    unknown = sorted(set(adapter.layers) - set(layers))
    if missing or unknown:
        name = (unknown or missing)[0]
        raise ValueError(f"{adapter.path}: {'no layer of this model is called' if unknown else 'no A/B for'} {name}; "
                         "the adapter was trained on another model")
    for name, m in layers.items():
        a, b = adapter.layers[name]
        if a.shape != m.lora_A.shape or b.shape != m.lora_B.shape:
            raise ValueError(f"{adapter.path}: {name} has A {tuple(a.shape)}, B {tuple(b.shape)}; this base needs "
                             f"{tuple(m.lora_A.shape)}, {tuple(m.lora_B.shape)}: the adapter was trained on another "
                             "base")
        with torch.no_grad():
            m.lora_A.copy_(a)
            m.lora_B.copy_(b)
    for name in enable_modules_to_save(model, list(adapter.saved)):
        target = model.get_submodule(name).weight
        weight = adapter.saved[name]
        if weight.shape != target.shape:
            raise ValueError(f"{adapter.path}: modules_to_save {name!r} has shape {tuple(weight.shape)}, this base "
                             f"needs {tuple(target.shape)}: the adapter was trained on another base")
        with torch.no_grad():
            target.copy_(weight)


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> Adapter:
    """read_adapter + apply_adapter: a PEFT LoRA adapter (ours or PEFT's) on the model, unmerged."""
    adapter = read_adapter(adapter_dir, model.args)
    apply_adapter(model, adapter)
    return adapter


def _atomic_write(path: Path, write):
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_adapter(model: nn.Module, out_dir: str | Path, base_name: str = "", extras: dict | None = None,
                 modules_to_save: tuple[str, ...] = ()) -> Path:
    """Write the model's LoRA layers (and fully trained modules) as a PEFT adapter; a model whose vocabulary was
    extended also gets its tokenizer written beside it (first, so no adapter exists without it).

    Refuses an adapter with no LoRA tensors or with NaN/inf values, and re-reads what it wrote.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: nothing to save (apply_lora first)")
    ranks = {m.r for m in layers.values()}
    alphas = {m.alpha for m in layers.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(f"PEFT's format needs one r and alpha for all layers; found r={ranks}, alpha={alphas}")
    tensors = {}
    for name, m in layers.items():
        b = m.lora_B.detach().float().cpu()
        heads = rope_heads(model.args, name)
        if heads is not None:
            b = meta_to_hf_rows(b, heads)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    for name in modules_to_save:
        tensors[saved_module_key(name)] = model.get_submodule(name).weight.detach().cpu().contiguous()
    bad = next((k for k, t in tensors.items() if not torch.isfinite(t).all()), None)
    if bad is not None:
        raise FloatingPointError(f"{bad} holds NaN or inf values; not written to {out_dir} (lower --lr)")
    first = next(iter(layers.values()))
    dropout = getattr(first.dropout, "p", 0.0)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_name),
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout, "bias": "none",
        "target_modules": sorted({n.rpartition(".")[2] for n in layers}),
        "modules_to_save": list(modules_to_save) or None,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extras = dict(extras or {})
    embed = getattr(model, "embed_tokens", None)
    if isinstance(embed, ExtendedEmbedding):
        write_tokenizer_files(embed.tokenizer, out)
        extras.update(vocab_size=embed.tokenizer.extension.base_size, extended_vocab_size=embed.num_embeddings)
    meta = {"lora_core": json.dumps(extras)}
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=meta))
    _atomic_write(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2)))
    back = load_file(str(out / WEIGHTS_NAME))
    if set(back) != set(tensors) or any(not torch.equal(back[k], tensors[k]) for k in tensors):
        raise OSError(f"{out / WEIGHTS_NAME}: the adapter read back differs from what was written; check the disk")
    return out
