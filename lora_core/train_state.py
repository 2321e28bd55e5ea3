"""Training checkpoints (snapshots of a run): adapter + optimizer + RNG + step + the run's settings, written
to a temporary directory and renamed only when complete, so an interrupted run always resumes from a
whole checkpoint, and a failed write (a full disk) leaves nothing behind."""
from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import torch

from .adapter import load_adapter, save_adapter

STATE_NAME = "trainer_state.pt"


def remove_partial(dirpath: Path):
    """Temporary directories of checkpoint writes that never finished (a killed or failed run)."""
    for tmp in dirpath.glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(dirpath: Path, model, optimizer, step: int, modules_to_save, keep: int, extras: dict,
                    config: dict) -> Path:
    """checkpoints/step-NNNNNNN, complete or absent; older ones beyond `keep` are removed."""
    dirpath.mkdir(parents=True, exist_ok=True)
    final = dirpath / f"step-{step:07d}"
    tmp = dirpath / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_adapter(model, tmp, extras=extras, modules_to_save=tuple(modules_to_save))
        state = {"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                 "python_rng": random.getstate(), "config": config}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()  # dropout masks drawn on the GPU
        torch.save(state, tmp / STATE_NAME)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DiskFull(f"{dirpath}: the disk filled up while writing the step-{step} checkpoint; nothing partial "
                           f"was kept. Free some space; {resume_hint(dirpath)}") from e
        raise
    for old in sorted(dirpath.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resume_hint(dirpath: Path) -> str:
    """What an interrupted run leaves to continue from, for the line the CLI prints."""
    last = latest_checkpoint(dirpath) if dirpath.is_dir() else None
    if last is None:
        return f"no checkpoint was written yet in {dirpath} (see --save-every): the same command starts over"
    return f"the last checkpoint ({last.name}) in {dirpath} is intact: add --resume to continue"


class DiskFull(OSError):
    """ENOSPC with a message that says what was being written and what to do (printed without "[Errno 28]")."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def latest_checkpoint(dirpath: Path) -> Path | None:
    done = sorted(p for p in dirpath.glob("step-*") if (p / STATE_NAME).is_file())
    return done[-1] if done else None


def read_state(path: Path) -> dict:
    try:
        return torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{path / STATE_NAME}: unreadable ({e}); delete this checkpoint to resume from the one "
                         "before") from e


def restore_checkpoint(path: Path, model, make_optimizer, state: dict) -> torch.optim.Optimizer:
    """Apply the checkpoint's adapter to the (LoRA-free) model, rebuild the optimizer, restore RNG states."""
    load_adapter(model, path)
    optimizer = make_optimizer()
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    return optimizer
