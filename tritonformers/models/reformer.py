"""Reformer: the configuration (the model classes come with the Reformer model issue).

``ReformerConfig`` reads and writes HF's config.json with HF's field names and code defaults (specs/reformer.md
§1; where HF's docstring and code disagree, the code wins). ``tritonformers.nn.LocalSelfAttention`` and
``tritonformers.nn.LSHSelfAttention`` take it, or transformers' own ReformerConfig.
"""

from __future__ import annotations

from .loading import ConfigBase


class ReformerConfig(ConfigBase):
    """HF's ``ReformerConfig``. As HF: ``num_hidden_layers`` is ``len(attn_layers)`` unless given explicitly;
    ``axial_pos_shape`` and ``axial_pos_embds_dim`` are tuples; ``num_buckets=None`` is chosen (and written
    back here) by the first chunked LSH call; unknown keys are kept and written back."""

    model_type = "reformer"
    defaults = dict(
        attention_head_size=64, attn_layers=("local", "lsh", "local", "lsh", "local", "lsh"), axial_norm_std=1.0,
        axial_pos_embds=True, axial_pos_shape=(64, 64), axial_pos_embds_dim=(64, 192), chunk_size_lm_head=0,
        chunk_size_feed_forward=0, eos_token_id=2, feed_forward_size=512, hash_seed=None, hidden_act="relu",
        hidden_dropout_prob=0.05, hidden_size=256, initializer_range=0.02, is_decoder=False, layer_norm_eps=1e-12,
        local_num_chunks_before=1, local_num_chunks_after=0, local_attention_probs_dropout_prob=0.05,
        local_attn_chunk_length=64, lsh_attn_chunk_length=64, lsh_attention_probs_dropout_prob=0.0,
        lsh_num_chunks_before=1, lsh_num_chunks_after=0, max_position_embeddings=4096, num_attention_heads=12,
        num_buckets=None, num_hashes=1, vocab_size=320, tie_word_embeddings=False, use_cache=True,
        classifier_dropout=None, bos_token_id=None, pad_token_id=0, num_hidden_layers=None,
    )

    def _post_init(self) -> None:
        self.attn_layers = tuple(self.attn_layers) if isinstance(self.attn_layers, list) else self.attn_layers
        if self.num_hidden_layers is None:
            self.num_hidden_layers = len(self.attn_layers)
        self.axial_pos_shape = tuple(self.axial_pos_shape)
        self.axial_pos_embds_dim = tuple(self.axial_pos_embds_dim)
        if isinstance(self.num_buckets, tuple):
            self.num_buckets = list(self.num_buckets)


__all__ = ["ReformerConfig"]
