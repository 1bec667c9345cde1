"""Benchmark cases for fused differential attention (DiffLlama), at module level as DESIGN.md's figures.

The module is projections + RoPE + attention + o_proj. FLOPs: the projections 2·B·N·E·(2H + 2Hkv)·D, and
the two causal softmax maps against the 2D-wide value as HF's two calls count them, 2 x 4·B·H·N²·2D / 2.
Forward+backward counts 3x the projections and 3.5x the attention.
Baselines: HF's DiffLlamaAttention with sdpa and with eager, in the same run.

Model cases at DiffLlama-1B's shape (specs/diffllama.md §10), ours against transformers (sdpa) with the same
random weights: ``diffllama1b_train_b1_n4096``, forward + LM loss + backward + AdamW step, bf16 weights, peak
memory above the state after a first step (weights and optimizer states excluded); ``diffllama1b_greedy_b8``,
prompt 128, 128 new tokens, tokens/s counting new tokens.
"""

from __future__ import annotations

import copy

import torch

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


_IMPLS = [
    Impl(OURS, lambda i: i["module"](i["x"], (i["cos"], i["sin"]))[0], prepare=_module_prepare("ours"),
         description="nn.DifferentialAttention (fused kernel)"),
    Impl("hf_sdpa", _hf_call, prepare=_module_prepare("sdpa"), description="DiffLlamaAttention, sdpa"),
    Impl("hf_eager", _hf_call, prepare=_module_prepare("eager"), description="DiffLlamaAttention, eager"),
]

register(
    Case("diff_attention_4k", setup=_setup, impls=_IMPLS, bound="compute", flops=_flops,
         gpu_shape={"B": 1, "N": 4096, "E": 2048, "H": 32, "KV": 32},
         cpu_shape={"B": 1, "N": 32, "E": 64, "H": 4, "KV": 4}, tokens=lambda s: s["B"] * s["N"],
         description="differential attention module, MHA"),
    Case("diff_attention_8k_gqa", setup=_setup, impls=_IMPLS[:2], bound="compute", flops=_flops,
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


def _train_setup(shape, dtype, device) -> dict:
    ids = torch.randint(0, shape["vocab"], (shape["B"], shape["N"]), device=device)
    return {"input_ids": ids, "shape": shape, "dtype": dtype, "device": device}


def _train_prepare(which):
    def prepare(inputs: dict) -> dict:
        model = _model(which, inputs["shape"], inputs["dtype"], inputs["device"]).train()
        state = {**inputs, "model": model, "optim": torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)}
        _train_step(state)  # optimizer states exist before the measured step
        return state
    return prepare


def _forward_loss(i):
    return i["model"](input_ids=i["input_ids"], labels=i["input_ids"]).loss


def _train_step(i):
    loss = _forward_loss(i)
    loss.backward()
    i["optim"].step()
    i["optim"].zero_grad(set_to_none=True)
    return loss.detach()


def _train_flops(shape) -> Count:
    E, I, L, H, KV, D, V = (shape[k] for k in ("hidden", "inter", "layers", "heads", "kv", "head_dim", "vocab"))
    params = L * (E * H * D * 2 + 2 * E * KV * D + 3 * E * I) + 2 * V * E
    tokens = shape["B"] * shape["N"]
    attention = L * 2 * (4 * H * shape["N"] * 2 * D) * tokens / 2
    return Count(fwd=2 * params * tokens + attention, fwd_bwd=6 * params * tokens + 3.5 * attention)


register(Case(
    "diffllama1b_train_b1_n4096", setup=_train_setup, bound="compute", flops=_train_flops,
    gpu_shape={**_SHAPE_1B, "B": 1, "N": 4096}, cpu_shape={**_TINY, "B": 1, "N": 32},
    tokens=lambda s: s["B"] * s["N"],
    impls=[Impl(OURS, _forward_loss, fwd_bwd=_train_step, prepare=_train_prepare("ours"), comparable=False,
                description="tritonformers DiffLlamaForCausalLM, fused kernels and loss, AdamW step"),
           Impl("hf_sdpa", _forward_loss, fwd_bwd=_train_step, prepare=_train_prepare("hf"), comparable=False,
                description="transformers DiffLlamaForCausalLM (sdpa), AdamW step")],
    description="DiffLlama-1B-shaped training step (weights stepped in place: outputs are not compared)"))


def _greedy_setup(shape, dtype, device) -> dict:
    ids = torch.randint(3, shape["vocab"], (shape["B"], shape["prompt"]), device=device)
    return {"input_ids": ids, "mask": torch.ones_like(ids), "shape": shape, "dtype": dtype, "device": device}


def _greedy_prepare(which):
    def prepare(inputs: dict) -> dict:
        return {**inputs, "model": _model(which, inputs["shape"], inputs["dtype"], inputs["device"]).eval()}
    return prepare


def _greedy(i):
    with torch.no_grad():
        return i["model"].generate(i["input_ids"], attention_mask=i["mask"], max_new_tokens=i["shape"]["new"],
                                   min_new_tokens=i["shape"]["new"], do_sample=False, pad_token_id=0)


register(Case(
    "diffllama1b_greedy_b8", setup=_greedy_setup, bound="memory", backward=False,
    gpu_shape={**_SHAPE_1B, "B": 8, "prompt": 128, "new": 128}, cpu_shape={**_TINY, "B": 2, "prompt": 8, "new": 8},
    tokens=lambda s: s["B"] * s["new"],
    impls=[Impl(OURS, _greedy, prepare=_greedy_prepare("ours"), description="generate(), static cache, CUDA graph"),
           Impl("hf_sdpa", _greedy, prepare=_greedy_prepare("hf"), description="transformers generate() (sdpa)")],
    description="DiffLlama-1B-shaped greedy generation, prompt 128, 128 new tokens (ids compared)"))
