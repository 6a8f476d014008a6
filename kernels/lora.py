"""Fused (Q)LoRA / (Q)DoRA linear: shrink, base GEMM with in-register NF4 decode and the LoRA/DoRA
epilogue, the backward GEMM for dx, and the rank-sized reductions for dA and dB.

Shapes (SPEC §3): x [M, K], W [N, K], A [r, K], B [N, r]; xa = drop(x) Aᵀ is [M, r] in fp32.

    forward   y  = x Wᵀ + s·xa Bᵀ + bias                                  (LoRA)
              z  = x Wᵀ + s·xa Bᵀ,   y = (m/n) ⊙ z + bias                  (DoRA)
              zd = xd Wᵀ + s·xa Bᵀ,  y = x Wᵀ + (m/n − 1) ⊙ xd Wᵀ + (m/n) ⊙ s·xa Bᵀ + bias
                                                                   (DoRA, dropout; xd = drop(x))
    backward  dx = (dy ⊙ c) W + [D ⊙] (s·gb A [+ (dy ⊙ c2) W])
              dA = s·gbᵀ drop(x),   dB = s·dyᵀ xa   (DoRA scales dB's rows by m/n afterwards)

The weight tile is decoded from NF4 (or loaded dense) straight into registers; no dense copy of
W is ever written. Accumulation is fp32. The rank-sized products carry the fp32 adapter's
precision, as PEFT's fp32 matmuls do: with 16-bit activations in "tf32x3" on the tensor cores
(fp32-accurate; in the epilogues added straight into the GEMM's accumulator), with fp32
activations in "ieee" on the FMA units, as torch's fp32 matmul. Every
rank loop walks r in chunks of at most 32, so r = 256 costs time, not registers. Split reductions
write fp32 partials that the launcher sums in a fixed order, so results are deterministic.
"""

import torch
import triton
import triton.language as tl

from ._config import dot_dtype, interpreting, pdl_args, pdl_chain, store_dtype
from .dropout import dropout_scale, keep_mask, keep_threshold, round_to
from .nf4 import nf4_tile, stats_args


# ----------------------------------------------------------------------------------------------
# jitted helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def weight_tile(w_ptr, stride_wn, stride_wk,
                packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
                rows, mask_rows, k0, K,
                IS_NF4: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                NESTED_BLOCKSIZE: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED_K: tl.constexpr, ROUND: tl.constexpr,
                BITWISE_BF16: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tile W[rows, k0:k0+BLOCK_K], zero where masked: decoded from NF4 bytes to fp32, or loaded
    from a dense tensor in its own dtype (no fp32 round trip for a 16-bit weight)."""
    if IS_NF4:
        w = nf4_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
                     rows, mask_rows, k0, K, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, EVEN_K, ALIGNED_K, BLOCK_K)
        w = round_to(w, ROUND, BITWISE_BF16)
    else:
        cols = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask = mask_rows[:, None] & (cols < K)[None, :]
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk, mask=mask, other=0.0)
    return w


@triton.jit
def grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile coordinates ordered in groups of GROUP_M row-tiles so neighbours share W in L2."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def dot_split3(a, b, acc, FP32_LEFT: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """acc + a · b at fp32 accuracy on the bf16 tensor cores ("bf16x3"), one operand holding bf16
    values (exact) and the other fp32 (`a` when FP32_LEFT, else `b`): the fp32 one is split into
    three bf16 terms hi + mid + lo whose sum is exact, so every product is exact in the fp32
    accumulator. The smallest terms go first. Half the tensor-core time of "tf32x3", and the
    16-bit tile stays as loaded.

    The split truncates: hi keeps the top 8 significant bits (a mask of the fp32 bits), mid the
    next 8 of the exact remainder, lo the last 8, each exact in bf16 (fp32's exponent range), so
    no rounding conversion is needed and the interpreter's truncating casts (SPEC §5) are exact
    too. Masks and subtractions issue on the integer and FMA pipes instead of conversions."""
    if FP32_LEFT:
        f32 = a
    else:
        f32 = b
    hi = (f32.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
    rest = f32 - hi
    mid = (rest.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
    lo = (rest - mid).to(DOT_DTYPE)
    hi = hi.to(DOT_DTYPE)
    mid = mid.to(DOT_DTYPE)
    if FP32_LEFT:
        b = b.to(DOT_DTYPE)
        acc = tl.dot(lo, b, acc)
        acc = tl.dot(mid, b, acc)
        acc = tl.dot(hi, b, acc)
    else:
        a = a.to(DOT_DTYPE)
        acc = tl.dot(a, lo, acc)
        acc = tl.dot(a, mid, acc)
        acc = tl.dot(a, hi, acc)
    return acc


@triton.jit
def rank_product(acc, l_ptr, stride_lm, stride_lr, r_ptr, stride_rr, stride_rn, offs_m, offs_n, mask_m, mask_n,
                 R, scale, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, stride_ls=0, L_PARTS: tl.constexpr = 1):
    """acc + scale · L[offs_m, :R] · Rm[:R, offs_n] for an fp32 tile `acc`, accumulated in place;
    L may come as L_PARTS fp32 parts `stride_ls` apart (a split shrink's), summed in order.

    The rank is walked in chunks of BLOCK_R, so any r fits in registers and shared memory. On
    16-bit GEMMs PRECISION is "tf32x3": tensor cores at fp32 accuracy, accumulating straight
    into the GEMM's accumulator instead of holding a second tile.
    """
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        l_tile = l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr
        l_mask = mask_m[:, None] & mask_r[None, :]
        lhs = tl.load(l_tile, mask=l_mask, other=0.0).to(tl.float32)
        for part in tl.static_range(1, L_PARTS):   # unrolled: no loop to model, none to pipeline
            lhs += tl.load(l_tile + part * stride_ls, mask=l_mask, other=0.0)
        rhs = tl.load(r_ptr + offs_r[:, None] * stride_rr + offs_n[None, :] * stride_rn,
                      mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(lhs * scale, rhs, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _forward_epilogue(acc, acc_d, offs_m, offs_n, M, N,
                      xa_ptr, stride_xam, b_ptr, stride_bn, stride_br, scaling, inv_keep,
                      mn_ptr, bias_ptr, y_ptr, stride_ym, z_ptr, stride_zm, R,
                      DORA: tl.constexpr, SECOND: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SAVE_Z: tl.constexpr, RANK_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                      stride_xas=0, XA_PARTS: tl.constexpr = 1):
    """acc = x Wᵀ (and acc_d = (keep ⊙ x) Wᵀ) for one [BLOCK_M, BLOCK_N] tile -> y (and z); xa
    may come as XA_PARTS parts `stride_xas` apart (`rank_product`).

    The LoRA term s·xa Bᵀ is added into an accumulator rather than formed beside it: y = acc + lora
    (LoRA), z = acc + lora and y = (m/n) z (DoRA), and with dropout z = acc_d/(1-p) + lora and
    y = (acc − acc_d/(1-p)) + (m/n) z, which is the form in the module docstring rearranged.
    """
    mask_m = offs_m < M
    mask_n = offs_n < N
    if DORA and SECOND:
        acc_d = acc_d * inv_keep
        acc = acc - acc_d
        z = rank_product(acc_d, xa_ptr, stride_xam, 1, b_ptr, stride_br, stride_bn, offs_m, offs_n,
                         mask_m, mask_n, R, scaling, RANK_PRECISION, BLOCK_R, stride_xas, XA_PARTS)
    else:
        z = rank_product(acc, xa_ptr, stride_xam, 1, b_ptr, stride_br, stride_bn, offs_m, offs_n,
                         mask_m, mask_n, R, scaling, RANK_PRECISION, BLOCK_R, stride_xas, XA_PARTS)
    if DORA:
        mn = tl.load(mn_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if SECOND:
            y = acc + mn * z
        else:
            y = mn * z
    else:
        y = z
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    if SAVE_Z:
        tl.store(z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :], z.to(z_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr, xd_ptr,
    M, K, R, k_per_split,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_os, stride_om, stride_xdm,
    # dropout on x
    seed, p, inv_keep,
    DROPOUT: tl.constexpr, WRITE_XD: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """out[split] = drop(x)[:, split's K range] · A[:, same]ᵀ in fp32, one chunk of BLOCK_R ranks
    a program; optionally writes keep ⊙ x (the first rank chunk does). The product is of keep ⊙ x
    (exact in x's dtype) and 1/(1-p) scales the fp32 result; with PRECISION "bf16x3" a bf16 x
    feeds the tensor cores as loaded (`dot_split3`)."""
    pdl_chain(PDL)
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_begin = pid_s * k_per_split
    for k0 in range(k_begin, tl.minimum(k_begin + k_per_split, K), BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_k = offs_k < K
        mask = mask_m[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
        if DROPOUT:
            # keep ⊙ x, exact in x's dtype; the 1/(1-p) goes on the fp32 result
            x = tl.where(keep_mask(seed, offs_m, k0, keep_threshold(p), BLOCK_K), x, 0.0)
            if WRITE_XD:
                if pid_r == 0:
                    tl.store(xd_ptr + offs_m[:, None] * stride_xdm + offs_k[None, :],
                             x.to(xd_ptr.dtype.element_ty), mask=mask)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        if PRECISION == "bf16x3":
            acc = dot_split3(x, tl.trans(a), acc, False, DOT_DTYPE)
        else:
            acc += tl.dot(x.to(tl.float32), tl.trans(a), input_precision=PRECISION)
    if DROPOUT:
        acc = acc * inv_keep
    tl.store(out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_r[None, :], acc,
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _fused_linear_kernel(
    x_ptr, xd_ptr, w_ptr,
    # NF4 statistics (unused for a dense weight)
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
    # epilogue operands
    xa_ptr, b_ptr, mn_ptr, bias_ptr, scaling, inv_keep,
    # outputs: y and z, or fp32 partial sums of x Wᵀ / xd Wᵀ when split over K
    y_ptr, z_ptr, part_ptr, part_d_ptr,
    M, N, K, R, k_per_split,
    stride_xm, stride_xk, stride_xdm, stride_wn, stride_wk, stride_xam, stride_bn, stride_br,
    stride_ym, stride_ps,
    IS_NF4: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED_K: tl.constexpr, ROUND: tl.constexpr,
    BITWISE_BF16: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RANK_PRECISION: tl.constexpr,
    DORA: tl.constexpr, SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_Z: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_chain(PDL)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_pid(tl.program_id(0), num_m, num_n, GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_s * k_per_split
    for k0 in range(k_begin, tl.minimum(k_begin + k_per_split, K), BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_x = mask_m[:, None] & (offs_k < K)[None, :]
        w = weight_tile(w_ptr, stride_wn, stride_wk,
                        packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
                        offs_n, mask_n, k0, K, IS_NF4, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE,
                        EVEN_K, ALIGNED_K, ROUND, BITWISE_BF16, BLOCK_K)
        wt = tl.trans(w.to(DOT_DTYPE))
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask_x, other=0.0)
        acc += tl.dot(x.to(DOT_DTYPE), wt, input_precision=DOT_PRECISION)
        if SECOND:
            xd = tl.load(xd_ptr + offs_m[:, None] * stride_xdm + offs_k[None, :], mask=mask_x, other=0.0)
            acc_d += tl.dot(xd.to(DOT_DTYPE), wt, input_precision=DOT_PRECISION)

    if SPLIT_K == 1:
        _forward_epilogue(acc, acc_d, offs_m, offs_n, M, N,
                          xa_ptr, stride_xam, b_ptr, stride_bn, stride_br, scaling, inv_keep,
                          mn_ptr, bias_ptr, y_ptr, stride_ym, z_ptr, stride_ym, R,
                          DORA, SECOND, HAS_BIAS, SAVE_Z, RANK_PRECISION, BLOCK_R)
    else:
        mask = mask_m[:, None] & mask_n[None, :]
        tile = pid_s * stride_ps + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + tile, acc, mask=mask)
        if SECOND:
            tl.store(part_d_ptr + tile, acc_d, mask=mask)


@triton.jit
def _sum_parts_kernel(part_ptr, out_ptr, numel, stride_p, PARTS: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr = False):
    """out = part[0] + part[1] + .. (in that order) over PARTS fp32 parts of `numel` elements,
    `stride_p` apart: the parts of a split reduction."""
    pdl_chain(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for p in tl.static_range(1, PARTS):   # unrolled: every part's load in flight at once
        acc += tl.load(part_ptr + p * stride_p + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)


@triton.jit
def _split_k_epilogue_kernel(
    part_ptr, part_d_ptr,
    xa_ptr, b_ptr, mn_ptr, bias_ptr, scaling, inv_keep, y_ptr, z_ptr,
    M, N, R, stride_xam, stride_bn, stride_br, stride_ym, stride_ps,
    DORA: tl.constexpr, SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_Z: tl.constexpr,
    RANK_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    stride_xas=0, XA_PARTS: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    """Sums the SPLIT_K partials in a fixed order, then applies the same epilogue. xa may come as
    the XA_PARTS parts of a split shrink, `stride_xas` apart, summed in order here: no launch
    sums them before."""
    pdl_chain(PDL)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * stride_ps + tile, mask=mask, other=0.0)
        if SECOND:
            acc_d += tl.load(part_d_ptr + s * stride_ps + tile, mask=mask, other=0.0)
    _forward_epilogue(acc, acc_d, offs_m, offs_n, M, N,
                      xa_ptr, stride_xam, b_ptr, stride_bn, stride_br, scaling, inv_keep,
                      mn_ptr, bias_ptr, y_ptr, stride_ym, z_ptr, stride_ym, R,
                      DORA, SECOND, HAS_BIAS, SAVE_Z, RANK_PRECISION, BLOCK_R, stride_xas, XA_PARTS)


@triton.jit
def _fused_linear_dx_kernel(
    dy_ptr, w_ptr,
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
    # epilogue operands: gb [M, r] fp32, A [r, K], column scales of dy
    gb_ptr, a_ptr, c_ptr, c2_ptr, scaling,
    dx_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_gbm, stride_ar, stride_ak, stride_dxm,
    seed, p, inv_keep,
    IS_NF4: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED_K: tl.constexpr, ROUND: tl.constexpr,
    BITWISE_BF16: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RANK_PRECISION: tl.constexpr, SCALE_DY: tl.constexpr, SECOND: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """dx = (dy ⊙ c) W + D ⊙ (s·gb A + (dy ⊙ c2) W): c is DoRA's m/n (SCALE_DY), c2 = m/n − 1
    for DoRA with dropout (SECOND), D the regenerated dropout scale (DROPOUT)."""
    pdl_chain(PDL)
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_m, pid_k = grouped_pid(tl.program_id(0), num_m, num_k, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    k0 = pid_k * BLOCK_K
    mask_m = offs_m < M
    mask_k = offs_k < K

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < N
        w = weight_tile(w_ptr, stride_wn, stride_wk,
                        packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
                        offs_n, mask_n, k0, K, IS_NF4, BLOCKSIZE, DOUBLE_QUANT,
                        NESTED_BLOCKSIZE, EVEN_K, ALIGNED_K, ROUND, BITWISE_BF16, BLOCK_K)
        w = w.to(DOT_DTYPE)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if SCALE_DY:
            c = tl.load(c_ptr + offs_n, mask=mask_n, other=0.0)
            acc += tl.dot((dy.to(tl.float32) * c[None, :]).to(DOT_DTYPE), w, input_precision=DOT_PRECISION)
        else:
            acc += tl.dot(dy.to(DOT_DTYPE), w, input_precision=DOT_PRECISION)
        if SECOND:
            c2 = tl.load(c2_ptr + offs_n, mask=mask_n, other=0.0)
            acc2 += tl.dot((dy.to(tl.float32) * c2[None, :]).to(DOT_DTYPE), w, input_precision=DOT_PRECISION)

    # rank term s·gb A, added into the accumulator it joins
    if DROPOUT:
        inner = rank_product(acc2, gb_ptr, stride_gbm, 1, a_ptr, stride_ar, stride_ak, offs_m, offs_k,
                             mask_m, mask_k, R, scaling, RANK_PRECISION, BLOCK_R)
        dx = acc + inner * dropout_scale(seed, offs_m, pid_k * BLOCK_K, keep_threshold(p), inv_keep, BLOCK_K)
    else:
        if SECOND:
            acc += acc2
        dx = rank_product(acc, gb_ptr, stride_gbm, 1, a_ptr, stride_ar, stride_ak, offs_m, offs_k,
                          mask_m, mask_k, R, scaling, RANK_PRECISION, BLOCK_R)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _outer_reduce_kernel(
    l_ptr, r_ptr, out_ptr, factor_ptr,
    M, P, Q, m_per_split,
    stride_lm, stride_lp, stride_rm, stride_rq, stride_os, stride_op,
    seed, p, inv_keep, scale,
    DROPOUT: tl.constexpr, FACTOR: tl.constexpr, PRECISION: tl.constexpr, FP32_LEFT: tl.constexpr,
    SWAP: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """out[split] = scale · f ⊙ Σ_m L[m, :]ᵀ R'[m, :] over the split's rows, fp32; R' = keep ⊙ R
    with dropout (D regenerated for R = x, indexed as x [M, Q]; its 1/(1-p) joins `scale`), f the
    factor `factor_ptr[p]` of each output row with FACTOR, else 1. With SWAP the tile is computed
    transposed, R'ᵀ L, so the long side (Q) is the tensor core's M dimension. With PRECISION
    "bf16x3" the 16-bit operand feeds the tensor cores as loaded (`dot_split3`; FP32_LEFT says
    the dot's left operand is the fp32 one)."""
    pdl_chain(PDL)
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    if SWAP:
        acc = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    m_begin = pid_s.to(tl.int64) * m_per_split
    for m0 in range(0, tl.minimum(m_per_split, M - m_begin), BLOCK_M):
        offs_m = m_begin + m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        lhs = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_p[None, :] * stride_lp,
                      mask=mask_m[:, None] & mask_p[None, :], other=0.0)
        rhs = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_q[None, :] * stride_rq,
                      mask=mask_m[:, None] & mask_q[None, :], other=0.0)
        if DROPOUT:
            rhs = tl.where(keep_mask(seed, offs_m, pid_q * BLOCK_Q, keep_threshold(p), BLOCK_Q), rhs, 0.0)
        if SWAP:
            left, right = tl.trans(rhs), lhs
        else:
            left, right = tl.trans(lhs), rhs
        if PRECISION == "bf16x3":
            acc = dot_split3(left, right, acc, FP32_LEFT, DOT_DTYPE)
        else:
            acc = tl.dot(left.to(tl.float32), right.to(tl.float32), acc, input_precision=PRECISION)
    acc = acc * (scale * inv_keep if DROPOUT else scale)
    if SWAP:
        if FACTOR:
            acc = acc * tl.load(factor_ptr + offs_p, mask=mask_p, other=0.0)[None, :]
        tl.store(out_ptr + pid_s * stride_os + offs_q[:, None] + offs_p[None, :] * stride_op, acc,
                 mask=mask_q[:, None] & mask_p[None, :])
    else:
        if FACTOR:
            acc = acc * tl.load(factor_ptr + offs_p, mask=mask_p, other=0.0)[:, None]
        tl.store(out_ptr + pid_s * stride_os + offs_p[:, None] * stride_op + offs_q[None, :], acc,
                 mask=mask_p[:, None] & mask_q[None, :])


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


_ROUND = {None: 0, torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def weight_args(weight, round_dtype=None):
    """Kernel arguments for a dense [N, K] tensor or an NF4Weight: the weight pointer and strides,
    the NF4 statistics pointers (dummies for dense) and the constexprs of `weight_tile`.
    NF4 tiles are rounded to `round_dtype` (None: left in fp32)."""
    if isinstance(weight, torch.Tensor):
        return dict(w=weight, stride_wn=weight.stride(0), stride_wk=weight.stride(1),
                    stats=(weight, weight, weight, weight, 0.0, weight),
                    meta=dict(IS_NF4=False, BLOCKSIZE=64, DOUBLE_QUANT=False, NESTED_BLOCKSIZE=256,
                              EVEN_K=True, ALIGNED_K=False, ROUND=0, BITWISE_BF16=False))
    absmax, nested, nested_code, offset, code, dq, nbs = stats_args(weight)
    return dict(w=weight.packed, stride_wn=0, stride_wk=0,
                stats=(weight.packed, absmax, nested, nested_code, offset, code),
                meta=dict(IS_NF4=True, BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=dq, NESTED_BLOCKSIZE=nbs,
                          EVEN_K=weight.shape[1] % 2 == 0,
                          ALIGNED_K=weight.shape[1] % weight.blocksize == 0, ROUND=_ROUND[round_dtype],
                          BITWISE_BF16=interpreting()))


def _nf4_blocksize(weight):
    """The quantization block size of an NF4 weight whose rows hold whole blocks, else None."""
    if isinstance(weight, torch.Tensor) or weight.shape[1] % weight.blocksize:
        return None
    return weight.blocksize


def _gemm_weight_args(weight, x_dtype):
    # bitsandbytes dequantizes to the activation dtype before its matmul. On a GPU the cast to
    # the dot dtype does that rounding; the interpreter dots in fp32, so round explicitly there.
    return weight_args(weight, x_dtype if interpreting() else None)


def _dot_args(dtype):
    # fp32 operands get full fp32 products ("ieee"), as torch's fp32 matmul does by default;
    # Triton's own default for fp32 is TF32. 16-bit operands ignore the setting. The rank-r
    # products take fp32 adapter operands: "ieee" (FMA units) beside an fp32 GEMM, "tf32x3"
    # (tensor cores, fp32-accurate) beside a 16-bit one.
    dot = dot_dtype(dtype)
    if dot == tl.float32:
        return dict(DOT_DTYPE=dot, DOT_PRECISION="ieee", RANK_PRECISION="ieee")
    return dict(DOT_DTYPE=dot, DOT_PRECISION="tf32", RANK_PRECISION="tf32x3")


def _rank_precision(*operands) -> str:
    """Products of the rank-sized kernels (shrink, dA, dB): with a 16-bit activation among the
    operands (tensors, or dtypes) "tf32x3" on the tensor cores (fp32-accurate: the 16-bit operand
    is exact in tf32 and the fp32 one is split in two), else "ieee" FMA products, as torch's fp32
    matmul. Those kernels are r/K of the GEMM's work but, on the FMA units, as slow as a third of
    it at M = 4096."""
    if any(getattr(t, "dtype", t) in (torch.float16, torch.bfloat16) for t in operands):
        return "tf32x3"
    return "ieee"


def _shrink_precision(x) -> str:
    """The shrink's product: "bf16x3" for a bf16 x (`dot_split3`), else as `_rank_precision`."""
    return "bf16x3" if x.dtype == torch.bfloat16 else _rank_precision(x)


def _rank_block(R: int, limit: int = 16) -> int:
    """Rank chunk of the rank-r products: larger chunks spill registers on a GPU and, at r = 256,
    overflow shared memory. The interpreter uses the same chunks, so tests cover several."""
    return min(limit, _pow2(R))


# GPU tile configurations, chosen by lowering each candidate for sm_90 and reading registers,
# spills and shared memory from ptxas and the cubin (`python -m bench.lowering`): on 16-bit
# activations none spills, and none needs more than the 227 KiB of shared memory a Hopper SM
# grants one block. Launches on fp32 activations run "ieee" FMA dots, which hold whole operand
# rows in registers; a few of them spill some words. tests/test_gpu_compile.py records every launch
# a forward and backward make and checks these bounds with the Triton CI installs (another Triton
# version allocates registers differently). None of these has been timed on a GPU yet.

def _gemm_config(M: int, N: int, K: int, dot, *, nf4=False, blocksize=None, dora=False, second=False):
    """Tiles, warps and stages of the fused forward GEMM for M rows, `dot` its operand dtype.

    `nf4` with `blocksize` set: rows hold whole quantization blocks, and tiles stay inside one
    (BLOCK_K <= blocksize) so each row decodes one scale a tile; `nf4` without: every element
    finds its own scale, which costs registers. DoRA's extra output and DoRA-with-dropout's second
    accumulator take narrower tiles.
    """
    if interpreting():
        # The interpreter pays per program and per op, not per element: few, large tiles.
        return dict(BLOCK_M=min(64, _pow2(M)), BLOCK_N=min(64, _pow2(N)), BLOCK_K=min(64, _pow2(K)),
                    GROUP_M=4, num_warps=4, num_stages=1)
    per_element = nf4 and blocksize is None
    if dot == tl.float32:
        # fp32 products run on the FMA units; the reduction step must stay short.
        cfg = (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3) if M <= 16 else
               dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=3))
    elif M <= 16:
        cfg = (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=3) if per_element else
               dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4))
    elif second:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=4)
    elif M <= 64 or per_element:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=64 if dora else 128, BLOCK_K=32, num_warps=8, num_stages=4)
    if blocksize is not None:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], blocksize)
    cfg["GROUP_M"] = 1 if M <= 16 else 8
    return cfg


def _dx_config(M: int, N: int, K: int, dot, *, blocksize=None):
    """Tiles of the dx GEMM: BLOCK_M x BLOCK_K outputs, reducing over N in BLOCK_N steps."""
    if interpreting():
        return dict(BLOCK_M=min(64, _pow2(M)), BLOCK_N=min(64, _pow2(N)), BLOCK_K=min(64, _pow2(K)),
                    GROUP_M=4, num_warps=4, num_stages=1)
    if dot == tl.float32:
        cfg = dict(BLOCK_M=128, BLOCK_N=16, BLOCK_K=32, num_warps=8, num_stages=3)
    elif M <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, num_warps=8, num_stages=3)
    if blocksize is not None:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], blocksize)
    cfg["GROUP_M"] = 8
    return cfg


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_k(M: int, N: int, K: int, cfg, device) -> int:
    """Split K when the output tiles alone cannot fill the GPU (decode-sized M)."""
    if interpreting() or M > 64:
        return 1
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    return max(1, min(triton.cdiv(2 * _sm_count(device), tiles), triton.cdiv(K, cfg["BLOCK_K"]), 32))


def sum_parts(parts: torch.Tensor) -> torch.Tensor:
    """Σ over dim 0 of a split reduction's fp32 parts [P, ...] (contiguous), added in order:
    deterministic, and one chained launch (where torch's sum would be a plain one between two
    chained kernels). One part comes back as a view, with no launch."""
    if parts.dtype != torch.float32 or not parts.is_contiguous():
        raise ValueError(f"sum_parts: contiguous fp32 parts expected, got {parts.dtype} with strides {parts.stride()}")
    if parts.shape[0] == 1:
        return parts[0]
    out = torch.empty(parts.shape[1:], dtype=torch.float32, device=parts.device)
    numel = out.numel()
    BLOCK = 1024
    _sum_parts_kernel[(triton.cdiv(numel, BLOCK),)](parts, out, numel, parts.stride(0), PARTS=parts.shape[0],
                                                    BLOCK=BLOCK, enable_fp_fusion=False, **pdl_args(parts.device))
    return out


def _launch_opts(cfg):
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False)


def lora_shrink(x, a, *, dropout=0.0, seed=0, write_xd=False, split_k=None, sum_splits=True):
    """drop(x) · aᵀ as fp32 [M, r]; `a` is [r, K] with any strides. With `write_xd`, also returns
    keep ⊙ x in x's dtype, exact (forward of DoRA with dropout needs it once, as a GEMM operand).
    Without `sum_splits`, xa comes as its K splits' parts, [splits, M, r] (one or more), for a
    consumer that sums them in order itself (`rank_product`), sparing the sum's launch."""
    M, K = x.shape
    R = a.shape[0]
    # Rank chunks of 32, a program per chunk: with dropout each chunk regenerates the mask of its
    # x tiles, so with bf16x3 products 64 ranks share one (no spill beside 64 rows).
    precision = _shrink_precision(x)
    BLOCK_R = _rank_block(R, 64 if dropout and precision == "bf16x3" else 32)
    if interpreting():
        BLOCK_M, BLOCK_K = min(64, _pow2(M)), min(128, _pow2(K))
    elif precision == "ieee":
        # fp32 FMA products: a short K step, and fewer rows with the Philox state live.
        BLOCK_M, BLOCK_K = (16 if M <= 16 else 32 if dropout else 64), 32
    else:
        # tensor-core products: a longer K step; with dropout a shorter one for the Philox state,
        # shorter still when keep ⊙ x is written too. 64 rows put the 4 warps along M, so each
        # draws the mask of its own rows only (32 rows put 2 warps on one row block, both
        # drawing its mask, and spill with keep ⊙ x).
        BLOCK_M = 16 if M <= 16 else 64
        BLOCK_K = 32 if write_xd else 64 if dropout or precision != "bf16x3" else 128
    if split_k is None:
        # Few row tiles (M up to a couple of thousand) would leave most SMs idle: split K as well,
        # and sum the splits after. From a quarter of the SMs' worth of row tiles the one pass is
        # bound by HBM, or within the sum's launch of it (sm_90 lowering, `bench.model`).
        # With dropout the pass is bound by issuing the mask's Philox, not by HBM: split K to
        # about one wave of programs.
        row_tiles = triton.cdiv(M, BLOCK_M)
        sms = _sm_count(x.device)
        if interpreting():
            split_k = 1
        elif dropout:
            split_k = max(1, min(round(sms / (row_tiles * triton.cdiv(R, BLOCK_R))), triton.cdiv(K, 4 * BLOCK_K), 32))
        else:
            split_k = 1 if 4 * row_tiles >= sms else max(1, min(
                triton.cdiv(2 * sms, row_tiles), triton.cdiv(K, 4 * BLOCK_K), 32))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), BLOCK_K) * BLOCK_K
    split_k = triton.cdiv(K, k_per_split)
    out = torch.empty((split_k, M, R), dtype=torch.float32, device=x.device)
    xd = torch.empty((M, K), dtype=store_dtype(x.dtype), device=x.device) if write_xd else out
    grid = (triton.cdiv(M, BLOCK_M), split_k, triton.cdiv(R, BLOCK_R))
    _lora_shrink_kernel[grid](
        x, a, out, xd, M, K, R, k_per_split,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), out.stride(0), out.stride(1), xd.stride(0),
        seed, dropout, 1.0 / (1.0 - dropout) if dropout else 1.0,
        DROPOUT=dropout > 0, WRITE_XD=write_xd, PRECISION=precision,
        DOT_DTYPE=dot_dtype(x.dtype), BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R, num_warps=4,
        enable_fp_fusion=False, **pdl_args(x.device),
    )
    xa = out if not sum_splits else sum_parts(out)
    if write_xd:
        return xa, (xd if xd.dtype == x.dtype else xd.to(x.dtype))
    return xa


def fused_linear(x, weight, xa, lora_B, scaling, *, bias=None, mn=None, xd=None, inv_keep=1.0,
                 save_z=False, split_k=None):
    """y (and z when `save_z`) of the fused forward; see the module docstring for the modes.

    x [M, K]; weight dense [N, K] or NF4Weight; xa [M, r] fp32; lora_B [N, r]; mn [N] fp32 for DoRA;
    for DoRA with dropout xd = keep ⊙ x [M, K] (contiguous rows) and inv_keep = 1/(1-p).
    """
    M, K = x.shape
    N, R = lora_B.shape
    wa = _gemm_weight_args(weight, x.dtype)
    dots = _dot_args(x.dtype)
    cfg = _gemm_config(M, N, K, dots["DOT_DTYPE"], nf4=wa["meta"]["IS_NF4"], blocksize=_nf4_blocksize(weight),
                       dora=mn is not None, second=xd is not None)
    if split_k is None:
        split_k = _split_k(M, N, K, cfg, x.device)
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split_k = triton.cdiv(K, k_per_split)
    out_dtype = store_dtype(x.dtype)
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    z = torch.empty((M, N), dtype=out_dtype, device=x.device) if save_z else y
    second = xd is not None
    if split_k > 1:
        part = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
        part_d = torch.empty_like(part) if second else part
    else:
        part = part_d = y
    flags = dict(DORA=mn is not None, SECOND=second, HAS_BIAS=bias is not None, SAVE_Z=save_z)
    BLOCK_R = _rank_block(R)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split_k)
    _fused_linear_kernel[grid](
        x, xd if second else x, wa["w"], *wa["stats"],
        xa, lora_B, mn if mn is not None else xa, bias if bias is not None else xa, scaling, inv_keep,
        y, z, part, part_d,
        M, N, K, R, k_per_split,
        x.stride(0), x.stride(1), xd.stride(0) if second else 0, wa["stride_wn"], wa["stride_wk"],
        xa.stride(0), lora_B.stride(0), lora_B.stride(1), y.stride(0),
        part.stride(0) if split_k > 1 else 0,
        **wa["meta"], **dots, **flags,
        SPLIT_K=split_k,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=BLOCK_R,
        GROUP_M=cfg["GROUP_M"], **_launch_opts(cfg), **pdl_args(x.device),
    )
    if split_k > 1:
        EM, EN = (16 if M <= 16 else 32), 64   # a 32-row tile of one row spills the rank product
        _split_k_epilogue_kernel[(triton.cdiv(M, EM), triton.cdiv(N, EN))](
            part, part_d, xa, lora_B, mn if mn is not None else xa, bias if bias is not None else xa,
            scaling, inv_keep, y, z, M, N, R, xa.stride(0), lora_B.stride(0), lora_B.stride(1), y.stride(0),
            part.stride(0), **flags, RANK_PRECISION=dots["RANK_PRECISION"], SPLIT_K=split_k,
            BLOCK_M=EM, BLOCK_N=EN, BLOCK_R=BLOCK_R,
            enable_fp_fusion=False, **pdl_args(x.device),
        )
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
        z = z.to(x.dtype) if save_z else y
    return (y, z) if save_z else y


def fused_linear_dx(dy, weight, gb, lora_A, scaling, *, col_scale=None, second_scale=None,
                    dropout=0.0, seed=0, out_dtype=None):
    """dx [M, K] = (dy ⊙ col_scale) W + D ⊙ (s·gb A + (dy ⊙ second_scale) W)."""
    M, N = dy.shape
    R, K = lora_A.shape
    out_dtype = out_dtype or dy.dtype
    wa = _gemm_weight_args(weight, out_dtype)
    dots = _dot_args(out_dtype)
    cfg = _dx_config(M, N, K, dots["DOT_DTYPE"], blocksize=_nf4_blocksize(weight))
    dx = torch.empty((M, K), dtype=store_dtype(out_dtype), device=dy.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
    _fused_linear_dx_kernel[grid](
        dy, wa["w"], *wa["stats"],
        gb, lora_A, col_scale if col_scale is not None else gb,
        second_scale if second_scale is not None else gb, scaling,
        dx, M, N, K, R,
        dy.stride(0), dy.stride(1), wa["stride_wn"], wa["stride_wk"], gb.stride(0),
        lora_A.stride(0), lora_A.stride(1), dx.stride(0),
        seed, dropout, 1.0 / (1.0 - dropout) if dropout else 1.0,
        **wa["meta"], **dots,
        SCALE_DY=col_scale is not None, SECOND=second_scale is not None, DROPOUT=dropout > 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=_rank_block(R),
        GROUP_M=cfg["GROUP_M"], **_launch_opts(cfg), **pdl_args(dy.device),
    )
    return dx if dx.dtype == out_dtype else dx.to(out_dtype)


def outer_reduce(lhs, rhs, *, dropout=0.0, seed=0, scale=1.0, factor=None, split_m=None):
    """scale · factor ⊙ Σ_m lhs[m]ᵀ (rhs[m] ⊙ D[m]) as fp32 [P, Q] (lhs [M, P], rhs [M, Q]; D only
    with dropout; `factor` [P] fp32 scales each output row, when given)."""
    M, P = lhs.shape
    Q = rhs.shape[1]
    precision = _rank_precision(lhs, rhs)
    bf16 = [t.dtype == torch.bfloat16 for t in (lhs, rhs)]
    if sum(bf16) == 1 and torch.float32 in (lhs.dtype, rhs.dtype):
        precision = "bf16x3"
    if interpreting():
        BLOCK_M, BLOCK_P, BLOCK_Q = min(64, _pow2(M)), min(64, _pow2(P)), min(64, _pow2(Q))
    else:
        # 16 outputs by `long` a program, the long side on the larger of P and Q (dA is r x K, dB
        # is N x r); fp32 FMA products take a short reduction step, tensor cores a longer one.
        # bf16x3: 64 x 16 tiles of 128-row steps are bound by HBM from 64 tiles up, in one pass
        # (sm_90 lowering, `bench.model`).
        if precision == "bf16x3":
            BLOCK_M, long = (32 if dropout else 128), 64
        else:
            BLOCK_M, long = (16 if precision == "ieee" else 32 if dropout else 64), 128
        if P <= Q:   # dA = gbᵀ drop(x): each rank tile regenerates the mask of x, so 32 with dropout
            # (64 with bf16x3 products)
            BLOCK_P = min(64 if precision == "bf16x3" else 32, _pow2(P)) if dropout else 16
            BLOCK_Q = min(long, _pow2(Q))
        else:
            BLOCK_P, BLOCK_Q = min(long, _pow2(P)), 16
    # the long side of the tile as the tensor core's M dimension (dA = gbᵀ x is r x K)
    swap = P < Q
    tiles = triton.cdiv(P, BLOCK_P) * triton.cdiv(Q, BLOCK_Q)
    if split_m is None:
        # split M (and sum the splits after) only when the tiles alone leave most SMs idle; with
        # dropout a tile is bound by issuing the mask's Philox rounds, so until every SM has one
        sms = _sm_count(lhs.device)
        busy = tiles if dropout else 4 * tiles
        split_m = 1 if interpreting() or busy >= sms else max(1, min(triton.cdiv(2 * sms, tiles),
                                                                       triton.cdiv(M, 4 * BLOCK_M)))
    m_per_split = triton.cdiv(triton.cdiv(M, split_m), BLOCK_M) * BLOCK_M
    split_m = triton.cdiv(M, m_per_split)
    out = torch.empty((split_m, P, Q), dtype=torch.float32, device=lhs.device)
    grid = (triton.cdiv(P, BLOCK_P), triton.cdiv(Q, BLOCK_Q), split_m)
    _outer_reduce_kernel[grid](
        lhs, rhs, out, factor if factor is not None else out, M, P, Q, m_per_split,
        lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1), out.stride(0), out.stride(1),
        seed, dropout, 1.0 / (1.0 - dropout) if dropout else 1.0, scale,
        DROPOUT=dropout > 0, FACTOR=factor is not None, PRECISION=precision, FP32_LEFT=bf16[0] == swap,
        SWAP=swap,
        DOT_DTYPE=tl.bfloat16 if precision == "bf16x3" and not interpreting() else tl.float32,
        BLOCK_M=BLOCK_M, BLOCK_P=BLOCK_P, BLOCK_Q=BLOCK_Q, enable_fp_fusion=False, **pdl_args(lhs.device),
    )
    return sum_parts(out)
