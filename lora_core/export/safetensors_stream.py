"""Writing safetensors one tensor at a time: the header is planned from shapes, then data is streamed,
so a 7B export never holds the whole model (the safetensors package wants every tensor at once)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class SafetensorsWriter:
    def __init__(self, path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict | None = None):
        """specs: tensor name -> (shape, dtype), in the order the tensors will be written."""
        self.path, self.specs = Path(path), dict(specs)
        header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
        for name, (shape, dtype) in self.specs.items():
            n = dtype.itemsize * int(torch.Size(shape).numel())
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.size = 8 + len(raw) + offset
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.pending = list(self.specs)

    def write(self, name: str, tensor: torch.Tensor):
        if not self.pending or self.pending[0] != name:
            raise RuntimeError(f"{self.path}: expected tensor {self.pending[:1]}, got {name}")
        shape, dtype = self.specs[name]
        t = tensor.to(dtype).contiguous()
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)}, planned {tuple(shape)}")
        t.view(-1).view(torch.uint8).numpy().tofile(self.f)
        self.pending.pop(0)

    def close(self):
        self.f.close()
        if self.pending:
            raise RuntimeError(f"{self.path}: {len(self.pending)} tensors never written, first {self.pending[0]}")
