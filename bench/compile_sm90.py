"""Compile the attention kernels for Hopper (sm_90) without a GPU: ``python bench/compile_sm90.py``.

The interpreter runs kernels on the CPU but never lowers them, so layout, dot-shape and shared-memory errors
first show on the GPU. This lowers every attention kernel (flash, decode, differential, local, LSH; fwd and bwd)
through Triton's full CUDA pipeline (ptxas included, shipped with triton) for fp16, bf16 and fp32 at head dims
64 and 128 with the launchers' block sizes, and prints each one's shared memory (Hopper allows 227 KB).
Argument types are read from the names (pointers are upper case; the sets below list the exceptions).
"""
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tritonformers.kernels import attention as A, diff_attention as DA, local_attention as LA, lsh_attention as LSH
TGT = GPUTarget("cuda", 90, 32)
FLOATS = {"sm_scale", "dropout_p", "scale", "mask_value", "self_value", "inv_sqrt_d", "out_scale", "eps", "qk_scale", "mask_log2"}
F32_PTRS = {"LSE", "DELTA", "DSLOPE", "M_PART", "L_PART", "O_PART", "LSE1", "LSE2", "DELTA1", "DELTA2", "DLAMBDA_PART",
            "SLOPES", "LSE_R", "DELTA_R", "LAMBDA", "ML_PART"}
I8_PTRS = {"KPM", "KEEP"}
I32_PTRS = {"PERM", "POS", "LENS"}
INTS = {"H", "L", "T", "C", "NQ", "NK", "NCHUNKS", "BEFORE", "AFTER", "SUB_BLOCKS", "HP", "R", "HKV_HALF", "NMAX",
        "KEYS_PER_SPLIT", "NUM_SPLITS", "NH", "WIDTH"}

def sig_for(fn, dt):
    sig = {}
    for p in fn.params:
        n = p.name
        if p.is_constexpr:
            sig[n] = "constexpr"
        elif n in FLOATS:
            sig[n] = "fp32"
        elif n in INTS:
            sig[n] = "i32"
        elif n.isupper() or n in ("Q", "K", "V"):
            sig[n] = "*fp32" if n in F32_PTRS else "*i8" if n in I8_PTRS else "*i32" if n in I32_PTRS else "*" + dt
        else:
            sig[n] = "i32"
    return sig

def comp(fn, dt, consts, **opts):
    t = time.time()
    k = triton.compile(ASTSource(fn, sig_for(fn, dt), consts), target=TGT, options=opts)
    md = k.metadata
    print(f"  {fn.__name__:28s} {dt:5s} {time.time()-t:5.1f}s shared={md.shared:6d} B", flush=True)
    return k

PREC = {"fp32": "ieee", "fp16": "tf32", "bf16": "tf32"}
for dt in ("fp16", "bf16", "fp32"):
    for D, (BM, BN, w, st) in ((64, (128, 64, 4, 3)), (128, (128, 64, 8, 2))):
        flags = dict(CAUSAL=True, HAS_ALIBI=True, HAS_POS=True, HAS_KPM=True, HAS_DROPOUT=True, PRECISION=PREC[dt])
        meta = dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_M=BM, BLOCK_N=BN, **flags)
        comp(A._attn_fwd_kernel, dt, meta, num_warps=w, num_stages=st)
        comp(A._attn_bwd_dkdv_kernel, dt, meta, num_warps=w, num_stages=st)
        comp(A._attn_bwd_dq_kernel, dt, meta, num_warps=w, num_stages=st)
        comp(A._attn_bwd_delta_kernel, dt, dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_M=BM))
        comp(A._decode_split_kernel, dt, dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_M=16, BLOCK_N=64, HAS_ALIBI=True, HAS_POS=True,
                                              HAS_KPM=True, PRECISION=PREC[dt]), num_warps=4, num_stages=3)
        comp(A._decode_combine_kernel, dt, dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_M=16))
        dm = dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_M=64, BLOCK_N=64 if D <= 64 else 32, CAUSAL=True, HAS_KPM=True, PRECISION=PREC[dt])
        comp(DA._diff_fwd_kernel, dt, dict(dm, SAVE_O=True), num_warps=4 if D <= 64 else 8, num_stages=2)
        comp(DA._diff_bwd_prep_kernel, dt, dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_M=64))
        comp(DA._diff_bwd_dkdv_kernel, dt, dm, num_warps=4 if D <= 64 else 8, num_stages=2)
        comp(DA._diff_bwd_dq_kernel, dt, dm, num_warps=4 if D <= 64 else 8, num_stages=2)
        comp(DA._diff_decode_split_kernel, dt, dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_M=64, BLOCK_N=64, HAS_KPM=True,
                                                    PRECISION=PREC[dt]), num_warps=8, num_stages=2)
        comp(DA._diff_decode_combine_kernel, dt, dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_M=64))
        lm = dict(HEAD_DIM=D, BLOCK_D=D, BLOCK_M=64, BLOCK_N=64, CAUSAL=True, HAS_KPM=True, HAS_DROPOUT=True, PRECISION=PREC[dt])
        for mod, names in ((LA, ("_local_fwd_kernel", "_local_bwd_dkdv_kernel", "_local_bwd_dq_kernel")),
                           (LSH, ("_lsh_fwd_kernel", "_lsh_bwd_dkdv_kernel", "_lsh_bwd_dq_kernel"))):
            for name in names:
                comp(getattr(mod, name), dt, lm, num_warps=4 if D <= 64 else 8, num_stages=2)
        comp(LSH._lsh_combine_kernel, dt, dict(HEAD_DIM=D, BLOCK_T=32, BLOCK_D=D))
        comp(LSH._lsh_combine_bwd_kernel, dt, dict(HEAD_DIM=D, BLOCK_T=32, BLOCK_D=D))
print("ALL COMPILED")
