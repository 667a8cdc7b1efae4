"""Process groups and model wrapping for data-parallel training (`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK).

parallel="none": one process. "ddp": every rank holds the whole model and gradients are averaged.
"fsdp": FSDP2 `fully_shard` on every transformer Block and then on the root, so parameters, gradients and
optimizer state are split across ranks and gathered one block at a time. NCCL on CUDA, gloo on CPU. Launched
without torchrun, ddp/fsdp run as a world of one (useful to test the sharded code paths in one process).
"""

import os
import socket
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

from myna.progress import log

PARALLEL = ("none", "ddp", "fsdp")


@dataclass
class Dist:
    parallel: str = "none"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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


def setup(parallel: str = "none") -> Dist:
    """Join the process group torchrun describes (or a world of one) and pick this rank's device."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel={parallel!r}: expected one of {', '.join(PARALLEL)}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none" and world_size > 1:
        raise ValueError(f"WORLD_SIZE={world_size} (torchrun) needs --parallel ddp or fsdp, got none")
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
    return Dist(parallel, rank, local_rank, world_size, device)


def wrap(model: nn.Module, dist: Dist) -> nn.Module:
    """The model as training sees it: unchanged, DDP-wrapped, or sharded in place by FSDP2."""
    if dist.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if dist.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 compute and gradient reduction on GPU, fp32 master weights; CPU stays fp32 throughout
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if dist.device.type == "cuda"
            else MixedPrecisionPolicy()
        )
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def gradient_sync(model: nn.Module, dist: Dist, enabled: bool) -> AbstractContextManager:
    """The context of one micro-batch's backward: gradients are reduced across ranks only when enabled (the last
    micro-batch of an optimizer step), so accumulation costs one reduction per step under DDP and FSDP alike."""
    if dist.parallel == "fsdp":
        model.set_requires_gradient_sync(enabled)
    return model.no_sync() if dist.parallel == "ddp" and not enabled else nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The GPT inside DDP and torch.compile wrappers (FSDP2 shards in place, so there is nothing to peel)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def teardown(dist: Dist) -> None:
    if dist.initialized and tdist.is_initialized():
        tdist.destroy_process_group()
