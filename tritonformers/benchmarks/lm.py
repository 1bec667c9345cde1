"""What the language-model cases share: forward logits, a training step and greedy generation, for any family.

A family's cases module supplies ``make_model(which, shape, dtype, device)`` (``which`` is "ours" or "hf": both
built with the same random weights; "hf" names the baseline, which a compile case makes our eager model) and
registers :func:`forward_impls` / :func:`train_impls` / :func:`greedy_impls` with :func:`train_setup` /
:func:`greedy_setup`. The step is forward + LM loss + backward + AdamW (a first step runs
untimed in ``prepare``, so the optimizer states exist and the peak is measured above them, as DESIGN.md's
anchor); generation is greedy with exactly ``shape["new"]`` new tokens, whose ids are compared.
"""

from __future__ import annotations

import torch

from .registry import OURS, Impl

# why the training impls are timed but not checked (shown as "not compared (...)" in the results)
TRAIN_NOT_COMPARED = "a training step: it updates the weights in place"


def train_setup(shape, dtype, device) -> dict:
    ids = torch.randint(0, shape["vocab"], (shape["B"], shape["N"]), device=device)
    return {"input_ids": ids, "shape": shape, "dtype": dtype, "device": device}


def forward_loss(i):
    return i["model"](input_ids=i["input_ids"], labels=i["input_ids"]).loss


def train_step(i):
    loss = forward_loss(i)
    loss.backward()
    i["optim"].step()
    i["optim"].zero_grad(set_to_none=True)
    return loss.detach()


def train_impls(make_model, baseline: str, ours_description: str, baseline_description: str) -> list[Impl]:
    def prepare(which):
        def run(inputs: dict) -> dict:
            model = make_model(which, inputs["shape"], inputs["dtype"], inputs["device"]).train()
            state = {**inputs, "model": model, "optim": torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)}
            train_step(state)
            return state
        return run
    return [Impl(OURS, forward_loss, fwd_bwd=train_step, prepare=prepare("ours"), not_compared=TRAIN_NOT_COMPARED,
                 description=ours_description),
            Impl(baseline, forward_loss, fwd_bwd=train_step, prepare=prepare("hf"), not_compared=TRAIN_NOT_COMPARED,
                 description=baseline_description)]


def eval_prepare(make_model, which, warm_up=None):
    """An impl's ``prepare``: the model built by ``make_model(which, ...)`` in eval mode under ``inputs["model"]``,
    then ``warm_up(inputs)`` once when given (a compiled model compiles there, outside the timed calls)."""
    def run(inputs: dict) -> dict:
        state = {**inputs, "model": make_model(which, inputs["shape"], inputs["dtype"], inputs["device"]).eval()}
        if warm_up is not None:
            warm_up(state)
        return state
    return run


def forward_impls(make_model, baseline: str, ours_description: str, baseline_description: str,
                  **forward_kwargs) -> list[Impl]:
    """Forward logits [B, N, V] of ``model(input_ids=..., **forward_kwargs)`` under ``no_grad`` (compared; a
    first call runs in ``prepare``), ours and the baseline built by ``make_model``, on :func:`train_setup`'s ids."""
    def forward(i):
        with torch.no_grad():
            return i["model"](input_ids=i["input_ids"], **forward_kwargs).logits
    return [Impl(OURS, forward, prepare=eval_prepare(make_model, "ours", forward), description=ours_description),
            Impl(baseline, forward, prepare=eval_prepare(make_model, "hf", forward),
                 description=baseline_description)]


def greedy_setup(shape, dtype, device) -> dict:
    ids = torch.randint(3, shape["vocab"], (shape["B"], shape["prompt"]), device=device)
    return {"input_ids": ids, "mask": torch.ones_like(ids), "shape": shape, "dtype": dtype, "device": device}


def greedy_impls(make_model, pad_token_id: int, baseline: str, ours_description: str,
                 baseline_description: str) -> list[Impl]:
    def greedy(i):
        with torch.no_grad():
            new = i["shape"]["new"]
            return i["model"].generate(i["input_ids"], attention_mask=i["mask"], max_new_tokens=new,
                                       min_new_tokens=new, do_sample=False, pad_token_id=pad_token_id)
    return [Impl(OURS, greedy, prepare=eval_prepare(make_model, "ours"), description=ours_description),
            Impl(baseline, greedy, prepare=eval_prepare(make_model, "hf"), description=baseline_description)]
