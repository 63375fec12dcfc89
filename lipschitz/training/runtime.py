"""Where a run executes: the device, bfloat16 autocast, and torchrun's process group."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")


def select_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; otherwise the named device, checked here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device; use one of {DEVICE_NAMES}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPUs")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available on this machine")
    return device


def autocast(device: torch.device, cpu_bf16: bool = False):
    """bfloat16 autocast on CUDA, and on the CPU when ``cpu_bf16`` (1.6× faster cifar-vit steps
    where the CPU has bfloat16 matrix units: AVX512-BF16, AMX; docs/benchmarks.md); full
    precision elsewhere."""
    if device.type == "cuda" or (cpu_bf16 and device.type == "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def env_int(name: str, default: int) -> int:
    """An integer environment variable (torchrun's WORLD_SIZE, LOCAL_RANK), named if bad."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


def init_distributed(device: str) -> bool:
    """Join torchrun's process group (NCCL on CUDA, else gloo) if WORLD_SIZE > 1 and it is not
    joined yet; returns whether it was started here (and must be destroyed by the caller)."""
    world, rank = env_int("WORLD_SIZE", 1), env_int("RANK", 0)
    if world <= 1 and rank != 0:
        raise ValueError(
            f"environment variable RANK={rank} but WORLD_SIZE is {world}: a variable left from "
            "an earlier torchrun? unset RANK (or launch with torchrun)"
        )
    if world <= 1 or dist.is_initialized():
        return False
    # Imported after the group exists (the first optimizer imports it), torch._dynamo keeps a
    # reference to the group, so destroy_process_group cannot free it: gloo's threads then die
    # at interpreter exit, which aborts a rank now and then (std::terminate; torch 2.13).
    import torch._dynamo

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(env_int("LOCAL_RANK", 0))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


@torch.no_grad()
def all_reduce_gradients(model: nn.Module, loss: float) -> float:
    """Average every gradient (and the loss) over the ranks, in one flat all-reduce; returns
    the mean loss. Parameters without a gradient are skipped (the same ones on every rank)."""
    world = dist.get_world_size()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [grads[0].new_tensor([loss]).float()])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[-1].item()


def broadcast_object(obj, src: int = 0):
    """rank ``src``'s ``obj`` on every rank (identity outside torchrun)."""
    if rank_and_world()[1] == 1:
        return obj
    shared = [obj]
    dist.broadcast_object_list(shared, src=src)
    return shared[0]
