"""Test harness: the interpreter on CPU, the device and backend fixtures, the slow marker.

``TRITON_INTERPRET=1`` must be in the environment before anything imports triton (transformers,
torch._dynamo and flex_attention do), so it is set here, before any other import that could pull it in,
and only where there is no CUDA device.
"""

import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# triton 3.9 warns on every launch that leaves FMA contraction to a default it plans to change; keep it on
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

from tritonformers import runtime  # noqa: E402

CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: large shapes or long runs; CI deselects them, the GPU check runs them")
    config.addinivalue_line("markers", "cuda: needs a CUDA device (bf16 kernels, timings)")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when present, else the CPU (where Triton kernels run through the interpreter)."""
    return torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Run the test once on the PyTorch reference path and once on the Triton kernels."""
    with runtime.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(0)
    yield
