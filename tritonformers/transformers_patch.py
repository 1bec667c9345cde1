"""``accelerate(model)``: put tritonformers' kernels into a transformers model in place.

The model keeps its class, its parameters (the same tensors: optimizer state and ``state_dict`` keys are
untouched) and its forward; the modules that compute attention, norms and activations are switched to ours,
either by giving the module our class (``module.__class__``: a subclass of HF's, or our drop-in with the
same attributes) or by replacing a parameterless child (an activation). Every module of a kind that is
switched must be a class this file knows, with the forward signature it was written against; anything else
(an unknown architecture, a transformers release that changed a module) raises before any module changes,
never a partial patch. A second call is a no-op; :func:`restore` undoes it.

Adding a family is an entry in :data:`FAMILIES`: for each HF class, the kind (attention, norms,
activations) and how to switch it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Callable

import torch
from torch import nn

from . import nn as tnn
from .kernels.attention import alibi_slopes
from .nn import functional as F

NOT_YET = {"reformer": "Reformer", "fsmt": "FSMT"}
"""Families whose tritonformers models are still in progress: refused with a clear error."""

KINDS = ("attention", "norms", "activations", "loss")


# -------------------------------------------------------------------------------------- BLOOM attention

def _bloom_attention_class(hf_module):
    """HF's BloomAttention with its softmax(QK^T + alibi)V done by :func:`tritonformers.nn.functional.attention`."""
    base = hf_module.BloomAttention

    class BloomAttention(base):
        """BloomAttention on the fused ALiBi attention kernel (same parameters; HF's path for
        ``output_attentions`` and tensor-parallel slicing, which need the probabilities or HF's rounding)."""

        def forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                    output_attentions=False, **kwargs):
            if output_attentions or (self.pretraining_tp > 1 and self.slow_but_exact):
                return super().forward(hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                       use_cache=use_cache, output_attentions=output_attentions, **kwargs)
            B, T, _ = hidden_states.shape
            q, k, v = self._reshape(self.query_key_value(hidden_states))
            if layer_past is not None:
                k, v = layer_past.update(k, v, self.layer_idx)
            keep = None
            if attention_mask is not None:  # [B, 1, T, Nk]: the last query sees every real key (bottom-right causal)
                last = attention_mask[:, 0, -1, :]
                keep = last if last.dtype == torch.bool else last == 0
            ctx = F.attention(q, k, v, causal=True, alibi_slopes=alibi_slopes(self.num_heads, q.device),
                              key_padding_mask=keep, scale=self.inv_norm_factor,
                              dropout_p=self.attention_dropout.p if self.training else 0.0)
            out = self.dense(ctx.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
            return hf_module.dropout_add(out, residual, self.hidden_dropout, self.training), None

    return BloomAttention


# ---------------------------------------------------------------------------------------- DiffLlama MLP

def _swiglu_mlp_class(base):
    """A Llama-style MLP (gate/up/down) whose ``act_fn(gate) * up`` is :func:`~tritonformers.nn.functional.swiglu`."""

    class SwiGLUMLP(base):
        def forward(self, x):
            return self.down_proj(F.swiglu(self.gate_proj(x), self.up_proj(x)))

    SwiGLUMLP.__name__ = SwiGLUMLP.__qualname__ = base.__name__
    return SwiGLUMLP


def _is_silu(mlp) -> bool:
    return isinstance(mlp.act_fn, nn.SiLU) or type(mlp.act_fn).__name__ == "SiLUActivation"


# ----------------------------------------------------------------------------------------------- registry

@dataclasses.dataclass(frozen=True)
class Rule:
    """How to switch one HF class: ``kind``, the HF class name, the forward parameters it was written for,
    and either ``cls`` (our class for ``module.__class__``, given the HF module) or ``child`` (a factory of
    the replacement module); ``applies`` can leave an instance alone (an MLP whose activation is not SiLU)."""

    kind: str
    hf_class: str
    forward_params: tuple[str, ...]
    cls: Callable | None = None
    child: Callable | None = None
    applies: Callable = lambda module: True


@dataclasses.dataclass(frozen=True)
class Family:
    module: str
    rules: tuple[Rule, ...]


def _ours(cls):
    return lambda hf_module: cls


FAMILIES: dict[str, Family] = {
    "bloom": Family("transformers.models.bloom.modeling_bloom", (
        Rule("attention", "BloomAttention", ("self", "hidden_states", "residual", "alibi", "attention_mask",
                                             "layer_past", "use_cache", "output_attentions", "kwargs"),
             cls=_bloom_attention_class),
        Rule("norms", "LayerNorm", ("self", "input"), cls=_ours(tnn.LayerNorm)),
        Rule("activations", "BloomGelu", ("self", "x"), child=lambda m: tnn.GELU("bloom")),
    )),
    "diffllama": Family("transformers.models.diffllama.modeling_diffllama", (
        Rule("norms", "DiffLlamaRMSNorm", ("self", "hidden_states"), cls=_ours(tnn.RMSNorm)),
        Rule("activations", "DiffLlamaMLP", ("self", "x"),
             cls=lambda hf: _swiglu_mlp_class(hf.DiffLlamaMLP), applies=_is_silu),
    )),
    "ibert": Family("transformers.models.ibert.modeling_ibert", (
        Rule("norms", "LayerNorm", ("self", "input"), cls=_ours(tnn.LayerNorm)),
    )),
}


# ------------------------------------------------------------------------------------------------ apply

@dataclasses.dataclass
class Summary:
    """What :func:`accelerate` switched: per kind, the module paths; and what it left as HF's."""

    family: str
    replaced: dict[str, list[str]]
    kept: dict[str, str]
    _undo: list = dataclasses.field(default_factory=list, repr=False)

    def __str__(self) -> str:
        parts = [f"{kind}: {len(paths)} module(s)" for kind, paths in self.replaced.items() if paths]
        parts += [f"{kind}: kept ({why})" for kind, why in self.kept.items()]
        return f"tritonformers.accelerate({self.family}): " + "; ".join(parts)


_ATTR = "_tritonformers_accelerated"


def _family(model: nn.Module) -> tuple[str, Family]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in NOT_YET:
        raise NotImplementedError(f"accelerate: the {NOT_YET[model_type]} family is not supported yet "
                                  "(its tritonformers model is still in progress)")
    if model_type not in FAMILIES:
        raise ValueError(f"accelerate: unsupported model {type(model).__name__} (model_type {model_type!r}); "
                         f"supported: {sorted(FAMILIES)}")
    return model_type, FAMILIES[model_type]


def _check_rule(hf, rule: Rule) -> type:
    hf_cls = getattr(hf, rule.hf_class, None) if rule.hf_class != "LayerNorm" else nn.LayerNorm
    if hf_cls is None:
        raise RuntimeError(f"accelerate: this transformers release has no {rule.hf_class} in {hf.__name__}; "
                           "refusing to patch a model it does not recognise")
    params = tuple(inspect.signature(hf_cls.forward).parameters)
    if params != rule.forward_params:
        raise RuntimeError(f"accelerate: {rule.hf_class}.forward{params} differs from the signature this "
                           f"version of tritonformers was written for {rule.forward_params}; refusing to patch")
    return hf_cls


def accelerate(model: nn.Module, *, attention: bool = True, norms: bool = True, activations: bool = True,
               loss: bool = True) -> nn.Module:
    """Switch a transformers model's attention, norm and activation modules to tritonformers' kernels, in
    place, and return the model. The summary is ``model.tritonformers_summary`` (also logged on debug).

    Raises ``ValueError`` for an unsupported architecture, ``NotImplementedError`` for a family whose model
    has not landed yet (Reformer, FSMT), ``RuntimeError`` for a transformers release whose modules differ.
    ``loss``: HF's heads compute the loss from the full logits, so the fused linear cross-entropy needs the
    head's forward itself; it is kept as HF's for now (listed under ``kept``).
    """
    if getattr(model, _ATTR, None) is not None:
        return model
    name, family = _family(model)
    hf = importlib.import_module(family.module)
    wanted = {"attention": attention, "norms": norms, "activations": activations, "loss": loss}
    rules = [(rule, _check_rule(hf, rule)) for rule in family.rules if wanted[rule.kind]]
    summary = Summary(name, {kind: [] for kind in KINDS}, {})
    if loss:
        summary.kept["loss"] = "HF's heads take the loss from full logits; use tritonformers.models for the fused loss"
    if attention and not any(r.kind == "attention" for r in family.rules):
        summary.kept["attention"] = "no kernel swap for this family's HF attention yet"
    plan = []
    for path, module in model.named_modules():
        for rule, hf_cls in rules:
            if type(module) is hf_cls and rule.applies(module):
                plan.append((path, module, rule))
    for path, module, rule in plan:
        if rule.cls is not None:
            summary._undo.append(("class", module, module.__class__))
            module.__class__ = rule.cls(hf)
            if isinstance(module, tnn.RMSNorm) and "hidden_size" not in vars(module):
                module.hidden_size = module.weight.shape[0]  # our extra_repr reads it
        else:
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            summary._undo.append(("child", parent, attr, module))
            setattr(parent, attr, rule.child(module))
        summary.replaced[rule.kind].append(path)
    setattr(model, _ATTR, summary)
    return model


def summary(model: nn.Module) -> Summary | None:
    """What :func:`accelerate` did to ``model`` (None if it was not accelerated)."""
    return getattr(model, _ATTR, None)


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate`: HF's classes and modules back, parameters untouched."""
    record = getattr(model, _ATTR, None)
    if record is None:
        return model
    for entry in reversed(record._undo):
        if entry[0] == "class":
            entry[1].__class__ = entry[2]
        else:
            setattr(entry[1], entry[2], entry[3])
    delattr(model, _ATTR)
    return model


__all__ = ["accelerate", "restore", "summary", "Summary", "FAMILIES", "NOT_YET"]
