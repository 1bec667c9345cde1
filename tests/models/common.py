"""What the model parity tests share: padded random inputs, LM labels that skip pad positions, comparisons."""

from __future__ import annotations

import torch

TOL = dict(atol=2e-5, rtol=1e-5)  # the reference path against transformers, float32


def lm_inputs(vocab: int, padding: str | None, pad: int, batch: int = 2, length: int = 10, seed: int = 0):
    """Random ids and a mask; row 0 padded by 3 on the given side ("left", "right" or None)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(pad + 1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :3] = 0
    elif padding == "right":
        mask[0, -3:] = 0
    ids[mask == 0] = pad
    return ids, mask


def lm_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Labels ignoring pads and every target predicted from a pad position (garbage in HF, 0 in ours)."""
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return labels


def close(actual, expected, mask=None, tol=TOL, msg=""):
    """Compare on real positions ([B, T, ...] tensors with a [B, T] mask), requiring finite values."""
    assert actual.shape == expected.shape, f"{msg}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{msg}: non-finite values"
    if mask is not None:
        actual, expected = actual[mask.bool()], expected[mask.bool()]
    torch.testing.assert_close(actual.float(), expected.float(), **tol, msg=msg or None)
