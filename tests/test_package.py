"""The package's top-level names (``import tritonformers``), which the README's examples use."""

from __future__ import annotations

import warnings

import pytest

import tritonformers
from tritonformers import transformers_patch


def test_top_level_names_exist():
    assert {"accelerate", "restore", "HFFallbackWarning", "get_backend", "use_backend"} <= set(tritonformers.__all__)
    for name in tritonformers.__all__:
        assert hasattr(tritonformers, name), name


def test_hf_fallback_warning_filters_by_its_top_level_name():
    """A user silences (or escalates) accelerate's fallback warnings with ``tritonformers.HFFallbackWarning``."""
    assert tritonformers.HFFallbackWarning is transformers_patch.HFFallbackWarning
    assert issubclass(tritonformers.HFFallbackWarning, UserWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tritonformers.HFFallbackWarning)
        with pytest.raises(tritonformers.HFFallbackWarning, match="runs HF's forward for this call: why"):
            transformers_patch._warn_fallback(object(), "why")
        warnings.simplefilter("ignore", tritonformers.HFFallbackWarning)
        transformers_patch._warn_fallback(object(), "why")  # silenced: no error
