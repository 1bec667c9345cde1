"""pytest-benchmark harness for the registered benchmark cases (``pytest bench/ --benchmark-only``).

``TRITON_INTERPRET=1`` must be in the environment before anything imports triton (transformers,
torch._dynamo and flex_attention do), so it is set here first, and only where there is no CUDA device.
"""

import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "slow: large shapes or long runs; CI deselects them, the GPU check runs them")
    config.addinivalue_line("markers", "cuda: needs a CUDA device (bf16 kernels, timings)")
    # pyproject's addopts carries --benchmark-disable so that `pytest tests` never times anything, and
    # pytest-benchmark refuses --benchmark-only together with it; asking for --benchmark-only here means
    # the timings are wanted, so enable them (this runs before pytest-benchmark reads the options).
    if config.getoption("benchmark_only", default=False) and config.getoption("benchmark_disable", default=False):
        config.option.benchmark_enable = True
