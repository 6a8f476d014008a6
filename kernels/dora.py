"""DoRA's extra pieces: the row norm n = ‖W + s·B A‖₂ in one streamed pass over the weight, and
the magnitude gradient's column reduction Σ_i dy_ij z_ij.

The row norm reads each NF4 byte once, forms W + s·B A tile by tile in registers (B A is a rank-r
product, cheap to recompute) and accumulates the sum of squares in fp32: the N×K matrix PEFT
materialises every step never exists here.
"""

import torch
import triton
import triton.language as tl

from ._config import interpreting
from .lora import _nf4_blocksize, _pow2, _rank_block, rank_product, weight_args, weight_tile


@triton.jit
def _row_norm_kernel(
    w_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
    a_ptr, b_ptr, scaling, out_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    IS_NF4: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED_K: tl.constexpr, ROUND: tl.constexpr,
    BITWISE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    sumsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = weight_tile(w_ptr, stride_wn, stride_wk,
                        packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
                        offs_n, mask_n, k0, K, IS_NF4, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE,
                        EVEN_K, ALIGNED_K, ROUND, BITWISE_BF16, BLOCK_K)
        # W + s·B A, the rank product in full fp32 as PEFT forms it
        v = rank_product(w.to(tl.float32), b_ptr, stride_bn, stride_br, a_ptr, stride_ar, stride_ak, offs_n, offs_k,
                         mask_n, offs_k < K, R, scaling, "ieee", BLOCK_R)
        sumsq += tl.sum(v * v, axis=1)
    tl.store(out_ptr + offs_n, tl.sqrt_rn(sumsq), mask=mask_n)   # correctly rounded, as torch


@triton.jit
def _column_dot_kernel(
    a_ptr, b_ptr, out_ptr, M, N, m_per_split,
    stride_am, stride_an, stride_bm, stride_bn, stride_os,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[split, j] = Σ_i a_ij b_ij over the split's rows, in fp32."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    m_begin = tl.program_id(1).to(tl.int64) * m_per_split
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, tl.minimum(m_per_split, M - m_begin), BLOCK_M):
        offs_m = m_begin + m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & mask_n[None, :]
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an, mask=mask, other=0.0)
        b = tl.load(b_ptr + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn, mask=mask, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=0)
    tl.store(out_ptr + tl.program_id(1) * stride_os + offs_n, acc, mask=mask_n)


def row_norm(weight, lora_A, lora_B, scaling):
    """fp32 [N]: ‖W_j + s·(B A)_j‖₂ for every output row j. An NF4 weight is decoded in its
    original dtype (as PEFT's `dequantize_module_weight` gives it); a dense one as stored."""
    N, R = lora_B.shape
    K = lora_A.shape[1]
    wa = weight_args(weight, None if isinstance(weight, torch.Tensor) else weight.dtype)
    out = torch.empty(N, dtype=torch.float32, device=lora_A.device)
    if interpreting():
        BLOCK_N, BLOCK_K, num_warps = min(64, _pow2(N)), min(128, _pow2(K)), 4
    else:
        # A tile inside one quantization block decodes one scale a row (see nf4_tile).
        blocksize = _nf4_blocksize(weight)
        BLOCK_N, BLOCK_K, num_warps = 16, min(64, blocksize or 64), 4
    _row_norm_kernel[(triton.cdiv(N, BLOCK_N),)](
        wa["w"], *wa["stats"], lora_A, lora_B, scaling, out, N, K, R,
        wa["stride_wn"], wa["stride_wk"], lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), **wa["meta"],
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=_rank_block(R), num_warps=num_warps, enable_fp_fusion=False,
    )
    return out


def column_dot(a, b):
    """fp32 [N]: Σ_i a_ij b_ij for a, b of shape [M, N] (any strides)."""
    M, N = a.shape
    BLOCK_M, BLOCK_N = (min(64, _pow2(M)), min(128, _pow2(N))) if interpreting() else (16, 128)
    split_m = 1 if interpreting() else max(1, min(triton.cdiv(M, 8 * BLOCK_M), 64))
    m_per_split = triton.cdiv(triton.cdiv(M, split_m), BLOCK_M) * BLOCK_M
    split_m = triton.cdiv(M, m_per_split)
    out = torch.empty((split_m, N), dtype=torch.float32, device=a.device)
    _column_dot_kernel[(triton.cdiv(N, BLOCK_N), split_m)](
        a, b, out, M, N, m_per_split, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, enable_fp_fusion=False,
    )
    return out[0] if split_m == 1 else out.sum(0)
