"""DoRA's extra pieces: the row norm n = ‖W + s·B A‖₂ in one streamed pass over the weight, and
the magnitude gradient's column reduction Σ_i dy_ij z_ij.

The row norm reads each NF4 byte once, forms W + s·B A tile by tile in registers (B A is a rank-r
product, cheap to recompute) and accumulates the sum of squares in fp32: the N×K matrix PEFT
materialises every step never exists here.
"""

import torch
import triton
import triton.language as tl

from . import decode as _decode
from . import lora as _lora
from ._config import interpreting, pdl_args, pdl_chain
from .decode import _rows, lut_tile, operand_order
from .dropout import round_to
from .lora import _ROUND, _nf4_blocksize, _pow2, _rank_block, rank_product, sum_parts, weight_args, weight_tile
from .nf4 import stats_args


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
    PDL: tl.constexpr = False,
):
    pdl_chain(PDL)
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
    PDL: tl.constexpr = False,
):
    """out[split, j] = Σ_i a_ij b_ij over the split's rows, in fp32."""
    pdl_chain(PDL)
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


@triton.jit
def _row_norm_lut_kernel(
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
    a_ptr, b_ptr, scaling, part_ptr,
    N, K, R, split_words, row_words,
    stride_ar, stride_ak, stride_bn, stride_br, stride_ps,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    ROUND: tl.constexpr, BITWISE_BF16: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Σ_k (W + s·B A)² over this split's K range, per row of a BLOCK_N tile, for an NF4 weight
    whose rows hold whole blocks. W is decoded as the table-lookup decode does it (`decode.py`),
    in the layout of a tensor-core operand, which is also the layout of an MMA's accumulator: so
    the rank product adds into the decoded tile itself, v = W + (s·B) Aᵀ with W as the MMA's
    initial accumulator, and A is read in the tile's permuted K order."""
    pdl_chain(PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    WORDS: tl.constexpr = BLOCK_K // 8
    row0 = tl.minimum(pid_n * BLOCK_N, N - BLOCK_N)   # the last tile ends at row N
    offs_n = row0 + tl.arange(0, BLOCK_N)
    table = tl.load(code_ptr + tl.arange(0, 16))
    offs_k = tl.arange(0, BLOCK_K)
    words_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
    rows_lo = _rows(row0, BLOCK_N)
    rows_hi = _rows(row0 + 8, BLOCK_N)
    sumsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    kw_begin = pid_s * split_words
    for kw in range(kw_begin, tl.minimum(kw_begin + split_words, row_words), WORDS):
        k0 = kw * 8
        w = lut_tile(words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, table, code_ptr,
                     rows_lo, rows_hi, kw, row_words, K, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE,
                     False, False, BLOCK_N, BLOCK_K)[0]
        v = round_to(w, ROUND, BITWISE_BF16)   # W in its dtype
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br, mask=mask_r[None, :],
                        other=0.0).to(tl.float32)
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + (k0 + offs_k)[None, :] * stride_ak, mask=mask_r[:, None],
                        other=0.0).to(tl.float32)
            a = operand_order(a, BLOCK_K)   # in the decoded tile's column order
            v = tl.dot(b * scaling, a, v, input_precision=PRECISION)
        sumsq += tl.sum(v * v, axis=1)
    # a tile moved back from the end leaves the rows the previous tile stores
    live = offs_n >= pid_n * BLOCK_N
    tl.store(part_ptr + pid_s * stride_ps + offs_n, sumsq, mask=live)


@triton.jit
def _sqrt_sum_kernel(part_ptr, out_ptr, N, stride_ps, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr = False):
    """out = sqrt(Σ_s part[s]) per row: the splits' sums of squares in a fixed order."""
    pdl_chain(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(part_ptr + s * stride_ps + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, tl.sqrt_rn(acc), mask=mask)


def _lut_eligible(weight, N):
    if isinstance(weight, torch.Tensor):
        return False
    K = weight.shape[1]
    return K % weight.blocksize == 0 and K % _decode.BLOCK_K == 0 and N >= 16 and N * K // 8 < 2**31


def _row_norm_lut(weight, lora_A, lora_B, scaling):
    N, R = lora_B.shape
    K = weight.shape[1]
    absmax, nested, nested_code, offset, code, dq, nbs = stats_args(weight)
    if interpreting():
        BLOCK_N, num_warps = max(16, min(64, 1 << (N.bit_length() - 1))), 4
    else:
        BLOCK_N, num_warps = (128 if N >= 128 else 64 if N >= 64 else 16), 8 if N >= 128 else 4
    BLOCK_K = _decode.BLOCK_K
    tiles = triton.cdiv(N, BLOCK_N)
    # split K so the row tiles fill the GPU; the splits' sums are added in a fixed order
    splits = 1 if interpreting() else max(1, min(triton.cdiv(2 * _lora._sm_count(lora_A.device), tiles),
                                                 K // BLOCK_K, 16))
    k_per_split = triton.cdiv(triton.cdiv(K, splits), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(K, k_per_split)
    part = torch.empty((splits, N), dtype=torch.float32, device=lora_A.device)
    _row_norm_lut_kernel[(tiles, splits)](
        weight.packed, absmax, nested, nested_code, offset, code, lora_A, lora_B, scaling, part,
        N, K, R, k_per_split // 8, K // 8,
        lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1), part.stride(0),
        BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=dq, NESTED_BLOCKSIZE=nbs, ROUND=_ROUND[weight.dtype],
        BITWISE_BF16=interpreting(), PRECISION="ieee" if interpreting() else "tf32x3",
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=_rank_block(R), num_warps=num_warps, enable_fp_fusion=False,
        **pdl_args(lora_A.device),
    )
    out = torch.empty(N, dtype=torch.float32, device=lora_A.device)
    _sqrt_sum_kernel[(triton.cdiv(N, 1024),)](part, out, N, part.stride(0), SPLITS=splits, BLOCK=1024,
                                              enable_fp_fusion=False, **pdl_args(lora_A.device))
    return out


def row_norm(weight, lora_A, lora_B, scaling):
    """fp32 [N]: ‖W_j + s·(B A)_j‖₂ for every output row j. An NF4 weight is decoded in its
    original dtype (as PEFT's `dequantize_module_weight` gives it); a dense one as stored. An NF4
    weight with whole blocks a row and K a multiple of 128 takes the table-lookup decode."""
    N, R = lora_B.shape
    K = lora_A.shape[1]
    if _lut_eligible(weight, N):
        return _row_norm_lut(weight, lora_A, lora_B, scaling)
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
        **pdl_args(lora_A.device),
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
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, enable_fp_fusion=False, **pdl_args(a.device),
    )
    return sum_parts(out)
