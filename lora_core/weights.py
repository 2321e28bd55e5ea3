"""Weights readers: Meta (params.json + consolidated.NN), HF (config.json + safetensors) and GGUF.

Each reader yields tensors under our module names and in our layout (Meta's interleaved RoPE rows),
one tensor at a time from memory-mapped files, so a model is never held twice.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModelArgs, config_value
from .gguf_io import GGUFFile
from .names import hf_to_meta_rows, name_map, rope_heads


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}); fix or replace the file") from e
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not a JSON file ({type(e).__name__}); fix or replace the file") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}; fix or replace the file")
    return value


class _SafetensorsFiles:
    """Lazily opened safetensors files, with errors that name the file."""

    def __init__(self):
        self._open = {}

    def get(self, path: Path):
        from safetensors import SafetensorError, safe_open

        if path not in self._open:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: weight file is missing")
            try:
                self._open[path] = safe_open(str(path), framework="pt")
            except SafetensorError as e:
                raise ValueError(f"{path}: corrupt or truncated safetensors file ({e}); re-download it") from e
        return self._open[path]


def _load_pth(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: cannot read this PyTorch checkpoint ({e}); it may be truncated, re-download "
                         "it") from e


class Weights:
    """Base reader: `args`, `names()` (ours), `get(name)` -> tensor in our layout, `tokenizer_path`."""

    path: Path
    args: ModelArgs
    fmt: str
    tokenizer_path: Path | None = None

    def __init__(self):
        self._names = {k: v for k, v in name_map(self.args.n_layers, self.fmt).items() if self._has(v)}
        if "lm_head.weight" not in self._names and not self.args.tie_embeddings:
            self.args.tie_embeddings = True  # no output layer in the file: the embedding is shared

    def names(self) -> list[str]:
        return list(self._names)

    def external_name(self, name: str) -> str:
        return self._names[name]

    def external_name_of(self, name: str) -> str:
        """The checkpoint's name for one of our tensors, whether or not the file has it."""
        return name_map(self.args.n_layers, self.fmt)[name]

    def get(self, name: str) -> torch.Tensor:
        t = self._read(self._names[name])
        heads = rope_heads(self.args, name)
        if self.fmt == "hf" and heads is not None:
            t = hf_to_meta_rows(t, heads)
        return t

    def _has(self, name: str) -> bool:
        raise NotImplementedError

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class MetaWeights(Weights):
    """params.json + consolidated.NN.{safetensors,pth}; model-parallel shards concatenated per tensor."""

    fmt = "meta"

    def __init__(self, path: Path):
        self.path = path
        shards = sorted(path.glob("consolidated.*.safetensors")) or sorted(path.glob("consolidated.*.pth"))
        if not shards:
            raise FileNotFoundError(f"{path}: params.json found but no consolidated.NN.safetensors or .pth weights")
        self.shards = shards
        self._files = _SafetensorsFiles()
        self._pth = {}
        self._keys = set(self._shard_keys(shards[0]))
        params = _read_json(path / "params.json")
        self._dim = config_value(params, "dim", int, str(path / "params.json"))
        if "tok_embeddings.weight" not in self._keys:
            raise ValueError(f"{shards[0]}: no tok_embeddings.weight; the checkpoint is incomplete or not in Meta's "
                             "layout")
        emb = self._read("tok_embeddings.weight")
        self.args = ModelArgs.from_meta_params(params, vocab_size=emb.shape[0], source=str(path / "params.json"))
        for candidate in (path / "tokenizer.model", path / "tokenizer.json", path.parent / "tokenizer.model"):
            if candidate.is_file():
                self.tokenizer_path = candidate
                break
        super().__init__()

    def _shard_keys(self, shard: Path):
        if shard.suffix == ".safetensors":
            return self._files.get(shard).keys()
        return self._pth_state(shard).keys()

    def _pth_state(self, shard: Path) -> dict:
        if shard not in self._pth:
            self._pth[shard] = _load_pth(shard)
        return self._pth[shard]

    def _has(self, name):
        return name in self._keys

    def _read_shard(self, shard: Path, name: str) -> torch.Tensor:
        if shard.suffix == ".safetensors":
            return self._files.get(shard).get_tensor(name)
        return self._pth_state(shard)[name]

    def _read(self, name):
        parts = [self._read_shard(s, name) for s in self.shards]
        if len(parts) == 1 or parts[0].dim() == 1:
            return parts[0]  # unsharded, or a norm replicated on every shard
        return torch.cat(parts, dim=self._shard_dim(name, parts[0]))

    def _shard_dim(self, name: str, part: torch.Tensor) -> int:
        # column-parallel layers (wq wk wv w1 w3 output, and LLaMA-3's vocab-parallel embedding) split rows;
        # row-parallel ones (wo w2, LLaMA-1/2's embedding) split columns
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            return 1
        if name == "tok_embeddings.weight":
            return 1 if part.shape[1] * len(self.shards) == self._dim else 0
        return 0


class HFWeights(Weights):
    """config.json + model.safetensors, or shards listed in model.safetensors.index.json."""

    fmt = "hf"

    def __init__(self, path: Path):
        self.path = path
        self.args = ModelArgs.from_hf_config(_read_json(path / "config.json"), source=str(path / "config.json"))
        self._files = _SafetensorsFiles()
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object; regenerate the index")
            self._where = {k: path / v for k, v in weight_map.items()}
        elif (path / "model.safetensors").is_file():
            single = path / "model.safetensors"
            self._where = {k: single for k in self._files.get(single).keys()}
        else:
            raise FileNotFoundError(
                f"{path}: config.json found but no model.safetensors or model.safetensors.index.json; "
                "save the model with safetensors (save_pretrained(..., safe_serialization=True))"
            )
        for candidate in ("tokenizer.json", "tokenizer.model"):
            if (path / candidate).is_file():
                self.tokenizer_path = path / candidate
                break
        super().__init__()

    def _has(self, name):
        return name in self._where

    def _read(self, name):
        return self._files.get(self._where[name]).get_tensor(name)


class GGUFWeights(Weights):
    """A llama.cpp GGUF file; its q/k are already in Meta's layout and its vocabulary is embedded."""

    fmt = "gguf"

    def __init__(self, path: Path):
        self.path = path
        self.file = GGUFFile(path)
        tokens = self.file.tensors.get("token_embd.weight")
        n_vocab = self.file.shape("token_embd.weight")[0] if tokens is not None else None
        try:
            self.args = ModelArgs.from_gguf(self.file.metadata(), set(self.file.tensors), n_vocab)
        except KeyError as e:
            raise ValueError(f"{path}: GGUF metadata key {e} is missing; re-convert the model") from e
        self.tokenizer_path = path
        super().__init__()

    def _has(self, name):
        return name in self.file.tensors

    def _read(self, name):
        return self.file.tensor(name)


def open_weights(path: str | Path) -> Weights:
    """Detect the layout of a directory or file and open it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory; pass a model directory, a .gguf file or "
                                "'smollm2-135m'")
    if path.is_file():
        if path.suffix == ".gguf":
            return GGUFWeights(path)
        raise ValueError(f"{path}: unknown weight file; pass a .gguf file or a directory with params.json or "
                         "config.json")
    if (path / "params.json").is_file():
        return MetaWeights(path)
    if (path / "config.json").is_file():
        return HFWeights(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return GGUFWeights(ggufs[0])
    raise ValueError(
        f"{path}: unknown layout (no params.json for Meta, no config.json for HF, no single .gguf); "
        "point --base at the model directory or file"
    )
