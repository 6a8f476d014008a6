"""The forward at decode-sized M (up to 64 rows) over an NF4 weight: every weight element is read
once, as 4 bits, and decoded in registers with as few instructions as the format allows.

At small M the GEMM is bound by reading and decoding W, not by the tensor cores, so the decode is
the loop. Per element it costs: the code index out of a 32-bit word of packed bytes (a shift and
a mask), one lookup in the 16-entry NF4 table (`tl.gather` of a 1-D table lowers to a
shared-memory read with a 32-bit address, conflict-free: 16 words in 16 banks), the multiply by
the row's block scale in fp32 and one rounding to the activation dtype (two values a convert):
bitsandbytes' dequantized value exactly. Then the tile is the A operand of a swapped GEMM,
yᵀ[BLOCK_N, M] += W[BLOCK_N, BLOCK_K] · xᵀ[BLOCK_K, M], so the rows of W fill the tensor core's M
dimension and the few rows of x its N dimension (16 at least).

The eight codes of a word are taken apart with nested `tl.join`s, which keep them in one thread's
registers but in bit-reversed order; instead of moving them, the tile's K order is that order, and
x is read in the same permuted order (the product does not depend on the order of K). Rows past N
re-read the last row (no mask in the loop) and are not stored. K is split across programs when the
N tiles alone would not fill the GPU; the fp32 partials are summed in a fixed order by
`lora._split_k_epilogue_kernel`, which applies the LoRA / DoRA / bias epilogue.
"""

import torch
import triton
import triton.language as tl

from ._config import interpreting, store_dtype
from .dropout import round_to
from . import lora as _lora
from .lora import _ROUND, _dot_args, _forward_epilogue, _pow2, _rank_block, _split_k_epilogue_kernel
from .nf4 import nf4_scale, stats_args

BLOCK_K = 128


@triton.jit
def _bitrev3(j):
    return ((j & 1) << 2) | (j & 2) | ((j >> 2) & 1)


@triton.jit
def _decode_linear_kernel(
    x_ptr, packed_ptr,
    # NF4 statistics
    absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
    # epilogue operands (one split), else the partials
    xa_ptr, b_ptr, mn_ptr, bias_ptr, scaling, y_ptr, z_ptr, part_ptr,
    M, N, K, R, k_per_split,
    stride_xm, stride_xk, stride_xam, stride_bn, stride_br, stride_ym, stride_ps,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    ROUND: tl.constexpr, BITWISE_BF16: tl.constexpr, DOT_DTYPE: tl.constexpr, RANK_PRECISION: tl.constexpr,
    DORA: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_Z: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)              # a ragged last tile re-reads row N - 1
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    table = tl.load(code_ptr + tl.arange(0, 16))
    c = tl.arange(0, BLOCK_K)
    kperm = 8 * (c // 8) + _bitrev3(c % 8)       # K index of the tile's logical column c
    words_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
    SCALES: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K > BLOCKSIZE else 1
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_begin = pid_s * k_per_split
    for k0 in range(k_begin, tl.minimum(k_begin + k_per_split, K), BLOCK_K):
        word = tl.load(words_ptr + rows[:, None] * (K // 8) + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :])
        # element j of a word: byte j // 2, its high nibble first
        nib = tl.join(tl.join(tl.join((word >> 4) & 0xF, word & 0xF), tl.join((word >> 12) & 0xF, (word >> 8) & 0xF)),
                      tl.join(tl.join((word >> 20) & 0xF, (word >> 16) & 0xF),
                              tl.join((word >> 28) & 0xF, (word >> 24) & 0xF)))
        code = tl.reshape(tl.gather(table, tl.reshape(nib, (BLOCK_N * BLOCK_K,)), 0), (BLOCK_N, BLOCK_K))
        if SCALES == 1:
            block = rows * (K // BLOCKSIZE) + k0 // BLOCKSIZE
            scale = nf4_scale(block, True, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                              DOUBLE_QUANT, NESTED_BLOCKSIZE)
            w = code * scale[:, None]
        else:
            # the tile spans SCALES quantization blocks of each row, in order (a block is a
            # multiple of 8 elements, so the permutation stays inside it)
            block = rows[:, None] * (K // BLOCKSIZE) + k0 // BLOCKSIZE + tl.arange(0, SCALES)[None, :]
            scale = nf4_scale(block, True, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                              DOUBLE_QUANT, NESTED_BLOCKSIZE)
            w = tl.reshape(tl.reshape(code, (BLOCK_N, SCALES, BLOCKSIZE)) * scale[:, :, None], (BLOCK_N, BLOCK_K))
        w = round_to(w, ROUND, BITWISE_BF16).to(DOT_DTYPE)   # bitsandbytes' value in x's dtype
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + (k0 + kperm)[:, None] * stride_xk, mask=mask_m[None, :],
                     other=0.0)
        acc = tl.dot(w, xt.to(DOT_DTYPE), acc)
    acc_mn = tl.trans(acc)                        # [BLOCK_M, BLOCK_N], as the epilogue takes it
    offs_n64 = offs_n.to(tl.int64)
    if SPLIT_K == 1:
        _forward_epilogue(acc_mn, acc_mn, offs_m.to(tl.int64), offs_n64, M, N,
                          xa_ptr, stride_xam, b_ptr, stride_bn, stride_br, scaling, 1.0,
                          mn_ptr, bias_ptr, y_ptr, stride_ym, z_ptr, stride_ym, R,
                          DORA, False, HAS_BIAS, SAVE_Z, RANK_PRECISION, BLOCK_R)
    else:
        mask = mask_m[:, None] & (offs_n < N)[None, :]
        tl.store(part_ptr + pid_s * stride_ps + offs_m[:, None] * N + offs_n64[None, :], acc_mn, mask=mask)


def eligible(x, weight) -> str:
    """'' when `decode_linear` takes this call, else why not."""
    if isinstance(weight, torch.Tensor):
        return "a dense weight"
    K = weight.shape[1]
    if K % weight.blocksize or K % BLOCK_K:
        return f"in_features not a multiple of {BLOCK_K} and of the quantization block"
    if x.shape[0] > 64:
        return "more than 64 rows"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"{x.dtype} activations"
    if weight.shape[0] * K // 8 >= 2**31:
        return "a weight of 2^34 elements or more"
    return ""


def _config(M, N):
    if interpreting():
        return dict(BLOCK_N=min(64, _pow2(N)), num_warps=4, num_stages=1)
    # 128 weight rows x 128 columns a trip: about 0.2 warp-instructions a weight element and no
    # spill up to 64 rows of x with 8 warps, whose 128 registers a thread leave room for two
    # programs an SM to hide the loads' latency (sm_90 lowering, `python -m bench.model`)
    return dict(BLOCK_N=128, num_warps=8, num_stages=1)


def decode_linear(x, weight, xa, lora_B, scaling, *, bias=None, mn=None, save_z=False, split_k=None):
    """y (and z with `save_z`) of `lora.fused_linear` for an NF4 weight at M <= 64, without dropout
    (`eligible` says when); same arguments and outputs."""
    M, K = x.shape
    N, R = lora_B.shape
    cfg = _config(M, N)
    BLOCK_N = cfg["BLOCK_N"]
    BLOCK_M = max(16, _pow2(M))
    absmax, nested, nested_code, offset, code, dq, nbs = stats_args(weight)
    dots = _dot_args(x.dtype)
    tiles = triton.cdiv(N, BLOCK_N)
    if split_k is None:
        split_k = 1 if interpreting() else max(1, min(triton.cdiv(2 * _lora._sm_count(x.device), tiles),
                                                      K // BLOCK_K, 32))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), BLOCK_K) * BLOCK_K
    split_k = triton.cdiv(K, k_per_split)
    out_dtype = store_dtype(x.dtype)
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    z = torch.empty((M, N), dtype=out_dtype, device=x.device) if save_z else y
    part = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device) if split_k > 1 else y
    flags = dict(DORA=mn is not None, HAS_BIAS=bias is not None, SAVE_Z=save_z)
    BLOCK_R = _rank_block(R)
    mn_arg = mn if mn is not None else xa
    bias_arg = bias if bias is not None else xa
    _decode_linear_kernel[(tiles, split_k)](
        x, weight.packed, absmax, nested, nested_code, offset, code,
        xa, lora_B, mn_arg, bias_arg, scaling, y, z, part,
        M, N, K, R, k_per_split,
        x.stride(0), x.stride(1), xa.stride(0), lora_B.stride(0), lora_B.stride(1), y.stride(0),
        part.stride(0) if split_k > 1 else 0,
        BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=dq, NESTED_BLOCKSIZE=nbs,
        ROUND=_ROUND[x.dtype] if interpreting() else 0, BITWISE_BF16=interpreting(),
        DOT_DTYPE=dots["DOT_DTYPE"], RANK_PRECISION=dots["RANK_PRECISION"], **flags, SPLIT_K=split_k,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False,
    )
    if split_k > 1:
        EM, EN = (16 if M <= 16 else 32), 64
        _split_k_epilogue_kernel[(triton.cdiv(M, EM), triton.cdiv(N, EN))](
            part, part, xa, lora_B, mn_arg, bias_arg, scaling, 1.0, y, z, M, N, R, xa.stride(0),
            lora_B.stride(0), lora_B.stride(1), y.stride(0), part.stride(0), **flags, SECOND=False,
            RANK_PRECISION=dots["RANK_PRECISION"], SPLIT_K=split_k, BLOCK_M=EM, BLOCK_N=EN, BLOCK_R=BLOCK_R,
            enable_fp_fusion=False,
        )
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
        z = z.to(x.dtype) if save_z else y
    return (y, z) if save_z else y
