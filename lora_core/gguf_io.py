"""Read GGUF files with llama.cpp's `gguf` package and dequantize their tensors with torch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# ggml block layouts (ggml-common.h): bytes per block of 32 weights
_BLOCK = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
QK = 32


def _f16(raw: torch.Tensor, start: int) -> torch.Tensor:
    """Little-endian f16 at byte `start` of each block row -> fp32 column (n, 1)."""
    return raw[:, start:start + 2].contiguous().view(torch.float16).float()


def dequantize_blocks(raw: np.ndarray, type_name: str, chunk_blocks: int = 1 << 15) -> torch.Tensor:
    """Blocks of one quantized tensor (any shape of uint8, whole blocks) -> flat fp32 weights.

    Works through `chunk_blocks` blocks at a time so the temporaries stay small next to the result.
    """
    if type_name not in _BLOCK:
        raise ValueError(f"GGUF tensor type {type_name} is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1 are)")
    blocks = np.asarray(raw).reshape(-1, _BLOCK[type_name])  # (n_blocks, bytes), a view of the memory map
    out = torch.empty(blocks.shape[0], QK, dtype=torch.float32)
    for start in range(0, blocks.shape[0], chunk_blocks):
        chunk = torch.from_numpy(np.array(blocks[start:start + chunk_blocks]))
        out[start:start + chunk_blocks] = _dequantize_chunk(chunk, type_name)
    return out.flatten()


def _dequantize_chunk(raw: torch.Tensor, type_name: str) -> torch.Tensor:
    """(n, bytes) uint8 blocks -> (n, 32) fp32.

    Q8_0: d * q (q int8); Q4_0: d * (nibble - 8); Q4_1: d * nibble + m. In the 4-bit types the
    low nibbles of the 16 bytes hold weights 0..15 of the block and the high nibbles 16..31.
    """
    if type_name == "Q8_0":
        return _f16(raw, 0) * raw[:, 2:].view(torch.int8).float()
    qs = raw[:, -16:]
    nibbles = torch.cat((qs & 0x0F, qs >> 4), dim=1).float()  # (n, 32)
    if type_name == "Q4_0":
        return _f16(raw, 0) * (nibbles - 8)
    return _f16(raw, 0) * nibbles + _f16(raw, 2)


class GGUFFile:
    """Metadata and lazily dequantized tensors of one GGUF file (memory-mapped by gguf.GGUFReader)."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such GGUF file")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except (ValueError, IndexError, OSError, KeyError, TypeError) as e:
            raise ValueError(
                f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated or corrupt, "
                "re-download or re-export it"
            ) from e
        self.tensors = {t.name: t for t in self._reader.tensors}
        self._check_size()

    def _check_size(self):
        end = max((int(t.data_offset) + int(t.n_bytes) for t in self._reader.tensors), default=0)
        size = self.path.stat().st_size
        if end > size:
            raise ValueError(f"{self.path}: truncated GGUF file ({size} bytes, tensors need {end}); re-download it")

    def meta(self, key: str, default=None):
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def metadata(self, prefix: str = "") -> dict:
        """Scalar and short metadata fields (skips the big tokenizer arrays)."""
        out = {}
        for key, field in self._reader.fields.items():
            if key.startswith(prefix) and not key.startswith("tokenizer.ggml.") and len(field.data) < 64:
                out[key] = field.contents()
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        """Torch (row-major) shape of a tensor: ggml lists dimensions innermost first."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor as a float torch tensor (fp32 for quantized types, else the stored dtype)."""
        t = self.tensors[name]
        kind, shape = t.tensor_type.name, self.shape(name)
        if kind in ("F32", "F16"):
            return torch.from_numpy(np.array(t.data)).reshape(shape)
        if kind == "BF16":
            return torch.from_numpy(np.asarray(t.data).view(np.int16).copy()).view(torch.bfloat16).reshape(shape)
        if shape[-1] % QK:
            raise ValueError(f"{self.path}: tensor {name} has rows of {shape[-1]}, not a multiple of {QK}")
        return dequantize_blocks(t.data, kind).reshape(shape)
