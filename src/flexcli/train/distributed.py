"""Multi-process training under torchrun: FSDP2 sharding, DCP checkpoints, rank-0 output.

Single-process runs never touch torch.distributed; every helper here is a no-op at world size 1.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import nn


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); gloo on CPU, NCCL on GPU."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown() -> None:
    """Leave the process group (a process that exits while still in it can abort in gloo's threads)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's object on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(model: nn.Module, arch) -> None:
    """FSDP2: shard each decoder layer, then the root (embeddings, final norm, LM head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_submodule(arch.layers):
        fully_shard(layer)
    fully_shard(model)


def dcp_state(model: nn.Module, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def with_sharded_optimizer_state(model: nn.Module, cfg, state, path):
    """A LoopState whose optimizer entry loads model and optimizer shards from a DCP checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def load(opt) -> None:
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(path))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

    return replace(state, optimizer=load)


def gather_full_model(model: nn.Module) -> nn.Module | None:
    """Collect the full weights on rank 0 into a plain (unsharded) copy; None on other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rank, _ = rank_world()
    if rank != 0:
        return None
    cls = next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))  # fully_shard subclasses
    plain = cls(model.config).to(next(iter(full.values())).dtype)
    plain.load_state_dict(full, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval()
