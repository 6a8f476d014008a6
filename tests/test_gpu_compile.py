"""Every Triton kernel compiles for a Hopper GPU (sm_90) — checked without one.

The interpreter runs the kernels' logic on CPU but never lowers them, so a kernel that is right
there can still fail to compile for a GPU (tensor-core `tl.dot` shapes and dtypes, layouts of
`tl.interleave`, constexpr misuse). Triton compiles ahead of time for a named target with the
ptxas its wheel ships, so CI lowers each kernel in its GPU configurations down to a cubin.

Kernels defined under TRITON_INTERPRET=1 (as the test session's are) cannot be compiled, so the
cases run in one child process without it (`python tests/test_gpu_compile.py` runs them too).
"""

import inspect
import json
import os
import subprocess
import sys

import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from peft_ops.kernels import dora as kdora
from peft_ops.kernels import dropout as kdropout
from peft_ops.kernels import lora as klora
from peft_ops.kernels import nf4 as knf4

HOPPER = GPUTarget("cuda", 90, 32)
FLOAT_ARGS = {"offset", "scaling", "inv_keep", "p"}


def compile_for_gpu(kernel, consts, ptr_types=None, num_warps=4, num_stages=3):
    """Lower `kernel` with `consts` for sm_90; pointers default to fp32, other scalars to i32."""
    ptr_types = ptr_types or {}
    params = list(inspect.signature(kernel.fn).parameters)
    missing = set(consts) - set(params)
    assert not missing, f"unknown constexprs {missing}"
    signature = {}
    for name in params:
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = ptr_types.get(name, "*fp32")
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(params.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=HOPPER, options=dict(num_warps=num_warps, num_stages=num_stages,
                                                               enable_fp_fusion=False))
    assert compiled.asm["cubin"], "no cubin"
    return compiled


NF4_META = dict(IS_NF4=True, BLOCKSIZE=64, DOUBLE_QUANT=True, NESTED_BLOCKSIZE=256, ROUND=0, BITWISE_BF16=False)
NF4_PTRS = dict(w_ptr="*u8", packed_ptr="*u8", absmax_ptr="*u8")
BF16_IO = dict(x_ptr="*bf16", xd_ptr="*bf16", bias_ptr="*bf16", y_ptr="*bf16", z_ptr="*bf16",
               dy_ptr="*bf16", dx_ptr="*bf16")
BF16_DOT = dict(DOT_DTYPE=tl.bfloat16, DOT_PRECISION="tf32")
FP32_DOT = dict(DOT_DTYPE=tl.float32, DOT_PRECISION="ieee")


CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


FORWARD_CASES = [
    # training tile, bf16, NF4, DoRA with dropout (second accumulator), bias, z saved
    dict(consts=dict(**NF4_META, EVEN_K=True, ALIGNED_K=True, **BF16_DOT, DORA=True, SECOND=True, HAS_BIAS=True, SAVE_Z=True,
                     SPLIT_K=1, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_R=16, GROUP_M=8),
         ptrs={**NF4_PTRS, **BF16_IO}, warps=8),
    # decode tile with split-K, fp32 activations on a dense weight, LoRA
    dict(consts=dict(**dict(NF4_META, IS_NF4=False), EVEN_K=True, ALIGNED_K=False, **FP32_DOT, DORA=False, SECOND=False,
                     HAS_BIAS=False, SAVE_Z=False, SPLIT_K=4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, BLOCK_R=64,
                     GROUP_M=1),
         ptrs={}, warps=4),
    # odd K (bytes straddle rows), fp16, single-quant NF4
    dict(consts=dict(**dict(NF4_META, DOUBLE_QUANT=False), EVEN_K=False, ALIGNED_K=False, DOT_DTYPE=tl.float16,
                     DOT_PRECISION="tf32", DORA=True, SECOND=False, HAS_BIAS=True, SAVE_Z=False, SPLIT_K=1,
                     BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, BLOCK_R=32, GROUP_M=8),
         ptrs={"w_ptr": "*u8", "packed_ptr": "*u8", "x_ptr": "*fp16", "y_ptr": "*fp16", "bias_ptr": "*fp16"},
         warps=4),
]
FORWARD_IDS = ["train_bf16_nf4_dora_dropout", "decode_fp32_dense_splitk", "fp16_nf4_odd_k"]
for _id, _c in zip(FORWARD_IDS, FORWARD_CASES):
    CASES[f"fused_forward_{_id}"] = (lambda c=_c: compile_for_gpu(klora._fused_linear_kernel, c["consts"],
                                                                   c["ptrs"], num_warps=c["warps"]))


@case
def split_k_epilogue():
    compile_for_gpu(klora._split_k_epilogue_kernel,
                    dict(DORA=True, SECOND=True, HAS_BIAS=True, SAVE_Z=True, SPLIT_K=4, BLOCK_M=32, BLOCK_N=64,
                         BLOCK_R=16), dict(bias_ptr="*bf16", y_ptr="*bf16", z_ptr="*bf16"))


def _dx(mode):
    compile_for_gpu(klora._fused_linear_dx_kernel,
                    dict(**NF4_META, EVEN_K=True, ALIGNED_K=True, **BF16_DOT, SCALE_DY=mode == "dora",
                         SECOND=mode == "dora-dropout", DROPOUT=mode == "dora-dropout",
                         BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, BLOCK_R=16, GROUP_M=8),
                    {**NF4_PTRS, **BF16_IO}, num_warps=8)


CASES["dx_dora"] = lambda: _dx("dora")
CASES["dx_dora_dropout"] = lambda: _dx("dora-dropout")


@case
def rank_kernels():
    compile_for_gpu(klora._lora_shrink_kernel,
                    dict(DROPOUT=True, WRITE_XD=True, BLOCK_M=64, BLOCK_K=64, BLOCK_R=16),
                    dict(x_ptr="*bf16", xd_ptr="*bf16"))
    compile_for_gpu(klora._outer_reduce_kernel, dict(DROPOUT=True, BLOCK_M=64, BLOCK_P=16, BLOCK_Q=64),
                    dict(r_ptr="*bf16"))


@case
def dora_kernels():
    compile_for_gpu(kdora._row_norm_kernel,
                    dict(**dict(NF4_META, ROUND=1), EVEN_K=True, ALIGNED_K=False, BLOCK_N=32, BLOCK_K=128, BLOCK_R=16),
                    NF4_PTRS)
    compile_for_gpu(kdora._column_dot_kernel, dict(BLOCK_M=32, BLOCK_N=128), dict(a_ptr="*bf16", b_ptr="*bf16"))


@case
def nf4_and_dropout_kernels():
    compile_for_gpu(knf4._nf4_dequantize_kernel,
                    dict(BLOCKSIZE=64, DOUBLE_QUANT=True, NESTED_BLOCKSIZE=256, BLOCK=1024),
                    dict(out_ptr="*bf16", packed_ptr="*u8", absmax_ptr="*u8"))
    compile_for_gpu(knf4._nf4_quantize_kernel, dict(BLOCKSIZE=64, BLOCKS_PER_PROGRAM=64),
                    dict(x_ptr="*bf16", packed_ptr="*u8"))
    compile_for_gpu(kdropout._dropout_scale_kernel, dict(BLOCK=1024))


def main():
    results = {}
    for name, fn in CASES.items():
        try:
            fn()
            results[name] = "ok"
        except Exception as e:  # reported per case by the parent test
            results[name] = f"{type(e).__name__}: {str(e)[-2000:]}"
    print(json.dumps(results))


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_compiles_for_sm90(results, name):
    assert results[name] == "ok", results[name]


if __name__ == "__main__":
    main()
