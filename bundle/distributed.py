"""Training on several GPUs (or CPU processes) with torchrun: one process per device, DistributedDataParallel.

``configs/multi_gpu_train.json`` overlays ``configs/train.json`` with these pieces. Outside torchrun (``WORLD_SIZE``
unset or 1) every function here is a no-op, so the same code runs on one device. Rank 0 writes what is written
once (caches, checkpoints, logs, exported models, the report); the other ranks wait for it where they need it.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)
T = TypeVar("T")
_alone = False  # inside only_main: the other processes are not there to synchronise with


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def init(backend: str | None = None) -> torch.device:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPUs) and return this process's device."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        logger.info("Distributed training: process %d of %d (%s).", dist.get_rank(), dist.get_world_size(),
                    dist.get_backend())
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return torch.device(f"cuda:{local}")
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def main_first(work: Callable[[], T]) -> T:
    """Rank 0 does ``work`` (e.g. builds a cache file) while the others wait, then they do it (and find the file)."""
    if world_size() == 1 or _alone:
        return work()
    if is_main():
        result = work()
        barrier()
        return result
    barrier()
    return work()


def only_main(work: Callable[[], T]) -> T | None:
    """``work`` on the first process only (e.g. the closing report), the others skip it."""
    global _alone
    if not is_main():
        return None
    _alone = True
    try:
        return work()
    finally:
        _alone = False


def ddp(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module`` in DistributedDataParallel when there are several processes (gradients averaged every step)."""
    if world_size() == 1:
        return module
    device = torch.device(device)
    return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def sampler(dataset: Any, shuffle: bool = True, seed: int = 0) -> Any:
    """Each process's share of ``dataset`` (a new shuffle every epoch: MONAI's trainers call ``set_epoch``)."""
    if world_size() == 1:
        return None
    return torch.utils.data.distributed.DistributedSampler(dataset, shuffle=shuffle, seed=seed)


def average_gradients(module: nn.Module) -> None:
    """Average the gradients of ``module`` over the processes (for a network trained outside DDP)."""
    if world_size() == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size()


def from_main(value: int) -> int:
    """Rank 0's ``value`` on every process (decisions that must agree, such as when to stop)."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([int(value)], dtype=torch.long)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def finish() -> None:
    """Leave the process group once every process is done."""
    if world_size() > 1:
        barrier()
        dist.destroy_process_group()


def condition_ready(plan: Any) -> None:
    """A multi-process run conditions on DINO weights that exist: it does not pre-train DINO itself."""
    from .errors import BundleInputError

    if getattr(plan, "pretrain", False):
        raise BundleInputError("A multi-GPU run needs the DINO condition first: run `python -m monai.bundle run train_dino "
                               "--config_file configs/train.json ...` in one process (or give --dino_weights hub or a "
                               "weights file), then start the multi-GPU training.")
