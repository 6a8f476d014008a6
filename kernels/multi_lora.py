"""Mixed-adapter (Q)LoRA / (Q)DoRA: a batch whose rows use different adapters in one set of launches.

Shapes: x [M, K], W [N, K]; E adapters, adapter e with A_e [r_e, K], B_e [N, r_e] (contiguous,
one dtype for all), scaling s_e and, for DoRA, mn_e = m_e / n_e (fp32 [N]); idx [M] int32 names
each row's adapter, -1 a row that takes the base layer alone. For row m with a = idx[m]:

    forward   xa[m] = drop(x[m]) A_aᵀ                      ([M, R] fp32, R = max r_e; zero past r_a)
              y[m]  = (x Wᵀ)[m] + s_a·xa[m] B_aᵀ + bias                           (LoRA, base rows)
              z[m]  = (x Wᵀ)[m] + s_a·xa[m] B_aᵀ,   y[m] = mn_a ⊙ z[m] + bias              (DoRA)
              z[m]  = (xd Wᵀ)[m]/(1-p) + s_a·xa[m] B_aᵀ,
              y[m]  = (x Wᵀ)[m] − (xd Wᵀ)[m]/(1-p) + mn_a ⊙ z[m] + bias     (DoRA, dropout; xd = keep ⊙ x)
    backward  gb[m] = (dy[m] ⊙ mn_a) B_a                      (the shrink, on Bᵀ with a column scale)
              dx[m] = ((dy ⊙ c) W)[m] + [D ⊙] (s_a·gb[m] A_a [+ ((dy ⊙ (mn − 1)) W)[m]])
              dA_e  = Σ_{m: a=e} gb[m]ᵀ drop(x[m]),   dB_e = Σ_{m: a=e} dy[m]ᵀ xa[m]      (per adapter)
              dm_e  = Σ_{m: a=e} dy[m] ⊙ z[m]                                      (then / n_e)
    LoRA adapters and base rows have mn = 1 (a zero mn address in the table); base rows have xa = 0.

The base GEMMs (x Wᵀ, and (dy ⊙ c) W) are the single-adapter op's own (`peft_ops.ops`, with its
choice of strategy: the NF4 decode kernels at decode sizes, decode-once GEMMs at training sizes);
what is per row runs here: the shrink, the expand epilogues that add each row's adapter term
and apply its m/n and the bias, and the per-adapter reductions of the backward.

The adapters are not copied: the kernels read them through an adapter table, int64 [4, E] of
(A_e address, B_e address, mn_e address or 0, r_e), and fp32 scalings [E]; with ranks that differ
each adapter's rank loop stops at its own r_e. A tile of rows loops over the adapters its rows
name, from the smallest index in the tile to the largest, skipping absent ones, and runs each
one's rank product on that adapter's rows alone (the other rows masked to zero). At decode sizes
one tile holds every row, so each adapter's A and B are read once. At larger M the caller sorts
the rows by adapter (`perm`, read by the kernels: x is never permuted), so a tile meets one or two
adapters; the backward's per-adapter reductions walk each adapter's run of the sorted rows
(`bounds`), writing fp32 partials summed in a fixed order (deterministic, no atomics).
"""

import torch
import triton
import triton.language as tl

from . import lora as _lora
from ._config import dot_dtype, interpreting, pdl_args, pdl_chain, store_dtype
from .dropout import dropout_scale, keep_mask, keep_threshold
from .lora import _pow2, _rank_block, _rank_precision, _shrink_precision, dot_split3, rank_product, sum_parts

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# ----------------------------------------------------------------------------------------------
# jitted helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _rows(perm_ptr, pos, mask, PERMUTED: tl.constexpr):
    """Row indices (int64) of the tile at sorted positions `pos`: the positions themselves, or
    the rows the permutation puts there."""
    if PERMUTED:
        return tl.load(perm_ptr + pos, mask=mask, other=0).to(tl.int64)
    return pos


@triton.jit
def _adapter_range(idx, mask_m, E):
    """(first, last) adapter index named by the tile's rows; first > last when none names one. An
    index outside [0, E) names no adapter (its row gets the base output)."""
    valid = mask_m & (idx >= 0) & (idx < E)
    first = tl.min(tl.where(valid, idx, E), axis=0)
    last = tl.max(tl.where(valid, idx, -1), axis=0)
    return first, last


@triton.jit
def _program_adapters(idx, mask_m, E, pid_e, ADAPTER_GRID: tl.constexpr):
    """(first, last, mine): the adapters this program takes, and the tile's rows it writes.

    ADAPTER_GRID (rows not sorted, decode sizes): a program an adapter (`pid_e`), writing that
    adapter's rows (and, the first one, the rows of no adapter), so every adapter's work runs in
    parallel. Else one program takes every adapter its rows name, in turn, and writes them all."""
    valid = (idx >= 0) & (idx < E)
    if ADAPTER_GRID:
        first = pid_e
        last = pid_e
        # (idx * 0 + pid_e) == 0, not pid_e == 0: the interpreter refuses a mask combined from a
        # scalar bool
        mine = mask_m & ((idx == pid_e) | (~valid & (idx * 0 + pid_e == 0)))
    else:
        first, last = _adapter_range(idx, mask_m, E)
        mine = mask_m
    return first, last, mine


@triton.jit
def _multi_epilogue(acc, acc_d, rows, idx, first, last, offs_n, mask_m, mask_n,
                    xa_ptr, stride_xam, table_ptr, s_ptr, E, inv_keep, bias_ptr,
                    y_ptr, stride_ym, z_ptr, stride_zm,
                    B_DTYPE: tl.constexpr, DORA: tl.constexpr, SECOND: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SAVE_Z: tl.constexpr, RANK_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                    stride_xas=0, XA_PARTS: tl.constexpr = 1):
    """acc = x Wᵀ (and acc_d = (keep ⊙ x) Wᵀ) for the tile's rows `mask_m` -> y (and z), each row
    with its own adapter's rank product and m/n, as lora.py's epilogue does for one adapter (xa
    perhaps as a split shrink's XA_PARTS parts, `stride_xas` apart)."""
    if DORA and SECOND:
        acc_d = acc_d * inv_keep
        acc = acc - acc_d
        z = acc_d
    else:
        z = acc
    scale = tl.full(acc.shape, 1.0, tl.float32)        # m/n of each row's adapter (1: LoRA, base)
    for e in range(first, last + 1):
        sel = mask_m & (idx == e)
        if tl.max(sel.to(tl.int32), axis=0) > 0:
            b_e = tl.load(table_ptr + E + e).to(tl.pointer_type(B_DTYPE))
            r_e = tl.load(table_ptr + 3 * E + e)
            s_e = tl.load(s_ptr + e)
            # B_e is [N, r_e] contiguous: element (r, n) of Bᵀ sits at n * r_e + r
            z = rank_product(z, xa_ptr, stride_xam, 1, b_e, 1, r_e, rows, offs_n, sel, mask_n, r_e, s_e,
                             RANK_PRECISION, BLOCK_R, stride_xas, XA_PARTS)
            if DORA:
                mn_addr = tl.load(table_ptr + 2 * E + e)
                if mn_addr != 0:
                    mn_e = tl.load(mn_addr.to(tl.pointer_type(tl.float32)) + offs_n, mask=mask_n, other=1.0)
                    scale = tl.where(sel[:, None], mn_e[None, :], scale)
    if DORA:
        if SECOND:
            y = acc + scale * z
        else:
            y = scale * z
    else:
        y = z
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    if SAVE_Z:
        tl.store(z_ptr + rows[:, None] * stride_zm + offs_n[None, :], z.to(z_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _multi_shrink_kernel(
    x_ptr, table_ptr, idx_ptr, perm_ptr, out_ptr, xd_ptr,
    M, K, R, E, r_chunks, k_per_split,
    stride_xm, stride_xk, stride_os, stride_om, stride_xdm,
    # dropout on x
    seed, p, inv_keep,
    OPERAND: tl.constexpr, A_DTYPE: tl.constexpr, DROPOUT: tl.constexpr, WRITE_XD: tl.constexpr,
    COL_SCALE: tl.constexpr, PERMUTED: tl.constexpr, ADAPTER_GRID: tl.constexpr, PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """out[split, m] = drop(x[m]) · P_aᵀ over the split's K range, fp32, for each row's adapter a.

    OPERAND 0: P_a = A_a [r_a, K] (the forward shrink); OPERAND 1: P_a = B_aᵀ, read from B_a
    [K(=N), r_a] (the backward's gb = dy B_a), with COL_SCALE multiplying x by the adapter's m/n
    over K first. Rows of no adapter, and ranks past an adapter's own, come out zero. With
    PRECISION "bf16x3" (a bf16 x, no COL_SCALE) x feeds the tensor cores as loaded, keep ⊙ x
    exact in it, and the 1/(1-p) goes on the fp32 sums (`dot_split3`)."""
    pdl_chain(PDL)
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_e = tl.program_id(2) // r_chunks      # the adapter, with ADAPTER_GRID
    pid_r = tl.program_id(2) % r_chunks
    pos = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = pos < M
    rows = _rows(perm_ptr, pos, mask_m, PERMUTED)
    idx = tl.load(idx_ptr + rows, mask=mask_m, other=-1)
    first, last, mine = _program_adapters(idx, mask_m, E, pid_e, ADAPTER_GRID)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_begin = pid_s * k_per_split
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_k = offs_k < K
        mask = mine[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
        if PRECISION != "bf16x3":
            x = x.to(tl.float32)
        if DROPOUT:
            # keep ⊙ x, exact in x's dtype; the 1/(1-p) goes on the fp32 sums
            x = tl.where(keep_mask(seed, rows, k0, keep_threshold(p), BLOCK_K), x, 0.0)
            if WRITE_XD:
                if pid_r == 0:
                    tl.store(xd_ptr + rows[:, None] * stride_xdm + offs_k[None, :],
                             x.to(xd_ptr.dtype.element_ty), mask=mask)
        for e in range(first, last + 1):
            sel = mine & (idx == e)
            r_e = tl.load(table_ptr + 3 * E + e)
            if (tl.max(sel.to(tl.int32), axis=0) > 0) & (pid_r * BLOCK_R < r_e):
                mask_p = (offs_r < r_e)[:, None] & mask_k[None, :]
                if OPERAND == 0:
                    a_e = tl.load(table_ptr + e).to(tl.pointer_type(A_DTYPE))
                    p_tile = tl.load(a_e + offs_r[:, None] * K + offs_k[None, :], mask=mask_p, other=0.0)
                else:
                    b_e = tl.load(table_ptr + E + e).to(tl.pointer_type(A_DTYPE))
                    p_tile = tl.load(b_e + offs_k[None, :] * r_e + offs_r[:, None], mask=mask_p, other=0.0)
                xs = tl.where(sel[:, None], x, 0.0)
                if COL_SCALE:
                    mn_addr = tl.load(table_ptr + 2 * E + e)
                    if mn_addr != 0:
                        c = tl.load(mn_addr.to(tl.pointer_type(tl.float32)) + offs_k, mask=mask_k, other=0.0)
                        xs = xs * c[None, :]
                if PRECISION == "bf16x3":
                    acc = dot_split3(xs, tl.trans(p_tile.to(tl.float32)), acc, False, DOT_DTYPE)
                else:
                    acc += tl.dot(xs, tl.trans(p_tile.to(tl.float32)), input_precision=PRECISION)
    if DROPOUT:
        acc = acc * inv_keep
    tl.store(out_ptr + pid_s * stride_os + rows[:, None] * stride_om + offs_r[None, :], acc,
             mask=mine[:, None] & (offs_r < R)[None, :])


@triton.jit
def _multi_expand_kernel(
    base_ptr, base_d_ptr, xa_ptr, idx_ptr, perm_ptr, table_ptr, s_ptr, bias_ptr, y_ptr, z_ptr,
    M, N, E, inv_keep,
    stride_bm, stride_bdm, stride_xam, stride_ym,
    B_DTYPE: tl.constexpr, DORA: tl.constexpr, SECOND: tl.constexpr, HAS_BIAS: tl.constexpr,
    SAVE_Z: tl.constexpr, PERMUTED: tl.constexpr, ADAPTER_GRID: tl.constexpr, RANK_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    stride_xas=0, XA_PARTS: tl.constexpr = 1, stride_bs=0, BASE_PARTS: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    """y (and z) from the base GEMM's output x Wᵀ (and (keep ⊙ x) Wᵀ for DoRA with dropout):
    each row's adapter term s_a·xa B_aᵀ, its m/n, and the bias. xa may come as the XA_PARTS
    parts of a split shrink, x Wᵀ as the BASE_PARTS fp32 parts of the split decode GEMM: both
    are summed in order here, sparing the launches that would sum them."""
    pdl_chain(PDL)
    pos = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = pos < M
    mask_n = offs_n < N
    rows = _rows(perm_ptr, pos, mask_m, PERMUTED)
    idx = tl.load(idx_ptr + rows, mask=mask_m, other=-1)
    first, last, mask_m = _program_adapters(idx, mask_m, E, tl.program_id(2), ADAPTER_GRID)
    mask = mask_m[:, None] & mask_n[None, :]
    base_tile = base_ptr + rows[:, None] * stride_bm + offs_n[None, :]
    acc = tl.load(base_tile, mask=mask, other=0.0).to(tl.float32)
    for part in tl.static_range(1, BASE_PARTS):
        acc += tl.load(base_tile + part * stride_bs, mask=mask, other=0.0)
    acc_d = acc
    if SECOND:
        acc_d = tl.load(base_d_ptr + rows[:, None] * stride_bdm + offs_n[None, :], mask=mask, other=0.0)
        acc_d = acc_d.to(tl.float32)
    _multi_epilogue(acc, acc_d, rows, idx, first, last, offs_n, mask_m, mask_n,
                    xa_ptr, stride_xam, table_ptr, s_ptr, E, inv_keep, bias_ptr,
                    y_ptr, stride_ym, z_ptr, stride_ym,
                    B_DTYPE, DORA, SECOND, HAS_BIAS, SAVE_Z, RANK_PRECISION, BLOCK_R, stride_xas, XA_PARTS)


@triton.jit
def _multi_dx_expand_kernel(
    base_ptr, base2_ptr, gb_ptr, idx_ptr, perm_ptr, table_ptr, s_ptr, dx_ptr,
    M, K, E,
    stride_bm, stride_b2m, stride_gbm, stride_dxm,
    seed, p, inv_keep,
    A_DTYPE: tl.constexpr, SECOND: tl.constexpr, DROPOUT: tl.constexpr, PERMUTED: tl.constexpr,
    RANK_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """dx = base + [D ⊙] (s_a·gb A_a [+ base2]) from the base dx GEMMs' outputs, each row with its
    adapter a: base = (dy ⊙ c) W, base2 = (dy ⊙ (m/n − 1)) W for DoRA with dropout (SECOND), D the
    regenerated dropout scale (DROPOUT)."""
    pdl_chain(PDL)
    pos = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = pos < M
    mask_k = offs_k < K
    rows = _rows(perm_ptr, pos, mask_m, PERMUTED)
    mask = mask_m[:, None] & mask_k[None, :]
    acc = tl.load(base_ptr + rows[:, None] * stride_bm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        if SECOND:
            inner = tl.load(base2_ptr + rows[:, None] * stride_b2m + offs_k[None, :], mask=mask, other=0.0)
            inner = inner.to(tl.float32)
        else:
            inner = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    else:
        inner = acc
    idx = tl.load(idx_ptr + rows, mask=mask_m, other=-1)
    first, last = _adapter_range(idx, mask_m, E)
    for e in range(first, last + 1):
        sel = mask_m & (idx == e)
        if tl.max(sel.to(tl.int32), axis=0) > 0:
            a_e = tl.load(table_ptr + e).to(tl.pointer_type(A_DTYPE))
            r_e = tl.load(table_ptr + 3 * E + e)
            s_e = tl.load(s_ptr + e)
            # A_e is [r_e, K] contiguous
            inner = rank_product(inner, gb_ptr, stride_gbm, 1, a_e, K, 1, rows, offs_k, sel, mask_k, r_e, s_e,
                                 RANK_PRECISION, BLOCK_R)
    if DROPOUT:
        dx = acc + inner * dropout_scale(seed, rows, tl.program_id(1) * BLOCK_K, keep_threshold(p), inv_keep, BLOCK_K)
    else:
        dx = inner
    tl.store(dx_ptr + rows[:, None] * stride_dxm + offs_k[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_bounds(bounds_ptr, e, split, splits, BLOCK_M: tl.constexpr):
    """[begin, end) of split `split` of adapter e's run of sorted rows (BLOCK_M-aligned pieces)."""
    start = tl.load(bounds_ptr + e)
    end = tl.load(bounds_ptr + e + 1)
    per = tl.cdiv(tl.cdiv(end - start, splits), BLOCK_M) * BLOCK_M
    begin = start + split * per
    return begin, tl.minimum(end, begin + per)


@triton.jit
def _segment_outer_reduce_kernel(
    l_ptr, r_ptr, perm_ptr, bounds_ptr, out_ptr,
    P, Q, splits,
    stride_lm, stride_lp, stride_rm, stride_rq, stride_os, stride_oe, stride_op,
    seed, p, inv_keep,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """out[split, e] = Σ_m L[m, :]ᵀ R'[m, :] over the split's part of adapter e's rows, fp32;
    R' = R ⊙ D with dropout (D regenerated for R = x, indexed as x [M, Q])."""
    pdl_chain(PDL)
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_es = tl.program_id(2)
    e = pid_es // splits
    split = pid_es % splits
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    begin, end = _segment_bounds(bounds_ptr, e, split, splits, BLOCK_M)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(begin, end, BLOCK_M):
        pos = m0 + tl.arange(0, BLOCK_M)
        mask_m = pos < end
        rows = tl.load(perm_ptr + pos, mask=mask_m, other=0).to(tl.int64)
        lhs = tl.load(l_ptr + rows[:, None] * stride_lm + offs_p[None, :] * stride_lp,
                      mask=mask_m[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
        rhs = tl.load(r_ptr + rows[:, None] * stride_rm + offs_q[None, :] * stride_rq,
                      mask=mask_m[:, None] & mask_q[None, :], other=0.0).to(tl.float32)
        if DROPOUT:
            rhs = rhs * dropout_scale(seed, rows, pid_q * BLOCK_Q, keep_threshold(p), inv_keep, BLOCK_Q)
        acc += tl.dot(tl.trans(lhs), rhs, input_precision=PRECISION)
    tl.store(out_ptr + split * stride_os + e * stride_oe + offs_p[:, None] * stride_op + offs_q[None, :], acc,
             mask=mask_p[:, None] & mask_q[None, :])


@triton.jit
def _segment_column_dot_kernel(
    a_ptr, b_ptr, perm_ptr, bounds_ptr, out_ptr, N, splits,
    stride_am, stride_an, stride_bm, stride_bn, stride_os, stride_oe,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """out[split, e, j] = Σ_i a_ij b_ij over the split's part of adapter e's rows, in fp32."""
    pdl_chain(PDL)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    e = tl.program_id(1) // splits
    split = tl.program_id(1) % splits
    begin, end = _segment_bounds(bounds_ptr, e, split, splits, BLOCK_M)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(begin, end, BLOCK_M):
        pos = m0 + tl.arange(0, BLOCK_M)
        mask_m = pos < end
        rows = tl.load(perm_ptr + pos, mask=mask_m, other=0).to(tl.int64)
        mask = mask_m[:, None] & mask_n[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_n[None, :] * stride_an, mask=mask, other=0.0)
        b = tl.load(b_ptr + rows[:, None] * stride_bm + offs_n[None, :] * stride_bn, mask=mask, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=0)
    tl.store(out_ptr + split * stride_os + e * stride_oe + offs_n, acc, mask=mask_n)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
# `table` is int64 [4, E] (A_e address, B_e address, mn_e address or 0, r_e) and `scalings`
# fp32 [E] on the device (peft_ops.multi builds both); `adapter_dtype` is the one dtype of every
# A_e and B_e; `idx` int32 [M]; `perm` (int64 [M], rows sorted by adapter) or None.

def _sms(device):
    return _lora._sm_count(device)   # through the module: bench.lowering stands a GPU's SMs in for it


def multi_shrink(x, table, idx, R, adapter_dtype, *, perm=None, operand="A", col_scale=False, dropout=0.0,
                 seed=0, write_xd=False, split_k=None, sum_splits=True):
    """[M, R] fp32: drop(x[m]) A_aᵀ (operand "A"), or (x[m] ⊙ c_a) B_a (operand "B", the
    backward's gb; c_a the adapter's m/n with `col_scale`). With `write_xd` also keep ⊙ x.
    Without `sum_splits`, the K splits' parts [splits, M, R] for `multi_expand` to sum."""
    M, K = x.shape
    E = table.shape[1]
    BLOCK_R = _rank_block(R, 16 if dropout else 32)
    precision = _rank_precision(x) if col_scale else _shrink_precision(x)
    if interpreting():
        BLOCK_M, BLOCK_K = min(64, _pow2(M)), min(128, _pow2(K))
    elif precision == "ieee":
        BLOCK_M, BLOCK_K = (16 if M <= 16 else 32 if dropout else 64), 32
    else:
        BLOCK_M, BLOCK_K = (16 if M <= 16 else 64), 64
    adapter_grid = perm is None   # rows not sorted (decode sizes): a program an adapter
    if split_k is None:
        # few programs (decode sizes) would leave most SMs idle: split K as well
        programs = triton.cdiv(M, BLOCK_M) * triton.cdiv(R, BLOCK_R) * (E if adapter_grid else 1)
        split_k = 1 if interpreting() else max(1, min(triton.cdiv(2 * _sms(x.device), programs),
                                                      triton.cdiv(K, 4 * BLOCK_K), 32))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), BLOCK_K) * BLOCK_K
    split_k = triton.cdiv(K, k_per_split)
    out = torch.empty((split_k, M, R), dtype=torch.float32, device=x.device)
    xd = torch.empty((M, K), dtype=store_dtype(x.dtype), device=x.device) if write_xd else out
    r_chunks = triton.cdiv(R, BLOCK_R)
    grid = (triton.cdiv(M, BLOCK_M), split_k, r_chunks * (E if adapter_grid else 1))
    _multi_shrink_kernel[grid](
        x, table, idx, perm if perm is not None else idx, out, xd, M, K, R, E, r_chunks, k_per_split,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), xd.stride(0),
        seed, dropout, 1.0 / (1.0 - dropout) if dropout else 1.0,
        OPERAND=0 if operand == "A" else 1, A_DTYPE=_TL[adapter_dtype], DROPOUT=dropout > 0,
        WRITE_XD=write_xd, COL_SCALE=col_scale, PERMUTED=perm is not None, ADAPTER_GRID=adapter_grid,
        PRECISION=precision, DOT_DTYPE=dot_dtype(x.dtype),
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R, num_warps=4, enable_fp_fusion=False,
        **pdl_args(x.device),
    )
    xa = out if not sum_splits else sum_parts(out)
    if write_xd:
        return xa, (xd if xd.dtype == x.dtype else xd.to(x.dtype))
    return xa


def _expand_tiles(M, cols, adapter_grid=None, device=None, base_parts=1):
    """(rows, columns) of an expand tile; `adapter_grid`: the adapters when a program takes one,
    `base_parts`: the split decode GEMM's parts it sums."""
    if interpreting():
        return min(64, _pow2(M)), min(64, _pow2(cols))
    if M > 16:
        return 32, 64
    if adapter_grid is None:
        return 16, 128
    # decode sizes launch a program an adapter: about a wave of programs, 64 to 256 columns a
    # tile (the static sm_90 model at 16 rows over 8 adapters: 64 columns at N = 1024, 256 at
    # 14336, 10 to 25% below 128, where one width for all had put them), narrower while the
    # unrolled sum of the parts would not fit in registers (128 columns of 8 parts fit, 256
    # spill; 32 parts spill 8 bytes at 64 columns, 120 at 128)
    tiles = max(1, _sms(device) // max(1, adapter_grid))
    block_n = max(64, min(256, _pow2(triton.cdiv(cols, tiles))))
    while block_n > 64 and block_n * base_parts > 1024:
        block_n //= 2
    return 16, block_n


def multi_expand(base, base_d, xa, table, scalings, idx, adapter_dtype, *, perm=None, bias=None, dora=False,
                 inv_keep=1.0, save_z=False, out_dtype=None):
    """y (and z with `save_z`) [M, N] in `out_dtype` (default base's), from base = x Wᵀ [M, N]
    (and base_d = (keep ⊙ x) Wᵀ for DoRA with dropout, scaled by inv_keep = 1/(1-p) here). xa is
    [M, R], or [parts, M, R]: a split shrink's parts (`multi_shrink(sum_splits=False)`); base may
    be the split decode GEMM's fp32 parts [parts, M, N] (`ops.fused_linear(parts=True)`, then
    `out_dtype` is x's): both are summed here."""
    out_dtype = out_dtype or base.dtype
    parts = dict(stride_xas=0, XA_PARTS=1, stride_bs=0, BASE_PARTS=1)
    if xa.dim() == 3:
        parts.update(stride_xas=xa.stride(0), XA_PARTS=xa.shape[0])
        xa = xa[0]
    if base.dim() == 3:
        parts.update(stride_bs=base.stride(0), BASE_PARTS=base.shape[0])
        base = base[0]
    M, N = base.shape
    E = table.shape[1]
    R = xa.shape[1]
    second = base_d is not None
    adapter_grid = perm is None   # rows not sorted (decode sizes): a program an adapter
    BLOCK_M, BLOCK_N = _expand_tiles(M, N, E if adapter_grid else None, base.device, parts["BASE_PARTS"])
    y = torch.empty((M, N), dtype=store_dtype(out_dtype), device=base.device)
    z = torch.empty((M, N), dtype=store_dtype(out_dtype), device=base.device) if save_z else y
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N), E if adapter_grid else 1)
    _multi_expand_kernel[grid](
        base, base_d if second else base, xa, idx, perm if perm is not None else idx, table, scalings,
        bias if bias is not None else xa, y, z,
        M, N, E, inv_keep, base.stride(0), base_d.stride(0) if second else 0, xa.stride(0), y.stride(0),
        B_DTYPE=_TL[adapter_dtype], DORA=dora, SECOND=second, HAS_BIAS=bias is not None, SAVE_Z=save_z,
        PERMUTED=perm is not None, ADAPTER_GRID=adapter_grid, RANK_PRECISION=_rank_precision(out_dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=_rank_block(R), **parts, num_warps=4, enable_fp_fusion=False,
        **pdl_args(base.device),
    )
    if y.dtype != out_dtype:
        y = y.to(out_dtype)
        z = z.to(out_dtype) if save_z else y
    return (y, z) if save_z else y


def multi_dx_expand(base, base2, gb, table, scalings, idx, adapter_dtype, *, perm=None, dropout=0.0, seed=0):
    """dx [M, K] in base's dtype = base + [D ⊙] (s_a·gb A_a [+ base2]) with each row's adapter a."""
    M, K = base.shape
    E = table.shape[1]
    R = gb.shape[1]
    BLOCK_M, BLOCK_K = _expand_tiles(M, K)
    dx = torch.empty((M, K), dtype=store_dtype(base.dtype), device=base.device)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(K, BLOCK_K))
    _multi_dx_expand_kernel[grid](
        base, base2 if base2 is not None else base, gb, idx, perm if perm is not None else idx, table, scalings, dx,
        M, K, E, base.stride(0), base2.stride(0) if base2 is not None else 0, gb.stride(0), dx.stride(0),
        seed, dropout, 1.0 / (1.0 - dropout) if dropout else 1.0,
        A_DTYPE=_TL[adapter_dtype], SECOND=base2 is not None, DROPOUT=dropout > 0, PERMUTED=perm is not None,
        RANK_PRECISION=_rank_precision(base), BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=_rank_block(R),
        num_warps=4, enable_fp_fusion=False, **pdl_args(base.device),
    )
    return dx if dx.dtype == base.dtype else dx.to(base.dtype)


def _segment_splits(M, E, tiles, BLOCK_M, device):
    """Splits of each adapter's rows: enough programs to fill the GPU when one adapter holds most
    rows; summed afterwards in a fixed order."""
    if interpreting():
        return 1
    return max(1, min(triton.cdiv(2 * _sms(device), tiles * E), triton.cdiv(M, 4 * BLOCK_M), 32))


def segment_outer_reduce(lhs, rhs, perm, bounds, *, dropout=0.0, seed=0):
    """[E, P, Q] fp32: Σ over adapter e's rows of lhs[m]ᵀ (rhs[m] ⊙ D[m]) (lhs [M, P], rhs [M, Q];
    `perm` the rows sorted by adapter, adapter e's run at [bounds[e], bounds[e + 1]))."""
    M, P = lhs.shape
    Q = rhs.shape[1]
    E = bounds.shape[0] - 1
    precision = _rank_precision(lhs, rhs)
    if interpreting():
        BLOCK_M, BLOCK_P, BLOCK_Q = min(64, _pow2(M)), min(64, _pow2(P)), min(64, _pow2(Q))
    else:
        # lowered for sm_90: 64-row steps on the tensor cores spill (the Philox state with
        # dropout most), 32 do not
        BLOCK_M = 16 if precision == "ieee" else 32
        if P <= Q:
            BLOCK_P, BLOCK_Q = 16, min(128, _pow2(Q))
        else:
            BLOCK_P, BLOCK_Q = min(128, _pow2(P)), 16
    tiles = triton.cdiv(P, BLOCK_P) * triton.cdiv(Q, BLOCK_Q)
    splits = _segment_splits(M, E, tiles, BLOCK_M, lhs.device)
    out = torch.empty((splits, E, P, Q), dtype=torch.float32, device=lhs.device)
    grid = (triton.cdiv(P, BLOCK_P), triton.cdiv(Q, BLOCK_Q), E * splits)
    _segment_outer_reduce_kernel[grid](
        lhs, rhs, perm, bounds, out, P, Q, splits,
        lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1), out.stride(0), out.stride(1), out.stride(2),
        seed, dropout, 1.0 / (1.0 - dropout) if dropout else 1.0,
        DROPOUT=dropout > 0, PRECISION=precision,
        BLOCK_M=BLOCK_M, BLOCK_P=BLOCK_P, BLOCK_Q=BLOCK_Q, enable_fp_fusion=False, **pdl_args(lhs.device),
    )
    return sum_parts(out)


def segment_column_dot(a, b, perm, bounds):
    """[E, N] fp32: Σ over adapter e's rows of a_ij b_ij (a, b [M, N], any strides)."""
    M, N = a.shape
    E = bounds.shape[0] - 1
    BLOCK_M, BLOCK_N = (min(64, _pow2(M)), min(128, _pow2(N))) if interpreting() else (16, 128)
    splits = _segment_splits(M, E, triton.cdiv(N, BLOCK_N), BLOCK_M, a.device)
    out = torch.empty((splits, E, N), dtype=torch.float32, device=a.device)
    _segment_column_dot_kernel[(triton.cdiv(N, BLOCK_N), E * splits)](
        a, b, perm, bounds, out, N, splits, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, enable_fp_fusion=False,
        **pdl_args(a.device),
    )
    return sum_parts(out)
