"""The backend rules of DESIGN.md and the validation helpers every launcher relies on."""

import warnings

import pytest
import torch

from tritonformers import runtime


def test_default_backend_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("TRITONFORMERS_BACKEND", raising=False)
    assert runtime.get_backend() == "auto"
    monkeypatch.setenv("TRITONFORMERS_BACKEND", "Torch")
    assert runtime.get_backend() == "torch"
    monkeypatch.setenv("TRITONFORMERS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="TRITONFORMERS_BACKEND"):
        runtime.get_backend()


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.setenv("TRITONFORMERS_BACKEND", "auto")
    with runtime.use_backend("torch"):
        assert runtime.get_backend() == "torch"
        with runtime.use_backend("triton"):
            assert runtime.get_backend() == "triton"
        assert runtime.get_backend() == "torch"
    assert runtime.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend"):
        with runtime.use_backend("numpy"):
            pass


def test_dispatch_rules_on_cpu(monkeypatch):
    x = torch.ones(2)
    with runtime.use_backend("torch"):
        assert runtime.use_triton(x, op="op") is False
    with runtime.use_backend("auto"):
        assert runtime.use_triton(x, op="op") is False  # CPU tensors take the reference under auto
    with runtime.use_backend("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert runtime.use_triton(x, op="op") is True
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="interpreter"):
            runtime.use_triton(x, op="my_op")


def test_unsupported_raises_under_triton_and_warns_once_under_auto():
    with runtime.use_backend("triton"):
        with pytest.raises(ValueError, match="head dim 7"):
            runtime.unsupported("attention", "head dim 7")
    with runtime.use_backend("auto"):
        with pytest.warns(RuntimeWarning, match="reference"):
            runtime.unsupported("attention", "a unique reason 42")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            runtime.unsupported("attention", "a unique reason 42")  # second time: silent


def test_check_tensor_names_the_argument():
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        runtime.check_tensor([1.0], "weight")
    with pytest.raises(TypeError, match="x must have dtype"):
        runtime.check_tensor(torch.ones(2, dtype=torch.int32), "x")
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        runtime.check_tensor(torch.ones(2, 3), "q", ndim=4)
    with pytest.raises(ValueError, match="at least 2"):
        runtime.check_tensor(torch.ones(2), "x", min_ndim=2)
    x = torch.ones(2, 3)
    assert runtime.check_tensor(x, "x", ndim=(2, 3)) is x


def test_shape_device_dtype_and_out_checks():
    x = torch.ones(2, 3)
    runtime.check_shape(x, "x", (2, None))
    with pytest.raises(ValueError, match=r"bias must have shape \[3\]"):
        runtime.check_shape(torch.ones(4), "bias", (3,))
    assert runtime.check_same_device(a=x, b=None, c=x) == x.device
    with pytest.raises(TypeError, match="b has dtype"):
        runtime.check_same_dtype(a=x, b=x.half())
    out = runtime.check_out(None, "out", x)
    assert out.shape == x.shape and out.dtype == x.dtype
    with pytest.raises(ValueError, match="out must have shape"):
        runtime.check_out(torch.empty(3, 2), "out", x)
    with pytest.raises(TypeError, match="out must have dtype"):
        runtime.check_out(torch.empty(2, 3, dtype=torch.float16), "out", x)
    with pytest.raises(ValueError, match="contiguous"):
        runtime.check_out(torch.empty(3, 2).t(), "out", x)


def test_small_helpers():
    assert [runtime.next_power_of_2(n) for n in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]
    assert runtime.autotune_configs([1, 2, 3]) == ([1, 2, 3] if torch.cuda.is_available()
                                                   and not runtime.interpreter_enabled() else [1])
    x = torch.arange(24.0).view(2, 3, 4).transpose(0, 1)
    rows = runtime.as_rows(x)
    assert rows.shape == (6, 4) and rows.is_contiguous()
    assert torch.equal(rows.view(3, 2, 4), x)


def test_derived_once_reuses_only_for_the_same_unmodified_tensor():
    calls = []

    def compute(m):
        calls.append(1)
        return m.cumsum(-1)

    mask = torch.ones(2, 5, dtype=torch.long)
    first = runtime.derived_once(mask, "test", compute)
    assert runtime.derived_once(mask, "test", compute) is first and len(calls) == 1  # the next layer reuses
    mask[:, 0] = 0  # an in-place step update bumps the version: recomputed
    assert torch.equal(runtime.derived_once(mask, "test", compute), mask.cumsum(-1)) and len(calls) == 2
    other = mask.clone()  # equal values, another tensor: recomputed
    runtime.derived_once(other, "test", compute)
    assert len(calls) == 3
    with torch.inference_mode():
        frozen = torch.ones(2, 5, dtype=torch.long)
    runtime.derived_once(frozen, "test", compute)
    runtime.derived_once(frozen, "test", compute)
    assert len(calls) == 5  # inference tensors have no version counter: never cached


def test_autotune_mode(monkeypatch):
    configs = ["a", "b", "c"]
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runtime, "interpreter_enabled", lambda: False)
    monkeypatch.delenv("TRITONFORMERS_AUTOTUNE", raising=False)
    assert runtime.autotune_configs(configs) == configs
    monkeypatch.setenv("TRITONFORMERS_AUTOTUNE", "first")
    assert runtime.autotune_configs(configs) == ["a"]
    monkeypatch.setenv("TRITONFORMERS_AUTOTUNE", "some")
    with pytest.raises(ValueError, match="TRITONFORMERS_AUTOTUNE"):
        runtime.autotune_configs(configs)
