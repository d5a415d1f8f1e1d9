"""Checkpoints written atomically (temp file + rename): a killed process never leaves half a file behind."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pipeline.io import atomic_write


def save(state: dict, path: str | Path) -> Path:
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
    return Path(path)


def load(path: str | Path, map_location="cpu") -> dict:
    # Our own checkpoints hold numpy RNG state and plain Python objects: trusted files, full unpickling.
    return torch.load(path, map_location=map_location, weights_only=False)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
