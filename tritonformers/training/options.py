"""The options of a training run: the ``tritonformers train`` flags, as keyword arguments of ``train(**options)``.

Flag ``--max-steps`` is option ``max_steps``, and so on. Plain Python (no torch), so the command line can build
its parser without importing torch.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class TrainOptions:
    """Every option of a run, with its default (see :func:`tritonformers.training.train` for the semantics).

    ``batch_size`` is per process: the global batch is ``batch_size x processes x grad_accum`` sequences.
    ``eval_every=0`` evaluates at the last step only; ``save_every=0`` writes no intermediate checkpoint.
    """

    model: str
    data: Any
    out: str
    max_steps: int = 1000
    batch_size: int = 8
    seq_len: int | None = None
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_steps: int = 0
    eval_every: int = 0
    save_every: int = 0
    seed: int = 0
    dtype: str = "float32"
    resume: str | None = None
    fsdp: bool = False
    tokenizer: str | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    max_grad_norm: float | None = 1.0
    eval_sequences: int = 128
    mlm_probability: float = 0.15
    gradient_checkpointing: bool = False
    quant_mode: bool | None = None
    text_field: str = "text"
    target_data: str | None = None
    source_field: str = "source"
    target_field: str = "target"
    device: str | None = None
    progress: bool = True

    def __post_init__(self):
        for name in ("model", "out"):
            if not isinstance(getattr(self, name), (str, os.PathLike)):
                raise TypeError(f"{name} must be a path, got {type(getattr(self, name)).__name__}")
        self.model, self.out = os.fspath(self.model), os.fspath(self.out)
        for name in ("tokenizer", "resume", "target_data"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{name} must be a path or None, got {type(value).__name__}")
            setattr(self, name, None if value is None else os.fspath(value))
        _positive(self, "max_steps", "batch_size", "grad_accum", "eval_sequences")
        _positive(self, "warmup_steps", "eval_every", "save_every", minimum=0)
        if self.seq_len is not None:
            _positive(self, "seq_len", minimum=2)
        _integer(self, "seed")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _number(self, "lr", low=0.0, low_open=True)
        _number(self, "min_lr_ratio", low=0.0, high=1.0)
        _number(self, "weight_decay", low=0.0)
        _number(self, "mlm_probability", low=0.0, high=1.0, low_open=True)
        if self.max_grad_norm is not None:
            _number(self, "max_grad_norm", low=0.0, low_open=True)
        if self.quant_mode is not None and not isinstance(self.quant_mode, bool):
            raise TypeError(f"quant_mode must be True, False or None, got {self.quant_mode!r}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def _integer(options, name: str) -> int:
    value = getattr(options, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


def _positive(options, *names: str, minimum: int = 1) -> None:
    for name in names:
        if _integer(options, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(options, name)}")


def _number(options, name: str, low: float | None = None, high: float | None = None, low_open: bool = False):
    value = getattr(options, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    setattr(options, name, float(value))


__all__ = ["DTYPES", "TrainOptions"]
