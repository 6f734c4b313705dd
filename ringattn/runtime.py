"""Process-group setup shared by the torchrun programs in `launch/`."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

DEVICES = ("auto", "cuda", "cpu")


def init_distributed(*, device: str = "auto", timeout_s: float | None = None) -> torch.device:
    """Initialize the default process group from torchrun's environment; return this rank's device.

    NCCL when every local rank has a GPU of its own (`device="auto"` or `"cuda"`), else gloo on
    CPU, with the CPU threads split between the local ranks.

    Raises:
        ValueError: unknown `device`, or `device="cuda"` with fewer GPUs than local ranks.
    """
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda" and gpus < local_world:
        raise ValueError(
            f"device 'cuda': {local_world} local ranks but {gpus} GPUs visible "
            "(NCCL needs one GPU per rank)"
        )
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    if device == "cuda" or (device == "auto" and 0 < local_world <= gpus):
        cuda = torch.device("cuda", local_rank)
        torch.cuda.set_device(cuda)
        dist.init_process_group("nccl", device_id=cuda, **kwargs)
        return cuda
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group("gloo", **kwargs)
    return torch.device("cpu")
