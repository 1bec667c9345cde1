"""Benchmark cases of ``tritonformers train``: the training loop's optimizer step around our models and, with
the very same step, around transformers' models (the plain HF training loop with the same settings).

The step is :class:`tritonformers.training.loop.TrainStep`: float32 weights, autocast to the case dtype (bf16 on
CUDA; float16 would add the gradient scaler), forward + LM loss + backward, gradient clipping at 1.0, fused AdamW
(weight decay on matrices), the warmup + cosine LR schedule. It differs from ``bloom560m_train_b2_n2048`` /
``diffllama1b_train_b1_n4096`` (whose model builders and FLOP counts it reuses), which step bf16 weights without
autocast or clipping: these cases measure what a user of ``tritonformers train`` gets. A first step runs untimed
in ``prepare``, so the peak memory is measured above the weights and optimizer states. Weights are stepped in
place between calls: the outputs are not compared.
"""

from __future__ import annotations

import torch

from . import cases_bloom, cases_diffllama, lm
from .registry import OURS, Case, Impl, register


def _loop_impls(make_model, baseline: str, ours_description: str, baseline_description: str) -> list[Impl]:
    def prepare(which):
        def run(inputs: dict) -> dict:
            from tritonformers.training.loop import TrainStep
            model = make_model(which, inputs["shape"], torch.float32, inputs["device"]).train()
            step = TrainStep(model, lr=1e-5, dtype=inputs["dtype"], device=torch.device(inputs["device"]),
                             warmup_steps=10, max_steps=10**6)
            ids = inputs["input_ids"]
            state = {**inputs, "model": model, "step": step, "batch": {"input_ids": ids, "labels": ids},
                     "terms": ids.shape[0] * (ids.shape[1] - 1)}
            _step(state)
            return state
        return run

    def forward_loss(i):
        with i["step"].autocast():
            return lm.forward_loss(i)
    return [Impl(OURS, forward_loss, fwd_bwd=_step, prepare=prepare("ours"), comparable=False,
                 description=ours_description),
            Impl(baseline, forward_loss, fwd_bwd=_step, prepare=prepare("hf"), comparable=False,
                 description=baseline_description)]


def _step(i):
    return i["step"]([i["batch"]], [i["terms"]])


def _loop_case(name: str, family, make_model, gpu_shape: dict, cpu_shape: dict, model_class: str,
               baseline: str) -> Case:
    """A loop case at a family case module's shapes, with its FLOP count and model builder."""
    hf = f"transformers' {model_class}" + (" (sdpa)" if baseline == "hf_sdpa" else "")
    return Case(name, setup=lm.train_setup, bound="compute", flops=family._train_flops, gpu_shape=gpu_shape,
                cpu_shape=cpu_shape, tokens=lambda s: s["B"] * s["N"],
                impls=_loop_impls(make_model, baseline, f"tritonformers train's step, {model_class}",
                                  f"the same step around {hf}"),
                description="tritonformers train's optimizer step (float32 weights, autocast, clipping, AdamW, "
                            "schedule)")


register(
    _loop_case("train_loop_bloom560m_b2_n2048", cases_bloom, cases_bloom._make_model,
               {**cases_bloom._SHAPE_560M, "B": 2, "N": 2048}, {**cases_bloom._TINY, "B": 2, "N": 32},
               "BloomForCausalLM", "hf_eager"),
    _loop_case("train_loop_diffllama1b_b1_n4096", cases_diffllama, cases_diffllama._model,
               {**cases_diffllama._SHAPE_1B, "B": 1, "N": 4096}, {**cases_diffllama._TINY, "B": 1, "N": 32},
               "DiffLlamaForCausalLM", "hf_sdpa"),
)
