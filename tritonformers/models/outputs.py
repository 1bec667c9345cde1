"""What every family's models return, and the head arithmetic they share.

Output classes carry transformers' names and field order and behave like its ``ModelOutput`` (attribute,
key and index access; ``to_tuple`` drops the fields that are None). The helpers are HF's head rules:
``logits_to_keep`` selection, the causal-LM label shift, the sequence-classification losses.

Cache naming follows transformers >= 5.25: the forward argument and the output field are ``cache``; the older
``past_key_values`` still works (a keyword argument through :func:`cache_argument`, a read-only attribute on
outputs), with a deprecation warning, as transformers does.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
import torch.nn.functional as F


def _warn_past_key_values() -> None:
    # Python's default filter shows a FutureWarning once per calling line, as transformers' warning_once does.
    warnings.warn("`past_key_values` is deprecated (transformers 5.25 renamed it): use `cache` instead",
                  FutureWarning, stacklevel=3)


def cache_argument(cache, kwargs: dict):
    """The cache a forward was given: ``cache=``, or the deprecated ``past_key_values=`` popped from its
    ``**kwargs`` (with a FutureWarning). Both at once is an error naming them."""
    if "past_key_values" not in kwargs:
        return cache
    old = kwargs.pop("past_key_values")
    if cache is not None:
        raise ValueError("pass either `cache` or `past_key_values` (its deprecated name), not both")
    _warn_past_key_values()
    return old


class ModelOutput:
    """Base of the output dataclasses, behaving like transformers' ``ModelOutput``.

    Fields are attributes; ``out["logits"]`` reads one (KeyError when it is None), ``out[i]`` / ``out[a:b]``
    index :meth:`to_tuple` (the fields that are not None, in order), and ``keys()``/``values()``/
    ``items()``/``in``/iteration see the non-None fields only, as HF's dict-based outputs do.
    ``past_key_values`` reads the ``cache`` field under its deprecated name.
    """

    @property
    def past_key_values(self):
        if not any(f.name == "cache" for f in dataclasses.fields(self)):
            raise AttributeError(f"{type(self).__name__} has no cache")
        _warn_past_key_values()
        return self.cache

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list:
        return list(self.to_tuple())

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


@dataclasses.dataclass(eq=False)
class BaseModelOutputWithPastAndCrossAttentions(ModelOutput):
    last_hidden_state: torch.Tensor = None
    cache: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    cross_attentions: tuple | None = None


@dataclasses.dataclass(eq=False)
class CausalLMOutputWithCrossAttentions(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    cross_attentions: tuple | None = None


@dataclasses.dataclass(eq=False)
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor = None
    cache: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclasses.dataclass(eq=False)
class SequenceClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclasses.dataclass(eq=False)
class MaskedLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclasses.dataclass(eq=False)
class TokenClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclasses.dataclass(eq=False)
class QuestionAnsweringModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor = None
    end_logits: torch.Tensor = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


def returned(output: ModelOutput, return_dict: bool):
    return output if return_dict else output.to_tuple()


@dataclasses.dataclass(eq=False)
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor = None
    cache: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclasses.dataclass(eq=False)
class CausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


def keep_logits(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """HF's ``slice_logits_to_keep``: last k positions (0 = all), 1-D positions, 2-D per-row positions,
    or a 2-D boolean selection (flattened)."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden[logits_to_keep]
        return torch.take_along_dim(hidden, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        logits_to_keep = slice(-logits_to_keep, None)
    return hidden[:, logits_to_keep, :]


def causal_lm_targets(labels: torch.Tensor, shift_labels, ignore_index: int) -> torch.Tensor:
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.long()


def on_device(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def classification_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's sequence-classification loss; infers ``config.problem_type`` on first use, as HF does."""
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif num_labels > 1 and labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits, labels)
    return F.binary_cross_entropy_with_logits(logits, labels)


def last_token_states(hidden: torch.Tensor, input_ids, pad_token_id, warn_for: str | None = None) -> torch.Tensor:
    """HF's pooling for sequence classification: each row's hidden state at its rightmost non-pad token
    (argmax of position * (token != pad): works for left and right padding; an all-pad row gives 0), or at the
    last position when there is no pad id (batch 1 only) or no input_ids (``warn_for`` names the model that
    warns, as HF's BLOOM does)."""
    B = hidden.shape[0]
    if pad_token_id is None and B != 1:
        raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
    if pad_token_id is None or input_ids is None:
        if pad_token_id is not None and warn_for is not None:
            warnings.warn(f"{warn_for} will not detect padding tokens in `inputs_embeds`; the last position is used",
                          stacklevel=3)
        last = torch.full((B,), hidden.shape[1] - 1, dtype=torch.long, device=hidden.device)
    else:
        non_pad = (input_ids != pad_token_id).to(hidden.device, torch.int32)
        last = (torch.arange(input_ids.shape[-1], device=hidden.device, dtype=torch.int32) * non_pad).argmax(-1)
    return hidden[torch.arange(B, device=hidden.device), last]
