"""The shared flash-attention host helpers: which autotune tiles a launch may take (the GPU lists, picked as
they are on a GPU; the kernels themselves are tested per family)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from tritonformers import runtime
from tritonformers.kernels import attention, flash, local_attention, lsh_attention


@triton.jit
def _tile_kernel(Q, OUT, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.store(OUT + tl.arange(0, BLOCK_M), tl.zeros([BLOCK_M], dtype=tl.float32))


HALF = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]
FP32 = {64: [(64, 32, 8, 2), (32, 32, 8, 1)], 128: [(32, 16, 8, 1), (16, 16, 8, 2)]}


@pytest.fixture
def gpu_lists(monkeypatch):
    """Autotune config lists as on a GPU (the CPU only builds them; nothing is launched)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runtime, "interpreter_enabled", lambda: False)
    monkeypatch.delenv("TRITONFORMERS_AUTOTUNE", raising=False)


def _tiles(configs):
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]


def _pick(tuner, dtype, head_dim, **extra):
    named = {"Q": torch.empty(1, dtype=dtype), "OUT": torch.empty(1)}
    return _tiles(tuner.early_config_prune(tuner.configs, named, BLOCK_D=head_dim, **extra))


def test_float32_operands_take_their_own_tiles_by_head_dim(gpu_lists):
    tuner = flash.autotuned(_tile_kernel, HALF, ["BLOCK_D"], fp32_tiles=FP32)
    assert _tiles(tuner.configs) == HALF + FP32[64] + FP32[128]
    for dtype in (torch.float16, torch.bfloat16):
        assert _pick(tuner, dtype, 64) == HALF
        assert _pick(tuner, dtype, 256) == [(64, 64, 4, 3)]  # the wide-head prune still applies
    assert _pick(tuner, torch.float32, 32) == FP32[64]
    assert _pick(tuner, torch.float32, 64) == FP32[64]
    assert _pick(tuner, torch.float32, 128) == FP32[128]
    assert _pick(tuner, torch.float32, 256) == FP32[128]  # wider heads: the widest pool


def test_float32_pools_go_through_the_chunk_prune(gpu_lists):
    tuner = flash.autotuned(_tile_kernel, HALF, ["BLOCK_D"], flash.prune_to_chunk, fp32_tiles=FP32)
    assert _pick(tuner, torch.float32, 64, C=32) == [(32, 32, 8, 1)]
    assert _pick(tuner, torch.float32, 64, C=16) == [(16, 16, 8, 1)]  # none fits: the smallest, shrunk
    assert _pick(tuner, torch.bfloat16, 64, C=64) == [(64, 64, 4, 3)]


def test_first_tile_mode_keeps_one_tile_per_pool(gpu_lists, monkeypatch):
    monkeypatch.setenv("TRITONFORMERS_AUTOTUNE", "first")
    tuner = flash.autotuned(_tile_kernel, HALF, ["BLOCK_D"], fp32_tiles=FP32)
    assert _pick(tuner, torch.bfloat16, 128) == HALF[:1]
    assert _pick(tuner, torch.float32, 128) == FP32[128][:1]


def test_interpreter_takes_one_small_tile_for_every_dtype():
    if not runtime.interpreter_enabled():
        pytest.skip("runs under the Triton interpreter")
    tuner = flash.autotuned(_tile_kernel, HALF, ["BLOCK_D"], fp32_tiles=FP32)
    assert _tiles(tuner.configs) == [(32, 32, 4, 1)]


@pytest.mark.parametrize("module", [attention, local_attention, lsh_attention], ids=lambda m: m.__name__)
def test_kernel_float32_pools_cover_both_head_dim_classes(module):
    pools = [v for k, v in vars(module).items() if k.endswith("_TILES_FP32")]
    assert len(pools) == 3  # forward, dK/dV, dQ
    for pool in pools:
        assert sorted(pool) == [64, 128] and all(pool.values())


def test_dq_tiles_are_tall_enough_for_the_dslope_partials():
    for tiles in (attention._DQ_TILES, *attention._DQ_TILES_FP32.values()):
        assert all(m >= attention._MIN_DQ_BLOCK_M for m, _, _, _ in tiles)


@triton.jit
def _split_kernel(Q, OUT, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_FACTOR: tl.constexpr):
    tl.store(OUT + tl.arange(0, BLOCK_N), tl.zeros([BLOCK_N], dtype=tl.float32))


def test_decode_float32_queries_take_their_own_configs(gpu_lists):
    fp32 = {64: [(32, 8, 3, 4)], 128: [(16, 8, 3, 4), (32, 8, 2, 8)]}

    def pick(dtype, head_dim):
        named = {"Q": torch.empty(1, dtype=dtype), "OUT": torch.empty(1)}
        return [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs["SPLIT_FACTOR"])
                for c in tuner.early_config_prune(tuner.configs, named, BLOCK_D=head_dim)]

    tuner = flash.decode_autotuned(_split_kernel, ["BLOCK_D"], fp32_configs=fp32)
    assert pick(torch.bfloat16, 128) == flash.DECODE_CONFIGS
    assert pick(torch.float32, 64) == fp32[64]
    assert pick(torch.float32, 128) == fp32[128]
    assert pick(torch.float32, 256) == fp32[128]
