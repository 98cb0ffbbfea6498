"""Single process or ``torchrun``: process group, collectives, FSDP2 placement, gradient averaging.

- :func:`init_distributed` / :func:`teardown_distributed`: single process, or ``torchrun``
  (``RANK``/``WORLD_SIZE`` in the environment) with gloo on CPU or NCCL on GPUs
  (``train.device=cuda``: one GPU per rank, ``LOCAL_RANK``); each rank gets
  ``threads // world_size`` torch threads (at least one).
- :func:`place_model`: the model on the stage's device, and under ``train.parallel=fsdp`` sharded
  over the ranks with FSDP2 (``fully_shard`` per block, then the root); checkpoints and exports
  gather full state dicts (:mod:`emu_world.train.checkpoint`), so a checkpoint written under FSDP
  resumes without it and the other way round.
- :func:`average_gradients`: one flat all-reduce of the gradients (data parallelism without DDP hooks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from emu_world.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(threads: int = 2, device: str = "cpu") -> DistInfo:
    """Join the ``torchrun`` process group if launched by it (gloo on CPU; NCCL with ``device="cuda"``,
    each rank on the GPU ``LOCAL_RANK``); set torch threads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but this torch sees no GPU (torch.cuda.is_available() is False); "
                               "use train.device=cpu")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun rank {rank} wants GPU {local_rank} but {torch.cuda.device_count()} are "
                               "visible; lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    info = DistInfo(rank, world, local_rank, where)
    torch.set_num_threads(max(1, int(threads) // world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return info


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _collective(t: torch.Tensor, info: DistInfo, op) -> torch.Tensor:
    """Run ``op`` on ``t`` in place on the backend's device (NCCL needs GPU tensors; gloo takes CPU ones)."""
    if not info.enabled:
        return t
    x = t.to(info.device)
    op(x)
    if x is not t:
        t.copy_(x)
    return t


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    _collective(t, info, lambda x: dist.all_reduce(x, op=dist.ReduceOp.SUM))
    if info.enabled:
        t /= info.world_size
    return t


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return _collective(t, info, lambda x: dist.all_reduce(x, op=dist.ReduceOp.SUM))


def broadcast_(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return _collective(t, info, lambda x: dist.broadcast(x, src=0))


def place_model(model: torch.nn.Module, blocks: list[torch.nn.Module], parallel: str, info: DistInfo,
                methods: tuple[str, ...] = ()) -> torch.nn.Module | None:
    """Move ``model`` to the rank's device; under ``train.parallel=fsdp`` with several ranks shard it with
    FSDP2: each of ``blocks`` (e.g. the transformer layers) is its own all-gather unit, the root holds
    the rest (embeddings, tied head, norms); ``methods`` are entry points besides ``forward`` that
    gather the root's weights too (e.g. ``logits``). Returns the sharded root (pass it to the checkpoint
    and export helpers), or None when the weights are replicated (gradients: :func:`average_gradients`)."""
    model.to(info.device)
    if parallel != "fsdp" or not info.enabled:
        return None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for method in methods:
        register_fsdp_forward_method(model, method)
    return model


def average_gradients(model: torch.nn.Module, info: DistInfo, sharded: bool = False) -> None:
    """Average gradients over ranks (one flat all-reduce): plain data parallelism without DDP hooks,
    which keeps the training step identical in one process and under torchrun. ``sharded``: FSDP
    already reduce-scattered (averaged) them in the backward pass; nothing to do."""
    if not info.enabled or sharded:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
