"""Which model families ``tritonformers train`` can train, and how: one :class:`Family` entry each.

An entry names the task kind (what the data pipeline and the loss look like), the model class, the tokenizer
class (or none, for raw bytes), the longest sequence the model serves and the family's own switches. A family
joins when its model lands with one :func:`register_family` call at the bottom of this module (and its line
leaves :data:`PENDING`). Task kinds, implemented in :mod:`tritonformers.training.data`:

* ``causal_lm``: documents packed into fixed-length windows, labels = input ids (the model shifts);
* ``reversible_lm``: the same batches for a long-context LM on reversible layers (no activation checkpointing:
  the layers recompute their inputs themselves);
* ``masked_lm``: windows of ``seq_len - 2`` tokens between ``<s>`` and ``</s>``, 15% of the tokens chosen as
  RoBERTa does (80% ``<mask>``, 10% a random token, 10% unchanged), labels -100 elsewhere;
* ``seq2seq``: source/target pairs (a TSV file, JSON-lines with source/target fields, or two parallel files),
  each side tokenised with ``</s>`` appended, batched by length; the labels are the target ids (the model
  shifts them right into its decoder input).

Nothing here imports torch or a model: the classes are imported when a run needs them.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Callable

TASKS = ("causal_lm", "masked_lm", "reversible_lm", "seq2seq")


@dataclasses.dataclass(frozen=True)
class Family:
    """How to train one model family (see the module docstring).

    ``model_class`` / ``tokenizer_class`` are ``"module:Class"``; ``tokenizer_class=None`` means raw bytes
    (id = byte + ``byte_offset``, as enwik8 Reformer checkpoints read them); ``byte_fallback``: raw bytes also
    when the tokenizer directory holds no tokenizer files (a byte-level checkpoint such as
    google/reformer-enwik8 ships none). ``max_positions(config)`` is the longest sequence the model serves
    (None: no limit, as BLOOM's ALiBi); ``default_seq_len(config)`` the length of a run without ``seq_len``
    (None: min(1024, max_positions)). ``check_seq_len(config, n)`` raises ValueError for a length the
    architecture cannot take (Reformer's chunking and axial positions). ``prepare(model, options)``
    applies the family's own options before training (I-BERT's quantisation-aware mode) and may raise
    ValueError for a combination it cannot train. ``unused_parameters``: some parameters get no gradient in
    some mode (I-BERT's quant mode), so DDP must look for them each step. ``layer_methods``: methods other than
    ``forward`` through which the model runs a layer (I-BERT's ``float_forward``), which FSDP2 must hook to
    gather the layer's parameters (FSMT's ``cross_keys_values``, run for every decoder layer before the layers).
    ``fsdp=False``: the family cannot be sharded with FSDP2 (Reformer's reversible layers run inside one autograd
    function that takes their parameters as inputs and recomputes the layers in backward, outside FSDP2's
    gathering: the sharded parameters reach it as DTensors).
    """

    model_type: str
    task: str
    model_class: str
    tokenizer_class: str | None
    max_positions: Callable[[Any], int | None] = lambda config: None
    gradient_checkpointing: bool = True
    byte_offset: int = 0
    check_seq_len: Callable[[Any, int], None] | None = None
    prepare: Callable[[Any, Any], None] | None = None
    unused_parameters: bool = False
    layer_methods: tuple[str, ...] = ()
    byte_fallback: bool = False
    default_seq_len: Callable[[Any], int | None] = lambda config: None
    fsdp: bool = True

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")

    def model_cls(self):
        return _import(self.model_class)

    def tokenizer_cls(self):
        return None if self.tokenizer_class is None else _import(self.tokenizer_class)


def _import(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


FAMILIES: dict[str, Family] = {}
# Families whose model code has not landed: model_type -> (task kind, what is missing).
PENDING: dict[str, tuple[str, str]] = {}


def register_family(family: Family) -> Family:
    """Make ``family`` trainable (it replaces an entry of the same model type and leaves :data:`PENDING`)."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family takes a Family, got {type(family).__name__}")
    FAMILIES[family.model_type] = family
    PENDING.pop(family.model_type, None)
    return family


def family_for(model_type: Any, source: str = "the model") -> Family:
    """The registered family of ``model_type`` (config.json's ``model_type``), else a clear ValueError."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    known = ", ".join(sorted(FAMILIES))
    if model_type in PENDING:
        task, missing = PENDING[model_type]
        raise ValueError(f"{source} is a {model_type} model ({task}), which tritonformers train cannot train yet: "
                         f"{missing}. Trainable families: {known}")
    raise ValueError(f"{source} has model_type {model_type!r}, not a family tritonformers train knows; "
                     f"trainable families: {known}")


def _ibert_prepare(model, options) -> None:
    """``quant_mode=True``: quantisation-aware training (HF's float emulation of the integer arithmetic, with
    straight-through gradients and EMA activation ranges); False: float training; None: as config.json says."""
    if options.quant_mode is not None:
        model.set_quant_mode(options.quant_mode)
    if model.config.quant_mode and options.dtype != "float32":
        raise ValueError(f"dtype={options.dtype!r}: I-BERT's quantisation-aware training emulates integer "
                         "arithmetic in float32; use dtype='float32' (or quant_mode=False for float training)")


register_family(Family(
    "bloom", task="causal_lm", model_class="tritonformers.models.bloom:BloomForCausalLM",
    tokenizer_class="tritonformers.tokenizers.bloom:BloomTokenizer"))
register_family(Family(
    "diffllama", task="causal_lm", model_class="tritonformers.models.diffllama:DiffLlamaForCausalLM",
    tokenizer_class="tritonformers.tokenizers.llama:LlamaTokenizer",
    max_positions=lambda config: config.max_position_embeddings))
register_family(Family(
    "ibert", task="masked_lm", model_class="tritonformers.models.ibert:IBertForMaskedLM",
    tokenizer_class="tritonformers.tokenizers.roberta:RobertaTokenizer",
    # RoBERTa positions start after the padding index: pad + 1 .. max_position_embeddings - 1
    max_positions=lambda config: config.max_position_embeddings - config.pad_token_id - 1,
    gradient_checkpointing=False, prepare=_ibert_prepare, unused_parameters=True,
    layer_methods=("float_forward", "int_forward")))

def _axial_length(config) -> int | None:
    return math.prod(config.axial_pos_shape) if config.axial_pos_embds else None


def _reformer_max_positions(config) -> int:
    return _axial_length(config) or config.max_position_embeddings


def _reformer_check_seq_len(config, n: int) -> None:
    """Reformer's training rules (HF raises both in training mode): with axial positions the length is exactly
    prod(axial_pos_shape); a length above the smallest chunk must be a multiple of the chunk lengths' lcm."""
    from ..models.reformer import lcm_chunk_length, min_chunk_length
    axial = _axial_length(config)
    if axial is not None and n != axial:
        raise ValueError(f"seq_len={n}: this reformer model has axial positions {tuple(config.axial_pos_shape)}, "
                         f"so it trains on sequences of exactly {axial} tokens (their product); use seq_len={axial}")
    lcm = lcm_chunk_length(config)
    if n % lcm and n > min_chunk_length(config):
        raise ValueError(f"seq_len={n}: a reformer model trains on multiples of its attention chunk lengths' least "
                         f"common multiple ({lcm}); use e.g. seq_len={n - n % lcm or lcm}")


def _reformer_prepare(model, options) -> None:
    """``lm_head.bias`` is HF's unused parameter (the logits use ``lm_head.decoder.bias``): frozen, so AdamW and
    DDP never wait for a gradient that cannot come."""
    model.lm_head.bias.requires_grad_(False)


register_family(Family(
    "reformer", task="reversible_lm", model_class="tritonformers.models.reformer:ReformerModelWithLMHead",
    tokenizer_class="tritonformers.tokenizers.reformer:ReformerTokenizer", byte_offset=2, byte_fallback=True,
    max_positions=_reformer_max_positions, default_seq_len=_axial_length, check_seq_len=_reformer_check_seq_len,
    gradient_checkpointing=False, fsdp=False, prepare=_reformer_prepare))
register_family(Family(
    "fsmt", task="seq2seq", model_class="tritonformers.models.fsmt:FSMTForConditionalGeneration",
    tokenizer_class="tritonformers.tokenizers.fsmt:FSMTTokenizer",
    max_positions=lambda config: config.max_position_embeddings, gradient_checkpointing=False,
    layer_methods=("cross_keys_values",)))

__all__ = ["TASKS", "Family", "FAMILIES", "PENDING", "register_family", "family_for"]
