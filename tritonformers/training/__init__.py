"""Training with the fast models: ``tritonformers train`` and, for your own scripts, :func:`train`.

    from tritonformers.training import train
    result = train(model="bloom-tiny/", data="corpus.txt", out="run/", max_steps=500, batch_size=8, seq_len=256)

The keyword arguments are the command line's flags (``--max-steps`` -> ``max_steps``; see
:class:`~tritonformers.training.options.TrainOptions`). Modules: :mod:`.families` (which families train, and
how: the registry new families join), :mod:`.data` (tokenise once, cache, pack, mask), :mod:`.loop` (the
loop), :mod:`.checkpoint` (HF directories plus the exact-resume state), :mod:`.distributed` (torchrun, DDP,
FSDP2), :mod:`.cli` (the flags). Importing this package does not import torch; :func:`train` does.
"""

from __future__ import annotations

from .families import FAMILIES, PENDING, Family, family_for, register_family
from .options import TrainOptions


def train(**options):
    """Run training; see :func:`tritonformers.training.loop.train` (imported here lazily: torch is heavy)."""
    from .loop import train as _train
    return _train(**options)


__all__ = ["train", "TrainOptions", "Family", "FAMILIES", "PENDING", "register_family", "family_for"]
