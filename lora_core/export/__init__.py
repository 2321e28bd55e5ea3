"""Merging an adapter into its base and writing what llama.cpp and transformers load: GGUF, Meta, HF, and
the adapter alone as a llama.cpp LoRA GGUF."""
from .exporter import DTYPES, FORMATS, export, verify_export

__all__ = ["export", "verify_export", "FORMATS", "DTYPES"]
