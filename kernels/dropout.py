"""Dropout without stored masks. The LoRA input is viewed as [M, K] (3-D inputs flattened, row
m = the flat row, k = the column). Its elements are drawn in groups of four along a row: element
(m, k) takes word k % 4 of Philox4x32-10 (Triton's `philox`, key `seed`) at the counter
(k // 4, m, 0, 0), the same words as `tl.randint4x(seed, m · 2³² + k // 4)`, and is kept when
that word, shifted right by 8, is at least floor(fp32(p) · 2²⁴). Four keep decisions cost one
Philox call and integer compares (p is resolved to 2⁻²⁴); forward and backward regenerate the
same mask from one seed. The counter needs neither K nor a 64-bit product, and its first round
runs on a row vector and a column vector.

`peft_ops.ops.dropout_keep` draws the same stream in PyTorch, so CPU, interpreter and GPU draw
identical masks for the same seed.
"""

import torch
import triton
import triton.language as tl
from triton.language.random import philox

THRESHOLD_BITS = 24     # a keep decision compares the top 24 bits of its Philox word


@triton.jit
def keep_threshold(p):
    """floor(p · 2²⁴) for the fp32 drop probability p: element kept when (word >> 8) >= it."""
    return (tl.cast(p, tl.float32) * 16777216.0).to(tl.int32)


@triton.jit
def keep_mask(seed, rows, k_start, threshold, BLOCK_K: tl.constexpr):
    """bool keep decisions [len(rows), BLOCK_K] of the elements (rows, k_start + j), j < BLOCK_K;
    `rows` below 2³², `k_start` a multiple of 4. One Philox call per four elements, the four
    decisions interleaved into place along the row."""
    tl.static_assert(BLOCK_K % 4 == 0, "dropout tiles hold whole groups of four columns")
    group = (k_start // 4 + tl.arange(0, BLOCK_K // 4)).to(tl.uint32)[None, :]
    row = rows.to(tl.uint32)[:, None]
    zero = tl.zeros_like(group)
    w0, w1, w2, w3 = philox(seed, group, row, zero, zero)
    k0, k1 = (w0 >> 8).to(tl.int32) >= threshold, (w1 >> 8).to(tl.int32) >= threshold
    k2, k3 = (w2 >> 8).to(tl.int32) >= threshold, (w3 >> 8).to(tl.int32) >= threshold
    # join(join(k0, k2), join(k1, k3))[..., i, j] is decision 2 i + j of the group
    return tl.reshape(tl.join(tl.join(k0, k2), tl.join(k1, k3)), (rows.shape[0], BLOCK_K))


@triton.jit
def dropout_scale(seed, rows, k_start, threshold, inv_keep, BLOCK_K: tl.constexpr):
    """keep/(1-p) as fp32 [len(rows), BLOCK_K] for the elements (rows, k_start + j)."""
    return tl.where(keep_mask(seed, rows, k_start, threshold, BLOCK_K), inv_keep, 0.0)


@triton.jit
def round_to(v, ROUND: tl.constexpr, BITWISE_BF16: tl.constexpr):
    """Round fp32 `v` to bf16 (ROUND=1) or fp16 (ROUND=2) and back; ROUND=0 leaves it.

    The interpreter truncates fp32 -> bf16 casts (SPEC §5), so there bf16 rounding to nearest
    even is done on the bits (exact for finite values).
    """
    if ROUND == 1:
        if BITWISE_BF16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
        else:
            v = v.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _dropout_scale_kernel(out_ptr, seed, M, K, p, inv_keep, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_start = tl.program_id(1) * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    scale = dropout_scale(seed, rows, k_start, keep_threshold(p), inv_keep, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + offs_k[None, :], scale, mask=(rows[:, None] < M) & (offs_k[None, :] < K))


def dropout_scale_tensor(seed: int, shape, p: float, device) -> torch.Tensor:
    """The fp32 tensor keep/(1-p) the kernels use for a LoRA input of `shape` (its last dim is K;
    for tests and references: the fused kernels never materialise it)."""
    out = torch.empty(shape, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    K = out.shape[-1]
    M = out.numel() // K
    BLOCK_M, BLOCK_K = 8, 128
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(K, BLOCK_K))
    _dropout_scale_kernel[grid](out, seed, M, K, p, 1.0 / (1.0 - p), BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return out
