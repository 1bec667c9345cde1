"""Benchmark cases for ``tritonformers.accelerate``: a transformers model before and after the call.

Per family, the same HF model with the same random weights (no hub access) is timed as transformers builds
it (``hf_eager``: the baseline and oracle) and after ``accelerate(model)`` (ours; ``loss=True`` for the
training step, whose fused loss never forms the logits). Three cases per family: ``accelerate_<family>_fwd``
(forward logits under ``no_grad``, compared), ``accelerate_<family>_train`` (forward + LM loss + backward +
AdamW step; timed, not compared, since the step updates the weights) and, for the generating families,
``accelerate_<family>_greedy`` (greedy ``generate()`` with HF's caches; ids compared; Reformer's cached
one-token steps are HF's forward in both rows, so only its prefill differs). I-BERT (IBertForMaskedLM, an
encoder: no greedy case) has ``accelerate_ibert_fwd`` (float model: fused attention, LayerNorm, GELU),
``accelerate_ibert_train`` (masked-LM step, fused loss) and ``accelerate_ibert_quant_fwd``: a quant_mode
model calibrated by two train-mode batches, in float32, where ours is ``accelerate(model, integer=True)``
(integer inference, checked against HF's float emulation with the I-BERT encoder's 12% tolerance, see
cases_ibert.py) and ``tritonformers_hf_bits`` is the default ``accelerate(model)`` (HF's emulation bit for
bit on the quant-module twins, without HF's host round trips). FLOPs are not counted here: the family cases
(cases_<family>.py) give the ceilings; these rows answer "how much does one call buy an HF user".
"""

from __future__ import annotations

import torch

from . import lm
from .registry import OURS, Case, Impl, register


def _bloom(shape):
    from transformers import BloomConfig, BloomForCausalLM
    return BloomForCausalLM(BloomConfig(hidden_size=shape["hidden"], n_layer=shape["layers"], n_head=shape["heads"],
                                        vocab_size=shape["vocab"]))


def _diffllama(shape):
    from transformers import DiffLlamaConfig, DiffLlamaForCausalLM
    return DiffLlamaForCausalLM(DiffLlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["ffn"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"] // 2, vocab_size=shape["vocab"]))


def _reformer(shape):
    """A causal Reformer alternating local and LSH layers; its axial positions cover exactly N (HF's training
    requirement), the buckets are N / chunk (HF's rule of thumb)."""
    from transformers import ReformerConfig, ReformerModelWithLMHead
    n, chunk, side = shape["N"], shape["chunk"], shape["axial"]
    return ReformerModelWithLMHead(ReformerConfig(
        hidden_size=shape["hidden"], num_attention_heads=shape["heads"], attention_head_size=shape["hidden"] // shape["heads"],
        attn_layers=["local", "lsh"] * (shape["layers"] // 2), feed_forward_size=2 * shape["hidden"],
        axial_pos_shape=[side, n // side], axial_pos_embds_dim=[shape["hidden"] // 2] * 2, vocab_size=shape["vocab"],
        max_position_embeddings=n, local_attn_chunk_length=chunk, lsh_attn_chunk_length=chunk, num_buckets=n // chunk,
        num_hashes=1, is_decoder=True, hash_seed=0, hidden_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0))


def _fsmt(shape):
    from transformers import FSMTConfig, FSMTForConditionalGeneration
    return FSMTForConditionalGeneration(FSMTConfig(
        langs=["en", "de"], src_vocab_size=shape["vocab"], tgt_vocab_size=shape["vocab"], d_model=shape["hidden"],
        encoder_layers=shape["layers"], decoder_layers=shape["layers"], encoder_attention_heads=shape["heads"],
        decoder_attention_heads=shape["heads"], encoder_ffn_dim=4 * shape["hidden"],
        decoder_ffn_dim=4 * shape["hidden"], max_position_embeddings=max(shape.get("N", 0), 1024), dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, num_beams=1))  # FSMT defaults to 5 beams: the greedy case is greedy


def _ibert(shape, quant_mode: bool = False):
    """IBertForMaskedLM without dropout (HF's and our dropout draw different masks: the step is timed alike)."""
    from transformers import IBertConfig, IBertForMaskedLM
    return IBertForMaskedLM(IBertConfig(
        hidden_size=shape["hidden"], num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        intermediate_size=4 * shape["hidden"], vocab_size=shape["vocab"], max_position_embeddings=shape["N"] + 2,
        quant_mode=quant_mode, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


# family: (HF model builder, pad id for generate (None: no greedy case), GPU shape, CPU shape); the greedy
# cases use prompt/new.
FAMILIES = {
    "bloom": (_bloom, 3, {"hidden": 1024, "layers": 24, "heads": 16, "vocab": 250880, "B": 2, "N": 2048},
              {"hidden": 64, "layers": 2, "heads": 4, "vocab": 512, "B": 2, "N": 32}),
    "diffllama": (_diffllama, 0,
                  {"hidden": 1024, "ffn": 2816, "layers": 12, "heads": 16, "vocab": 32000, "B": 2, "N": 2048},
                  {"hidden": 64, "ffn": 128, "layers": 2, "heads": 4, "vocab": 512, "B": 2, "N": 32}),
    "reformer": (_reformer, 0, {"hidden": 256, "layers": 6, "heads": 4, "vocab": 320, "B": 4, "N": 4096,
                                "chunk": 64, "axial": 64},
                 {"hidden": 32, "layers": 2, "heads": 2, "vocab": 64, "B": 1, "N": 16, "chunk": 4, "axial": 4}),
    "fsmt": (_fsmt, 1, {"hidden": 1024, "layers": 6, "heads": 16, "vocab": 32000, "B": 8, "N": 256},
             {"hidden": 32, "layers": 1, "heads": 2, "vocab": 64, "B": 2, "N": 16}),
    "ibert": (_ibert, None, {"hidden": 768, "layers": 12, "heads": 12, "vocab": 50265, "B": 8, "N": 512},
              {"hidden": 64, "layers": 2, "heads": 4, "vocab": 512, "B": 2, "N": 32}),  # roberta-base shape
}
GREEDY = {"gpu": {"B": 8, "prompt": 128, "new": 128}, "cpu": {"B": 1, "prompt": 8, "new": 4}}


def _model_maker(family: str, loss: bool):
    """``make_model(which, shape, dtype, device)`` for :mod:`.lm`: the HF model, accelerated for "ours"."""
    build = FAMILIES[family][0]

    def make_model(which, shape, dtype, device):
        import tritonformers
        torch.manual_seed(0)
        model = build(shape).to(device, dtype)
        return tritonformers.accelerate(model, loss=loss) if which == "ours" else model
    return make_model


def _forward_impls(family: str) -> list[Impl]:
    make_model = _model_maker(family, loss=False)

    def prepare(which):
        def run(inputs: dict) -> dict:
            return {**inputs, "model": make_model(which, inputs["shape"], inputs["dtype"], inputs["device"]).eval()}
        return run

    def forward(i):
        with torch.no_grad():
            return i["model"](input_ids=i["input_ids"]).logits
    return [Impl(OURS, forward, prepare=prepare("ours"), description=f"transformers {family} after accelerate()"),
            Impl("hf_eager", forward, prepare=prepare("hf"), description=f"transformers {family} as built")]


def _register(family: str) -> None:
    _, pad, gpu, cpu = FAMILIES[family]
    tokens = lambda s: s["B"] * s["N"]  # noqa: E731
    register(Case(f"accelerate_{family}_fwd", setup=lm.train_setup, impls=_forward_impls(family), bound="compute",
                  gpu_shape=gpu, cpu_shape=cpu, tokens=tokens, backward=False,
                  description=f"HF {family} forward logits, before and after tritonformers.accelerate"))
    register(Case(f"accelerate_{family}_train", setup=lm.train_setup, bound="compute", gpu_shape=gpu, cpu_shape=cpu,
                  tokens=tokens, impls=lm.train_impls(_model_maker(family, loss=True), "hf_eager",
                                                      f"transformers {family} after accelerate(loss=True), AdamW step",
                                                      f"transformers {family}, AdamW step"),
                  description=f"HF {family} training step, before and after tritonformers.accelerate"))
    if pad is None:
        return
    register(Case(f"accelerate_{family}_greedy", setup=lm.greedy_setup, bound="memory", backward=False,
                  gpu_shape={**gpu, **GREEDY["gpu"]}, cpu_shape={**cpu, **GREEDY["cpu"]},
                  tokens=lambda s: s["B"] * s["new"],
                  impls=lm.greedy_impls(_model_maker(family, loss=False), pad, "hf_eager",
                                        f"transformers {family} generate() after accelerate()",
                                        f"transformers {family} generate()"),
                  description=f"HF {family} greedy generation (dynamic cache), before and after accelerate"))


def _ibert_quant_impls() -> list[Impl]:
    """quant_mode IBertForMaskedLM, calibrated (two train-mode batches, seeded: every row the same ranges):
    integer inference after ``accelerate(integer=True)`` (ours), HF's emulation (the oracle) and HF's
    emulation on the twins after the default ``accelerate`` (same bits as the oracle)."""
    def prepare(which):
        def run(inputs: dict) -> dict:
            import tritonformers
            shape, device = inputs["shape"], inputs["device"]
            torch.manual_seed(0)
            model = _ibert(shape, quant_mode=True).to(device).train()
            calibration = torch.Generator(device="cpu").manual_seed(1)
            with torch.no_grad():
                for _ in range(2):
                    model(input_ids=torch.randint(3, shape["vocab"], (shape["B"], shape["N"]),
                                                  generator=calibration).to(device))
            if which != "hf":
                tritonformers.accelerate(model, integer=which == "ours")
            return {**inputs, "model": model.eval()}
        return run

    def forward(i):
        with torch.no_grad():
            return i["model"](input_ids=i["input_ids"]).logits
    return [Impl(OURS, forward, prepare=prepare("ours"),
                 description="transformers I-BERT quant_mode after accelerate(integer=True): integer inference"),
            Impl("hf_quant", forward, prepare=prepare("hf"),
                 description="transformers I-BERT quant_mode (float emulation of the integer arithmetic)"),
            Impl("tritonformers_hf_bits", forward, prepare=prepare("hf_bits"),
                 description="transformers I-BERT quant_mode after accelerate(): HF's emulation, bit for bit")]


def _register_ibert_quant() -> None:
    from .cases_ibert import _MODEL_CHECK_TOL
    _, _, gpu, cpu = FAMILIES["ibert"]
    register(Case("accelerate_ibert_quant_fwd", setup=lm.train_setup, impls=_ibert_quant_impls(), bound="compute",
                  dtype=torch.float32, gpu_shape={**gpu, "N": 128}, cpu_shape=cpu, tokens=lambda s: s["B"] * s["N"],
                  backward=False, check_tol=_MODEL_CHECK_TOL,
                  description="HF I-BERT quant_mode forward logits: HF's emulation vs accelerate(integer=True)"))


for _family in FAMILIES:
    _register(_family)
_register_ibert_quant()
