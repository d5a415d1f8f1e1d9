"""DDP under torchrun: set up from the environment torchrun provides; no home-made launcher."""
from __future__ import annotations

import os

import torch
import torch.distributed as tdist


def is_enabled() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_enabled() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_enabled() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str) -> torch.device:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1); pick this process's device."""
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_enabled():
        tdist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu" if device == "auto" else device)


def barrier() -> None:
    if is_enabled():
        tdist.barrier()


def gather_objects(obj) -> list:
    """Every rank's ``obj`` on every rank (validation predictions are small tables)."""
    if not is_enabled():
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    if is_enabled():
        tdist.destroy_process_group()
