"""lora-core: instruction-tune LLaMA-family models with LoRA on modest hardware."""
from .api import BASE_DTYPES, load, load_from, open_base, tokenizer_of
from .config import ModelArgs
from .loader import DEFAULT_BASE, load_model, resolve_base
from .model import KVCache, Transformer
from .tokenizer import Tokenizer, load_tokenizer
from .weights import open_weights

__version__ = "0.2.0"

__all__ = ["load", "load_from", "open_base", "tokenizer_of", "load_model", "load_tokenizer", "open_weights",
           "resolve_base", "ModelArgs", "Transformer", "KVCache", "Tokenizer", "DEFAULT_BASE", "BASE_DTYPES",
           "__version__"]
