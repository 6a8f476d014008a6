"""Adapters trained under FSDP2 (`torch.distributed.fsdp.fully_shard`) or DDP.

Nothing is needed to train: `NF4Linear` holds its NF4 tensors as frozen parameters (packed bytes
`[N, K/2]` and absmax `[N, K/blocksize]`, cut at the same rows), so `fully_shard` shards and
gathers them like any weight, and DDP broadcasts them once. Apply `fully_shard` to modules that
contain each `LoraLinear` together with its base layer (a transformer block, or the `LoraLinear`
itself), not to the base layer alone: the fused forward reads the base's tensors without calling
the base module, so only the enclosing module's hooks gather them.

`save_adapter` here is the collective counterpart of `peft_ops.save_adapter`: every rank calls it,
the FSDP2 shards of the adapters are gathered, and one rank writes the checkpoint.
"""

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from . import adapter_io
from .convert import lora_layers

__all__ = ["save_adapter"]

_ADAPTER_PARAMS = ("lora_A", "lora_B", "lora_magnitude_vector")


def _unwrap(model):
    """The user's module inside DDP / torch.compile wrappers (their names carry extra prefixes)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def _full_adapters(model):
    """Within: every adapter parameter of `model` is a plain full tensor (FSDP2's DTensor shards are
    gathered; collective, the same order on every rank). The module's own parameters come back after."""
    from torch.distributed.tensor import DTensor

    swapped = []
    try:
        for _, layer in lora_layers(model):
            for name in _ADAPTER_PARAMS:
                param = layer._parameters.get(name)
                if isinstance(param, DTensor):
                    full = nn.Parameter(param.detach().full_tensor(), requires_grad=param.requires_grad)
                    swapped.append((layer, name, param))
                    layer._parameters[name] = full
        yield model
    finally:
        for layer, name, param in swapped:
            layer._parameters[name] = param


def save_adapter(model, save_directory, *, rank=0, group=None, **kwargs):
    """Write `model`'s adapters as a PEFT checkpoint from one rank; call it on every rank.

    `model` may be wrapped in DDP, sharded with FSDP2, or plain (each rank holding a replica).
    The file equals what `peft_ops.save_adapter` writes for the same weights trained in one
    process. Keyword arguments go to `peft_ops.save_adapter`. Returns after every rank is done.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("save_adapter: torch.distributed is not initialized; use peft_ops.save_adapter")
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 0 <= rank < dist.get_world_size(group):
        raise ValueError(f"rank must be in [0, {dist.get_world_size(group)}), got {rank}")
    model = _unwrap(model)
    error = None
    with torch.no_grad(), _full_adapters(model):
        if dist.get_rank(group) == rank:
            try:
                adapter_io.save_adapter(model, save_directory, **kwargs)
            except Exception as e:  # re-raised below, after the other ranks have heard of it
                error = e
    # Doubles as the barrier: no rank returns before the file is written (or has failed).
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    failed = torch.tensor([error is not None], dtype=torch.int32, device=device)
    dist.all_reduce(failed, group=group)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f"save_adapter failed on rank {rank}; see its error")
