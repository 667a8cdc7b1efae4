"""Process groups and model wrapping for data-parallel training (`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK).

parallel="none": one process. "ddp": every rank holds the whole model and gradients are averaged.
"fsdp": FSDP2 `fully_shard` on every transformer Block and then on the root, so parameters, gradients and
optimizer state are split across ranks and gathered one block at a time. "hsdp": the same on a 2-D device mesh
(replicate, shard): each group of `shard_size` consecutive ranks (by default one node's, LOCAL_WORLD_SIZE) shards
the model as FSDP does, and the groups hold replicas whose gradients are all-reduced, so the per-block all-gathers
stay on a node's fast links and only one gradient reduction a step crosses nodes. NCCL on CUDA, gloo on CPU.
Launched without torchrun, ddp/fsdp/hsdp run as a world of one (to test the sharded code paths in one process).

Activation checkpointing (`wrap(..., checkpoint_blocks=True)`) keeps only each Block's input for backward and
recomputes the rest of the block there: activation memory of one block instead of all, for a second forward pass.
"""

import os
import socket
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from myna.progress import log

PARALLEL = ("none", "ddp", "fsdp", "hsdp")


@dataclass
class Dist:
    parallel: str = "none"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None  # hsdp's (replicate, shard) mesh; fsdp shards over the whole world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether parameters and optimizer state are DTensor shards (checkpoints are then written per rank)."""
        return self.parallel in ("fsdp", "hsdp")

    @property
    def initialized(self) -> bool:
        return self.parallel != "none"

    def barrier(self) -> None:
        if self.initialized:
            tdist.barrier()

    def log(self, msg: str) -> None:
        """Log on rank 0 only."""
        if self.is_main:
            log(msg)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over the ranks (float64 on the training device)."""
        if not self.initialized:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (pickled over the process group)."""
        if not self.initialized:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(parallel: str = "none", shard_size: int = 0) -> Dist:
    """Join the process group torchrun describes (or a world of one) and pick this rank's device; under hsdp,
    build the (replicate, shard) mesh with shard groups of `shard_size` ranks (0: LOCAL_WORLD_SIZE)."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel={parallel!r}: expected one of {', '.join(PARALLEL)}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none" and world_size > 1:
        raise ValueError(f"WORLD_SIZE={world_size} (torchrun) needs --parallel ddp, fsdp or hsdp, got none")
    if shard_size and parallel != "hsdp":
        raise ValueError(f"shard_size={shard_size} applies to --parallel hsdp only, got {parallel}")
    shard_size = shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if parallel == "hsdp" and (shard_size < 1 or world_size % shard_size):
        raise ValueError(
            f"shard_size={shard_size}: hsdp needs a positive divisor of WORLD_SIZE={world_size} "
            "(the ranks of one shard group, usually a node's GPUs)"
        )
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if parallel != "none":
        if "RANK" not in os.environ:  # not under torchrun: a world of one on the loopback interface
            os.environ.update(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    mesh = None
    if parallel == "hsdp":
        # row-major: ranks 0..shard_size-1 form the first shard group, and torchrun numbers a node's ranks
        # consecutively, so with shard_size = GPUs per node every shard group is one node
        mesh = init_device_mesh(
            device.type, (world_size // shard_size, shard_size), mesh_dim_names=("replicate", "shard")
        )
    return Dist(parallel, rank, local_rank, world_size, device, mesh)


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute every Block's activations in backward instead of keeping them (in place, before sharding).

    checkpoint_wrapper runs the block under non-reentrant torch.utils.checkpoint, which torch.compile traces, and
    fully_shard applied to the wrapper afterwards (torchtitan's order) gathers the block's parameters around both
    the forward and its recomputation. The composable torch.distributed._composable.checkpoint instead starts a
    generator in a forward pre-hook and finishes it in the post-hook, where torch.compile breaks the graph at
    every block. The wrapper's name level is dropped from parameter names and state dicts: checkpoints are
    unchanged.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)


def wrap(model: nn.Module, dist: Dist, checkpoint_blocks: bool = False) -> nn.Module:
    """The model as training sees it: unchanged, DDP-wrapped, or sharded in place by FSDP2 (over the whole world
    or on hsdp's mesh); with checkpoint_blocks, each Block's activations are recomputed in backward."""
    if checkpoint_blocks:
        checkpoint_activations(model)
    if dist.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if dist.sharded:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 compute and gradient reduction on GPU, fp32 master weights; CPU stays fp32 throughout
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if dist.device.type == "cuda"
            else MixedPrecisionPolicy()
        )
        for block in model.blocks:
            fully_shard(block, mesh=dist.mesh, mp_policy=mp)
        fully_shard(model, mesh=dist.mesh, mp_policy=mp)
    return model


def gradient_sync(model: nn.Module, dist: Dist, enabled: bool) -> AbstractContextManager:
    """The context of one micro-batch's backward: gradients are reduced across ranks only when enabled (the last
    micro-batch of an optimizer step), so accumulation costs one reduction per step under DDP and FSDP alike."""
    if dist.sharded:
        model.set_requires_gradient_sync(enabled)
    return model.no_sync() if dist.parallel == "ddp" and not enabled else nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The GPT inside DDP and torch.compile wrappers (FSDP2 shards in place, so there is nothing to peel)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def teardown(dist: Dist) -> None:
    if dist.initialized and tdist.is_initialized():
        tdist.destroy_process_group()
