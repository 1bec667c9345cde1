"""Benchmark cases for fused differential attention (DiffLlama), at module level as DESIGN.md's figures.

The module is projections + RoPE + attention + o_proj. FLOPs: the projections 2·B·N·E·(2H + 2Hkv)·D, and
the two causal softmax maps against the 2D-wide value as HF's two calls count them, 2 x 4·B·H·N²·2D / 2.
Forward+backward counts 3x the projections and 3.5x the attention.
Baselines: HF's DiffLlamaAttention with sdpa and with eager, and a two-call FlexAttention version, in the same run.

Model cases at DiffLlama-1B's shape (16 layers, hidden 2048, 32 heads, 8 KV heads), ours against transformers (sdpa) with the same
random weights: ``diffllama1b_train_b1_n4096``, forward + LM loss + backward + AdamW step, bf16 weights, peak
memory above the state after a first step (weights and optimizer states excluded); ``diffllama1b_greedy_b8``,
prompt 128, 128 new tokens, tokens/s counting new tokens.
"""

from __future__ import annotations

import copy

import torch

from . import lm
from .registry import OURS, Case, Count, Impl, register


def _config(shape):
    from transformers import DiffLlamaConfig
    return DiffLlamaConfig(hidden_size=shape["E"], num_attention_heads=shape["H"], num_key_value_heads=shape["KV"],
                           head_dim=shape["E"] // shape["H"])


def _setup(shape, dtype, device) -> dict:
    from transformers.models.diffllama.modeling_diffllama import DiffLlamaRotaryEmbedding
    cfg = _config(shape)
    B, N = shape["B"], shape["N"]
    x = torch.randn(B, N, shape["E"], device=device).to(dtype).requires_grad_(True)
    cos, sin = DiffLlamaRotaryEmbedding(cfg).to(device)(x, torch.arange(N, device=device)[None])
    # one set of weights, loaded by every implementation's module
    from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention
    state = {k: v.to(device, dtype) for k, v in DiffLlamaAttention(cfg, layer_idx=1).state_dict().items()}
    return {"x": x, "cos": cos.to(dtype), "sin": sin.to(dtype), "config": cfg, "state": state}


def _flops(shape) -> Count:
    B, N, E, H, KV = shape["B"], shape["N"], shape["E"], shape["H"], shape["KV"]
    D = E // H
    proj = 2 * B * N * E * (2 * H + 2 * KV) * D
    attn = 2 * (4 * B * H * N * N * 2 * D / 2)  # two softmax maps against the 2D-wide value, causal
    return Count(fwd=proj + attn, fwd_bwd=3 * proj + 3.5 * attn)


def _module_prepare(kind):
    def prepare(inputs: dict) -> dict:
        from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention
        from tritonformers.nn import DifferentialAttention
        cfg, x = inputs["config"], inputs["x"]
        if kind == "ours":
            module = DifferentialAttention(cfg, layer_idx=1)
        else:
            cfg = copy.deepcopy(cfg)
            cfg._attn_implementation = kind
            module = DiffLlamaAttention(cfg, layer_idx=1)
        module.load_state_dict(inputs["state"])
        return {**inputs, "module": module.to(x.device, x.dtype), "config": cfg}
    return prepare


def _hf_call(i):
    # HF's sdpa path takes no mask for a plain causal batch (is_causal inside); eager needs the 4-D mask
    N = i["x"].shape[1]
    mask = None
    if i["config"]._attn_implementation == "eager":
        mask = torch.full((N, N), torch.finfo(i["x"].dtype).min, device=i["x"].device, dtype=i["x"].dtype).triu(1)
        mask = mask[None, None]
    return i["module"](i["x"], (i["cos"], i["sin"]), attention_mask=mask)[0]


def _flex_prepare(inputs: dict) -> dict:
    """HF's module for the projections and weights; the attention as two FlexAttention calls (GQA, causal block
    mask) over the two value halves, then HF's combination, group norm and scale."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention, apply_rotary_pos_emb

    from tritonformers.kernels.diff_attention import diff_lambda
    module = DiffLlamaAttention(inputs["config"], layer_idx=1)
    module.load_state_dict(inputs["state"])
    module = module.to(inputs["x"].device, inputs["x"].dtype)
    N = inputs["x"].shape[1]
    mask = create_block_mask(lambda b, h, q, k: q >= k, None, None, N, N, device=inputs["x"].device)
    flex = torch.compile(flex_attention, dynamic=False)

    def run(i):
        x, m = i["x"], module
        B, N, _ = x.shape
        D, H, KV = m.head_dim, m.config.num_attention_heads, m.config.num_key_value_heads
        q = m.q_proj(x).view(B, N, H, D).transpose(1, 2)
        k = m.k_proj(x).view(B, N, KV, D).transpose(1, 2)
        v = m.v_proj(x).view(B, N, KV, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, i["cos"], i["sin"])
        v1, v2 = (t.repeat(1, 2, 1, 1) for t in torch.chunk(v, 2, dim=1))
        o = torch.cat([flex(q, k, v1, block_mask=mask, enable_gqa=True),
                       flex(q, k, v2, block_mask=mask, enable_gqa=True)], dim=-1).transpose(1, 2)
        lam = diff_lambda(m.lambda_q1, m.lambda_k1, m.lambda_q2, m.lambda_k2, m.lambda_init)
        y = o[:, :, : H // 2] - lam * o[:, :, H // 2:]
        y = (1 - m.lambda_init) * m.groupnorm(y)
        return m.o_proj(y.reshape(B, N, H * D))
    return {**inputs, "flex_module": run}


_IMPLS = [
    Impl(OURS, lambda i: i["module"](i["x"], (i["cos"], i["sin"]))[0], prepare=_module_prepare("ours"),
         description="nn.DifferentialAttention (fused kernel)"),
    Impl("hf_sdpa", _hf_call, prepare=_module_prepare("sdpa"), description="DiffLlamaAttention, sdpa"),
    Impl("hf_eager", _hf_call, prepare=_module_prepare("eager"), description="DiffLlamaAttention, eager"),
    Impl("flex", lambda i: i["flex_module"](i), prepare=_flex_prepare, cuda_only=True,
         description="HF's projections + two FlexAttention calls (GQA, causal block mask) + HF's combine"),
]

register(
    Case("diff_attention_4k", setup=_setup, impls=_IMPLS, bound="compute", flops=_flops,
         gpu_shape={"B": 1, "N": 4096, "E": 2048, "H": 32, "KV": 32},
         cpu_shape={"B": 1, "N": 32, "E": 64, "H": 4, "KV": 4}, tokens=lambda s: s["B"] * s["N"],
         description="differential attention module, MHA"),
    Case("diff_attention_8k_gqa", setup=_setup, impls=[_IMPLS[0], _IMPLS[1], _IMPLS[3]], bound="compute", flops=_flops,
         gpu_shape={"B": 1, "N": 8192, "E": 2048, "H": 32, "KV": 8},
         cpu_shape={"B": 1, "N": 32, "E": 64, "H": 4, "KV": 2}, tokens=lambda s: s["B"] * s["N"],
         description="differential attention module, GQA 4:1"),
)


# ------------------------------------------------------------------------------------------ models

_SHAPE_1B = {"vocab": 102400, "hidden": 2048, "inter": 8192, "layers": 16, "heads": 32, "kv": 8, "head_dim": 64}
_TINY = {"vocab": 256, "hidden": 64, "inter": 96, "layers": 2, "heads": 4, "kv": 2, "head_dim": 16}


def _fields(shape) -> dict:
    return dict(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                num_key_value_heads=shape["kv"], head_dim=shape["head_dim"], max_position_embeddings=8192)


def _model(which, shape, dtype, device):
    from transformers import DiffLlamaConfig as HFConfig, DiffLlamaForCausalLM as HFModel

    from tritonformers.models.diffllama import DiffLlamaConfig, DiffLlamaForCausalLM
    torch.manual_seed(0)
    hf = HFModel(HFConfig(**_fields(shape), attn_implementation="sdpa"))
    if which == "hf":
        return hf.to(device, dtype)
    ours = DiffLlamaForCausalLM(DiffLlamaConfig(**_fields(shape)))
    ours.load_state_dict(hf.state_dict())
    return ours.to(device, dtype)


def _train_flops(shape) -> Count:
    E, I, L, H, KV, D, V = (shape[k] for k in ("hidden", "inter", "layers", "heads", "kv", "head_dim", "vocab"))
    params = L * (E * H * D * 2 + 2 * E * KV * D + 3 * E * I) + 2 * V * E
    tokens = shape["B"] * shape["N"]
    attention = L * 2 * (4 * H * shape["N"] * 2 * D) * tokens / 2
    return Count(fwd=2 * params * tokens + attention, fwd_bwd=6 * params * tokens + 3.5 * attention)


register(Case(
    "diffllama1b_train_b1_n4096", setup=lm.train_setup, bound="compute", flops=_train_flops,
    gpu_shape={**_SHAPE_1B, "B": 1, "N": 4096}, cpu_shape={**_TINY, "B": 1, "N": 32},
    tokens=lambda s: s["B"] * s["N"],
    impls=lm.train_impls(_model, "hf_sdpa", "tritonformers DiffLlamaForCausalLM, fused kernels and loss, AdamW step",
                         "transformers DiffLlamaForCausalLM (sdpa), AdamW step"),
    description="DiffLlama-1B-shaped training step (weights stepped in place: outputs are not compared)"))

register(Case(
    "diffllama1b_greedy_b8", setup=lm.greedy_setup, bound="memory", backward=False,
    gpu_shape={**_SHAPE_1B, "B": 8, "prompt": 128, "new": 128}, cpu_shape={**_TINY, "B": 2, "prompt": 8, "new": 8},
    tokens=lambda s: s["B"] * s["new"],
    impls=lm.greedy_impls(_model, 0, "hf_sdpa", "generate(), static cache, CUDA graph",
                          "transformers generate() (sdpa)"),
    description="DiffLlama-1B-shaped greedy generation, prompt 128, 128 new tokens (ids compared)"))
