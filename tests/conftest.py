"""Fixtures shared by the tests; helpers (paths, random checkpoints, CLIs in-process) are in helpers.py."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before triton is imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the tests (and the CLIs they start) keep their int8 plan and built C kernel out of the user's cache
os.environ.setdefault("LORA_CORE_CACHE", os.path.join(tempfile.gettempdir(), f"lora-core-tests-{os.getuid()}"))


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whatever ran before it (order-independent results)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from lora_core.loader import resolve_base

    try:
        return resolve_base("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    import lora_core

    return lora_core.load(smollm2_path)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own SmolLM2 from the same GGUF, the independent reference; loaded once per session (it
    takes minutes through transformers' GGUF reader)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, torch_dtype=torch.float32).eval()


TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny random LLaMA in HF layout with LLaMA-2's real tokenizer beside it (in a temp dir)."""
    from helpers import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny") / "base", TINY)
