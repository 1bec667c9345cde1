"""DiffLlama's differential attention as a drop-in module (HF's ``DiffLlamaAttention`` parameter names)."""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from ..kernels.diff_attention import lambda_init_for_layer


class DifferentialAttention(nn.Module):
    """q/k/v projections → RoPE → fused differential attention (both maps, λ, group RMSNorm, 1 − λ_init) → o_proj.

    ``config`` is any object with DiffLlama's field names (hidden_size, num_attention_heads,
    num_key_value_heads (even), head_dim, attention_bias, attention_dropout (must be 0, as HF), rms_norm_eps,
    lambda_std_dev). Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``lambda_q1``, ``lambda_k1``,
    ``lambda_q2``, ``lambda_k2`` (the group norm has no weight), so HF's state dict loads unchanged.

    forward(hidden_states [B, N, hidden], position_embeddings (cos, sin) [B or 1, N, head_dim],
    attention_mask=None [B, N] (1 = real token; HF's model hands its layers a 4-D mask built from this))
    returns ``(output [B, N, hidden], None)``: HF's tuple, without attention weights (never formed).
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        if kv_heads % 2:
            raise ValueError(f"num_key_value_heads must be even for differential attention, got {kv_heads}")
        if getattr(config, "attention_dropout", 0.0) > 0.0:
            raise ValueError("attention_dropout > 0 is not defined for differential attention (HF refuses it too)")
        self.layer_idx = layer_idx
        self.num_heads, self.num_key_value_heads = heads, kv_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.eps = config.rms_norm_eps
        self.lambda_init = lambda_init_for_layer(layer_idx)
        bias = getattr(config, "attention_bias", False)
        self.q_proj = nn.Linear(config.hidden_size, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, config.hidden_size, bias=bias)
        std = getattr(config, "lambda_std_dev", 0.1)
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.normal(0, std, size=(self.head_dim,))))

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        if cache is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("cache: cached decoding is served by the DiffLlama model "
                             "(tritonformers.models.diffllama), not by this module on its own")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be the 2-D [batch, keys] padding mask (1 = real token), "
                             f"got shape {list(attention_mask.shape)}")
        B, N, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(B, N, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, N, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = F.apply_rotary(q, k, cos, sin)
        lam = F.diff_lambda(self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2, self.lambda_init)
        y = F.diff_attention(q, k, v, lam, self.lambda_init, causal=True, key_padding_mask=attention_mask,
                             eps=self.eps)
        return self.o_proj(y.reshape(B, N, self.num_heads * self.head_dim)), None
