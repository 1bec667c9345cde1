"""torch.distributed as a training run sees it: one process, or one rank of a ``torchrun`` job.

``torchrun --nproc_per_node N -m tritonformers train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous variables; :meth:`Distributed.from_env` joins that group (NCCL on CUDA, gloo on the CPU) unless the
caller's script already did. Multi-node runs use torchrun's own flags; nothing here launches processes.
"""

from __future__ import annotations

import contextlib
import gc
import os

import torch
import torch.distributed as dist


class Distributed:
    """Rank, world size and device of this process, and the few collectives the loop needs (no-ops alone)."""

    def __init__(self, rank: int, world: int, device: torch.device, owns_group: bool):
        self.rank, self.world, self.device, self.owns_group = rank, world, device, owns_group

    @classmethod
    def from_env(cls, device: str | None = None) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is not None:
            dev = torch.device(device)
        elif torch.cuda.is_available():
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device("cpu")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        owns = False
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            owns = True
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), dev, owns)
        return cls(0, 1, dev, False)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks, in float64 (so counts and loss sums stay exact-ish), on the CPU."""
        t = torch.as_tensor(values, dtype=torch.float64).detach().flatten()
        if self.enabled:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            # FSDP2's mesh and hooks can keep the group alive through reference cycles until interpreter exit,
            # where tearing down gloo's worker threads can abort the process. Suspected, not reproduced, cause
            # of one "terminate called without an active exception" at the end of an FSDP2 test run on a
            # loaded 2-core machine. Free them while the interpreter is whole.
            gc.collect()
            dist.destroy_process_group()


def wrap(model: torch.nn.Module, ctx: Distributed, fsdp: bool, *, unused_parameters: bool = False,
         layer_methods: tuple[str, ...] = ()) -> torch.nn.Module:
    """DDP over the ranks, or FSDP2 (``fully_shard``) of each layer of the model's layer list and then the root
    (embeddings, final norm and a tied LM head stay together in the root group). Alone: the model itself.

    ``unused_parameters``: DDP looks for parameters without a gradient each step. ``layer_methods``: methods
    besides ``forward`` that run a layer, registered so FSDP2 gathers the layer's parameters around them too.
    """
    if not ctx.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        layers = _layer_lists(model)
        if not layers:
            raise ValueError(f"fsdp: found no layer list (nn.ModuleList) in {type(model).__name__} to shard")
        for layer_list in layers:
            for layer in layer_list:
                fully_shard(layer)
                for method in layer_methods:
                    if hasattr(layer, method):
                        register_fsdp_forward_method(layer, method)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                   find_unused_parameters=unused_parameters)


def _layer_lists(model: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The outermost ``nn.ModuleList`` s (the transformer layers), not lists nested inside a layer."""
    found, inside = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, torch.nn.ModuleList) and len(module):
            found.append(module)
            inside.add(name)
    return found


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DDP wrapper (FSDP2 shards in place: the model is itself)."""
    return getattr(model, "module", model)


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def gradient_sync(model: torch.nn.Module, sync: bool):
    """A context where this micro-step's backward all-reduces gradients (``sync``) or only accumulates."""
    if sync:
        if is_fsdp(model):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if is_fsdp(model):
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if no_sync is not None else contextlib.nullcontext()


__all__ = ["Distributed", "wrap", "unwrapped", "is_fsdp", "gradient_sync"]
