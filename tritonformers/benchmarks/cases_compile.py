"""Benchmark cases for ``torch.compile`` over our models: the same tritonformers model, eager and compiled.

Per family (BLOOM, DiffLlama, I-BERT float, Reformer, FSMT), a few-layer slice of the family cases' shapes with
the same random weights (the family case modules' builders): ``compile_<family>_fwd`` (forward logits under
``no_grad`` in eval mode, compiled compared with eager) and ``compile_<family>_train`` (:mod:`.lm`'s step:
forward + LM loss + backward + AdamW; timed, not compared, since the step updates the weights). Rows: ``eager``
(the model as built: the baseline and oracle) and ours, ``torch.compile(model)`` (default mode, graph breaks
allowed, as a user would write it) with the backend the case's shape names in ``compiler``: Inductor on CUDA,
``aot_eager`` in the CPU smoke run (Dynamo, fake tensors and AOTAutograd through our custom ops, without
Inductor's C++ code generation, which takes minutes on a small CPU).

Compilation never falls into the timed calls: the compiled impl starts from a reset Dynamo (no guards or
automatic dynamic shapes left by an earlier case) and compiles in ``prepare``, in a warm-up forward (the
forward case) or in :mod:`.lm`'s untimed first training step. On CUDA both rows run our Triton kernels (the
eager row's ``auto`` backend picks them for CUDA tensors); on CPU the eager row runs the reference path and
the compiled row the runner's backend for ours. The layer counts are small to keep Inductor's compile time
(it unrolls the layers) short; per-layer speed does not depend on depth.
"""

from __future__ import annotations

import torch

from . import cases_bloom, cases_diffllama, cases_fsmt, cases_ibert, cases_reformer, lm
from .registry import Case, register

# the backend of torch.compile, a case-level choice recorded with the shape (a column of the results)
COMPILERS = {"gpu": "inductor", "cpu": "aot_eager"}
LAYERS = 4  # layers of the GPU shapes (FSMT: encoder and decoder each)


def _ibert(which, shape, dtype, device):
    """Our IBertForMaskedLM on the float path (quant_mode=False) with its own random initialisation (HF's)."""
    from tritonformers.models.ibert import IBertConfig, IBertForMaskedLM
    torch.manual_seed(0)
    return IBertForMaskedLM(cases_ibert._ibert_config(IBertConfig, shape, quant_mode=False)).to(device, dtype)


_FSMT = {k: v for k, v in cases_fsmt._WMT19_EN_DE.items() if k not in ("src", "new")}
_FSMT_TINY = {k: v for k, v in cases_fsmt._TINY.items() if k not in ("src", "new")}

# family: (builder of ours, model class, forward keyword arguments, GPU shape, CPU shape, check tolerance)
FAMILIES = {
    "bloom": (cases_bloom._make_model, "BloomForCausalLM", {"use_cache": False},
              {**cases_bloom._SHAPE_560M, "layers": LAYERS, "B": 2, "N": 2048}, {**cases_bloom._TINY, "B": 2, "N": 32},
              None),
    "diffllama": (cases_diffllama._model, "DiffLlamaForCausalLM", {"use_cache": False},
                  {**cases_diffllama._SHAPE_1B, "layers": LAYERS, "B": 1, "N": 4096},
                  {**cases_diffllama._TINY, "B": 1, "N": 32}, None),
    "ibert": (_ibert, "IBertForMaskedLM (float)", {}, {**cases_ibert._BASE, "layers": LAYERS, "B": 8, "N": 512},
              {**cases_ibert._TINY, "B": 2, "N": 16}, None),
    # LSH buckets are argmaxes: a rounding difference in bf16 can flip one (as the crime-and-punishment case)
    "reformer": (cases_reformer._make_reformer, "ReformerModelWithLMHead", {"use_cache": False},
                 {**cases_reformer._ENWIK8, "layers": cases_reformer._ENWIK8["layers"][:LAYERS], "axial": (128, 128),
                  "B": 1, "N": 16384}, {**cases_reformer._TINY_REFORMER, "B": 1, "N": 64}, 5e-2),
    "fsmt": (cases_fsmt._make_model, "FSMTForConditionalGeneration", {"use_cache": False},
             {**_FSMT, "layers": LAYERS, "B": 8, "N": 256}, {**_FSMT_TINY, "B": 2, "N": 16}, None),
}


def _model_maker(build):
    """``make_model(which, shape, dtype, device)`` for :mod:`.lm`: our model, wrapped in ``torch.compile`` with
    ``shape["compiler"]`` for "ours" (the baseline, "hf" in lm's words, is the same model eager)."""
    def make_model(which, shape, dtype, device):
        model = build("ours", shape, dtype, device)
        if which != "ours":
            return model
        torch._dynamo.reset()  # compile from scratch: nothing cached by an earlier case decides this one's graphs
        return torch.compile(model, backend=shape["compiler"])
    return make_model


def _register(family: str) -> None:
    build, cls, forward_kwargs, gpu, cpu, tol = FAMILIES[family]
    make_model = _model_maker(build)
    gpu, cpu = {**gpu, "compiler": COMPILERS["gpu"]}, {**cpu, "compiler": COMPILERS["cpu"]}
    compiled = f"torch.compile({cls}), Inductor on CUDA, aot_eager on CPU (the case's compiler)"
    tokens = lambda s: s["B"] * s["N"]  # noqa: E731
    register(Case(f"compile_{family}_fwd", setup=lm.train_setup, bound="compute", backward=False, gpu_shape=gpu,
                  cpu_shape=cpu, tokens=tokens, check_tol=tol,
                  impls=lm.forward_impls(make_model, "eager", f"{compiled}, forward", f"{cls} eager, forward",
                                         **forward_kwargs),
                  description=f"tritonformers {cls} forward logits, torch.compile vs eager"))
    register(Case(f"compile_{family}_train", setup=lm.train_setup, bound="compute", gpu_shape=gpu, cpu_shape=cpu,
                  tokens=tokens, impls=lm.train_impls(make_model, "eager", f"{compiled}, AdamW step",
                                                      f"{cls} eager, AdamW step"),
                  description=f"tritonformers {cls} training step, torch.compile vs eager (weights stepped in "
                              "place: outputs are not compared)"))


for _family in FAMILIES:
    _register(_family)
