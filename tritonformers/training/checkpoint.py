"""Checkpoints: HF model directories plus the training state that makes a resumed run exact.

``OUT/checkpoint-<step>/`` holds what ``save_pretrained`` writes (config.json, model.safetensors), the tokenizer
files, and ``training_state.pt``: step, data position, optimizer, LR scheduler and grad scaler states, and the
RNG states (Python, torch CPU, CUDA) of every rank. The model and optimizer states are gathered with
``torch.distributed.checkpoint.state_dict`` as full (unsharded) state dicts keyed by parameter name, so one
checkpoint serves one process, DDP and FSDP2 alike, and the directory loads as a plain HF checkpoint (with
``from_pretrained`` here or in transformers). Writing goes to ``<dir>.tmp`` first, renamed when complete.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import warnings
from pathlib import Path

import torch

from ..models.loading import save_state_dict
from .distributed import Distributed, is_fsdp, unwrapped

STATE_FILE = "training_state.pt"
_FORMAT = 1


def _full_options(ctx: Distributed):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=ctx.enabled)


def save_model(model: torch.nn.Module, directory: Path, ctx: Distributed) -> None:
    """The model as an HF directory (collective under FSDP: every rank calls, rank 0 writes)."""
    raw = unwrapped(model)
    if not is_fsdp(model):
        if ctx.is_main:
            raw.save_pretrained(directory)
        return
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    state = get_model_state_dict(model, options=_full_options(ctx))
    if ctx.is_main:  # save_pretrained's steps, with the gathered weights instead of the local shards
        config = copy.deepcopy(raw.config)
        config.architectures = [type(raw).__name__]
        config.dtype = next(v.dtype for v in state.values() if v.is_floating_point())
        config.save_pretrained(directory)
        save_state_dict(state, directory, "50GB", tied_keys=raw.all_tied_weights_keys)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, *, model, optimizer, scheduler, scaler, tokenizer, step: int, position: int,
                    ctx: Distributed, extra: dict) -> None:
    """A resumable checkpoint in ``directory`` (collective: every rank calls)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    tmp = directory.with_name(directory.name + ".tmp")
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    save_model(model, tmp, ctx)
    optim = get_optimizer_state_dict(model, optimizer, options=_full_options(ctx))
    rngs = ctx.gather(rng_state())
    if ctx.is_main:
        tokenizer.save_pretrained(tmp)
        torch.save({"format": _FORMAT, "step": step, "position": position, "world_size": ctx.world,
                    "optimizer": optim, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "rng": rngs, **extra}, tmp / STATE_FILE)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    ctx.barrier()


def check_resumable(directory: str) -> Path:
    """``directory`` as a checkpoint to resume from, else a clear error (before anything is built)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"resume: no such checkpoint directory {directory!r}")
    if not (d / STATE_FILE).is_file():
        raise ValueError(f"resume: {directory!r} holds no training state ({STATE_FILE}); pass an "
                         "OUT/checkpoint-<step> directory written with save_every")
    return d


def load_training_state(directory: Path) -> dict:
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    if state.get("format") != _FORMAT:
        raise ValueError(f"resume: {directory / STATE_FILE} has format {state.get('format')!r}, expected {_FORMAT}")
    return state


def restore(state: dict, *, model, optimizer, scheduler, scaler, ctx: Distributed) -> None:
    """Optimizer, scheduler, scaler and this rank's RNG from ``state`` (the weights were loaded with the model)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    # not strict: a parameter that has had no gradient yet has no AdamW state, in the saved run as in this one
    set_optimizer_state_dict(model, optimizer, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True, strict=False))
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if state["world_size"] == ctx.world:
        set_rng_state(state["rng"][ctx.rank])
    else:
        warnings.warn(f"resume: the checkpoint was written by {state['world_size']} process(es), this run has "
                      f"{ctx.world}: data order and position continue, but the RNG streams (dropout) restart "
                      "from rank 0's state, so the run is not bit-identical to an uninterrupted one", stacklevel=2)
        set_rng_state(state["rng"][0])


__all__ = ["STATE_FILE", "save_model", "save_checkpoint", "check_resumable", "load_training_state", "restore",
           "rng_state", "set_rng_state"]
