"""Tiny random FSMT checkpoints written by transformers, shared by the FSMT model, generation and CLI tests."""

from __future__ import annotations

import torch

PAD, EOS = 1, 2

BASE = dict(langs=["en", "de"], src_vocab_size=40, tgt_vocab_size=36, d_model=32, encoder_layers=2,
            decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=2, encoder_ffn_dim=48,
            decoder_ffn_dim=40, max_position_embeddings=16, dropout=0.0, init_std=0.3)
CONFIGS = {
    # asymmetric stacks, heads, FFNs and vocabularies; relu; scaled embeddings
    "base": BASE,
    # odd d_model (a zero column in the sinusoids), gelu, unscaled embeddings, tied embeddings (equal vocabs),
    # a position table shorter than the inputs (it grows)
    "odd": dict(BASE, src_vocab_size=36, d_model=15, encoder_attention_heads=3, decoder_attention_heads=5,
                activation_function="gelu", scale_embedding=False, tie_word_embeddings=True,
                max_position_embeddings=6),
}


def randomise(model: torch.nn.Module, eos_bias: float = 0.0, seed: int = 0) -> torch.nn.Module:
    """Wide random weights (N(0, 0.3) from init_std, plus random LayerNorm affine so every parameter
    matters), pad rows zero; ``eos_bias`` adds a multiple of the last LayerNorm bias to the EOS row of the
    output projection, so that generation ends at varied steps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for emb in (model.model.encoder.embed_tokens, model.model.decoder.embed_tokens):
            emb.weight[PAD].zero_()
        if eos_bias:
            last = model.model.decoder.layers[-1].final_layer_norm.bias
            model.model.decoder.output_projection.weight[EOS] += eos_bias * last / last.norm()
    return model


def make_checkpoint(path, name: str = "base", eos_bias: float = 0.0, seed: int = 0, **overrides):
    """Write a transformers FSMTForConditionalGeneration to ``path``; returns it (eval mode)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.FSMTConfig(**{**CONFIGS[name], **overrides})
    model = randomise(transformers.FSMTForConditionalGeneration(config).eval(), eos_bias, seed)
    model.save_pretrained(path)
    return model


def source_batch(vocab: int = 40, rows: int = 3, length: int = 7, padding: str | None = "right", seed: int = 0):
    """Source ids ending in </s> with a 1/0 mask; row 0 padded by 3 and row 2 by 1 on ``padding``'s side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in ((0, 3), (2, 1)):
        if padding and row < rows:
            if padding == "right":
                mask[row, length - n:] = 0
            else:
                mask[row, :n] = 0
    for row in range(rows):
        real = mask[row].nonzero()
        ids[row, int(real[-1])] = EOS
    return ids.masked_fill(mask == 0, PAD), mask
