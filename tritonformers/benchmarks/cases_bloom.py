"""Benchmark cases for the BLOOM family: a training step and greedy generation at BLOOM-560m's shape.

Both models get the same random weights (no hub access): transformers' BloomForCausalLM is built from the
config, and ours loads its state dict. ``bloom560m_train_b2_n2048``: forward + LM loss + backward + AdamW
step (the timed "fwd_bwd"; "fwd" is forward + loss), bf16 weights; peak memory above the state after a first
step (weights and optimizer states excluded), as DESIGN.md's anchor. ``bloom560m_greedy_b8``: prompt 128,
128 new tokens, greedy, tokens/s counts new tokens. FLOPs of a training step: 6 x parameters x tokens plus
the attention (12 x layers x hidden x N^2 x B / 2 forward+backward, causal).
"""

from __future__ import annotations

import torch

from .registry import OURS, Case, Count, Impl, register

_SHAPE_560M = {"hidden": 1024, "layers": 24, "heads": 16, "vocab": 250880}
_TINY = {"hidden": 64, "layers": 2, "heads": 4, "vocab": 512}


def _config(shape):
    from transformers import BloomConfig
    return BloomConfig(hidden_size=shape["hidden"], n_layer=shape["layers"], n_head=shape["heads"],
                       vocab_size=shape["vocab"])


def _models(shape, dtype, device):
    """(transformers model, ours) with identical weights, in train mode for the step case."""
    from transformers import BloomForCausalLM as HFBloom

    from tritonformers.models.bloom import BloomForCausalLM
    torch.manual_seed(0)
    hf = HFBloom(_config(shape)).to(device, dtype)
    ours = BloomForCausalLM(_config_ours(shape)).to(device, dtype)
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def _config_ours(shape):
    from tritonformers.models.bloom import BloomConfig
    return BloomConfig(hidden_size=shape["hidden"], n_layer=shape["layers"], n_head=shape["heads"],
                       vocab_size=shape["vocab"])


def _train_setup(shape, dtype, device) -> dict:
    ids = torch.randint(0, shape["vocab"], (shape["B"], shape["N"]), device=device)
    return {"input_ids": ids, "shape": shape, "dtype": dtype, "device": device}


def _train_prepare(which):
    def prepare(inputs: dict) -> dict:
        hf, ours = _models(inputs["shape"], inputs["dtype"], inputs["device"])
        model = ours if which == "ours" else hf
        del hf, ours
        model.train()
        optim = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
        state = {**inputs, "model": model, "optim": optim}
        _train_step(state)  # the first step allocates the optimizer states: the peak is measured above them
        return state
    return prepare


def _forward_loss(i):
    return i["model"](input_ids=i["input_ids"], labels=i["input_ids"]).loss


def _train_step(i):
    loss = _forward_loss(i)
    loss.backward()
    i["optim"].step()
    i["optim"].zero_grad(set_to_none=True)
    return loss.detach()


def _train_flops(shape) -> Count:
    h, layers, vocab = shape["hidden"], shape["layers"], shape["vocab"]
    params = layers * (12 * h * h + 13 * h) + vocab * h
    tokens = shape["B"] * shape["N"]
    attention = 4 * layers * h * shape["N"] * tokens / 2  # QK^T and PV, causal
    return Count(fwd=2 * params * tokens + attention, fwd_bwd=6 * params * tokens + 3.5 * attention)


register(Case(
    "bloom560m_train_b2_n2048", setup=_train_setup, bound="compute", flops=_train_flops,
    gpu_shape={**_SHAPE_560M, "B": 2, "N": 2048}, cpu_shape={**_TINY, "B": 2, "N": 32},
    tokens=lambda s: s["B"] * s["N"],
    impls=[Impl(OURS, _forward_loss, fwd_bwd=_train_step, prepare=_train_prepare("ours"), comparable=False,
                description="tritonformers BloomForCausalLM, fused loss, AdamW step"),
           Impl("hf_eager", _forward_loss, fwd_bwd=_train_step, prepare=_train_prepare("hf"), comparable=False,
                description="transformers BloomForCausalLM, AdamW step")],
    description="BLOOM-560m-shaped training step (weights stepped in place: outputs are not compared)"))


def _greedy_setup(shape, dtype, device) -> dict:
    ids = torch.randint(3, shape["vocab"], (shape["B"], shape["prompt"]), device=device)
    return {"input_ids": ids, "mask": torch.ones_like(ids), "shape": shape, "dtype": dtype, "device": device}


def _greedy_prepare(which):
    def prepare(inputs: dict) -> dict:
        hf, ours = _models(inputs["shape"], inputs["dtype"], inputs["device"])
        model = (ours if which == "ours" else hf).eval()
        return {**inputs, "model": model}
    return prepare


def _greedy(i):
    with torch.no_grad():
        return i["model"].generate(i["input_ids"], attention_mask=i["mask"], max_new_tokens=i["shape"]["new"],
                                   min_new_tokens=i["shape"]["new"], do_sample=False, pad_token_id=3)


register(Case(
    "bloom560m_greedy_b8", setup=_greedy_setup, bound="memory", backward=False,
    gpu_shape={**_SHAPE_560M, "B": 8, "prompt": 128, "new": 128}, cpu_shape={**_TINY, "B": 2, "prompt": 8, "new": 8},
    tokens=lambda s: s["B"] * s["new"],
    impls=[Impl(OURS, _greedy, prepare=_greedy_prepare("ours"), description="generate(), static cache, CUDA graph"),
           Impl("hf_eager", _greedy, prepare=_greedy_prepare("hf"), description="transformers generate()")],
    description="BLOOM-560m-shaped greedy generation, prompt 128, 128 new tokens (ids compared)"))
