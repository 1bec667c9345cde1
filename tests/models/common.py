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


def hf_names(names):
    """transformers' current spelling of field/argument names: ``past_key_values`` became ``cache`` in 5.25,
    so against an older transformers our ``cache`` is compared with its ``past_key_values``."""
    from tests.helpers import transformers_version

    old = transformers_version() < (5, 25)
    return ["cache" if old and n == "past_key_values" else n for n in names]


def assert_output_fields_match_hf(ours_module, names):
    """Each output dataclass has transformers' field names in transformers' order."""
    import dataclasses

    import transformers

    for name in names:
        theirs = getattr(transformers.modeling_outputs, name, None) or getattr(transformers, name)
        ours = getattr(ours_module, name)
        assert [f.name for f in dataclasses.fields(ours)] == hf_names(f.name for f in dataclasses.fields(theirs)), name


def assert_forward_arguments_match_hf(ours_module, prefix: str):
    """transformers' named forward arguments of every ``<prefix>...`` class appear in ours, in the same order
    (ours may add more after them); so keyword and positional calls written for HF work unchanged."""
    import inspect

    import transformers

    def named(fn):
        return [p.name for p in inspect.signature(fn).parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]

    checked = 0
    for name in dir(ours_module):
        if not (name.startswith(prefix) and hasattr(transformers, name) and hasattr(getattr(ours_module, name), "forward")):
            continue
        ours, theirs = named(getattr(ours_module, name).forward), hf_names(named(getattr(transformers, name).forward))
        positions = [ours.index(n) if n in ours else -1 for n in theirs]
        assert -1 not in positions and positions == sorted(positions), f"{name}: {ours} vs HF {theirs}"
        checked += 1
    assert checked >= 2, f"no {prefix} classes compared"


def assert_both_cache_spellings_work(model, ids):
    """``cache=`` and the deprecated ``past_key_values=`` feed the same cache (with a FutureWarning), the
    output's ``past_key_values`` reads ``cache`` (with a warning), and giving both is an error naming them."""
    import pytest

    with torch.no_grad():
        first = model(ids[:, :-1], use_cache=True)
        assert first.cache is not None
        with pytest.warns(FutureWarning, match="past_key_values"):
            assert first.past_key_values is first.cache
        new = model(ids[:, -1:], cache=first.cache).logits
        again = model(ids[:, :-1], use_cache=True).cache
        with pytest.warns(FutureWarning, match="past_key_values"):
            old = model(ids[:, -1:], past_key_values=again).logits
        torch.testing.assert_close(new, old, rtol=0, atol=0)
        with pytest.raises(ValueError, match="cache.*past_key_values"):
            model(ids[:, -1:], cache=again, past_key_values=again)
