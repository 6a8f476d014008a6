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

No decoded value moves between threads. The words are loaded in a layout chosen so that every
thread decodes exactly the elements the tensor core's register A operand wants from it: lanes
(g, q) of a warp hold rows g and g + 8 of a 16-row group and 32 consecutive codes (16 bytes) of
each, warps hold 16-row groups (`_words`). The eight codes of a word are taken apart with nested
`tl.join`s (new register dims), and a permutation of the logical dims (free: no data moves) makes
the tile's logical K order the one the operand layout assigns to those registers. x is loaded in
K order (16 bytes a thread) and its K bits relabelled the same way (`operand_order`), as the
product does not depend on the order of K. Without this the tile took a round trip through shared
memory, a third of the loop's shared-memory traffic; x gathered in the permuted order took a
2-byte load and four address instructions an element.

Rows past N: the last tile starts at N - BLOCK_N instead (no mask in the loop) and stores only its
new rows. K is split across programs when the N tiles alone would not fill the GPU; the fp32
partials are summed in a fixed order by `lora._split_k_epilogue_kernel`, which applies the LoRA /
DoRA / bias epilogue.
"""

import torch
import triton
import triton.language as tl

from . import lora as _lora
from ._config import interpreting, pdl_args, pdl_chain, store_dtype
from .dropout import round_to
from .lora import _ROUND, _dot_args, _forward_epilogue, _pow2, _rank_block, _split_k_epilogue_kernel
from .nf4 import nf4_scale, stats_args

BLOCK_K = 128
MAX_M = 64   # rows of x the swapped GEMM takes (its N dimension)
MAX_SHRINK_RANKS = 2   # ranks a tile's programs form of a fused shrink, at most (else its own launch)
_A_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def operand_order(t, BLOCK_K: tl.constexpr):
    """The [R, BLOCK_K] tile `t` (columns in K order, BLOCK_K = 128) with its columns in the order
    `lut_tile` decodes W in: column L holds K index 32 k56 + 8 k34 + 4 k2 + 2 k1 + k0 where
    L = 32 k34 + 16 k2 + 8 k1 + 2 k56 + k0 (L's bits (0, 1-2, 3, 4, 5-6) hold K's bits (0, 5-6,
    1, 2, 3-4)), which is where the A operand of an m64nNk16 MMA has lane q's values of a row
    (k = 16 c + 8 h + 2 q + b). A relabelling of the tile's dims: no data moves, and `t` can be
    loaded in K order, 16 bytes a thread."""
    R: tl.constexpr = t.shape[0]
    t = tl.permute(tl.reshape(t, (R, 4, 4, 2, 2, 2)), (0, 2, 3, 4, 1, 5))
    return tl.reshape(t, (R, BLOCK_K))


@triton.jit
def _shrink_step(x, acc, a_rows, r_rows, rank, offs_k, stride_ar, stride_ak, K, MIXED: tl.constexpr):
    """acc [BLOCK_M, BLOCK_K] + x ⊙ A[rank, offs_k] (fp32 fused multiply-adds): one K step of the
    fused shrink's rank `rank`, from one A (`a_rows` its pointer, broadcast over the rows) or,
    MIXED, each row's own (`a_rows` [BLOCK_M] pointers to contiguous [r, K] of rank `r_rows`;
    zero past it)."""
    if MIXED:
        a = tl.load(a_rows[:, None] + rank * K + offs_k[None, :], mask=(rank < r_rows)[:, None], other=0.0)
    else:
        a = tl.load(a_rows + rank * stride_ar + offs_k * stride_ak)[None, :]
    return tl.fma(x.to(tl.float32), a.to(tl.float32), acc)


@triton.jit
def _rows(row0, BLOCK_N: tl.constexpr):
    """Row indices [BLOCK_N // 16 (i), 8 (g), 1, 1]: rows row0 + 16 i + g of a 16-row group's
    first half (the second half is `_rows(row0 + 8)`)."""
    i = tl.arange(0, BLOCK_N // 16)[:, None, None, None]
    g = tl.arange(0, 8)[None, :, None, None]
    return row0 + 16 * i + g


@triton.jit
def _words(words_ptr, rows, kw, row_words, WORDS: tl.constexpr):
    """int32 words [BLOCK_N // 16 (i), 8 (g), 4 (q), WORDS // 4 (wpt)] of `rows` (`_rows`), words
    kw + WORDS/4 q + wpt: its load layout puts 4 words (16 bytes) in a thread, lanes over (g, q)
    and warps over i, which is where the tensor core's A operand wants them (below)."""
    q = tl.arange(0, 4)[None, None, :, None]
    wpt = tl.arange(0, WORDS // 4)[None, None, None, :]
    return tl.load(words_ptr + rows * row_words + kw + q * (WORDS // 4) + wpt)


@triton.jit
def _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows, k0, K,
            BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 scales [BLOCK_N // 16 (i), 8 (g), 4 (q), 1] of `rows` for the words of lane q (K
    k0 + 32 q ..): shaped as `_words`, so they meet its layout with no movement."""
    q = tl.arange(0, 4)[None, None, :, None]
    # unsigned (a block index is below 2^28 here, `eligible`): dividing by a power of two is then a
    # shift, with no rounding fix-up for negative values
    block = rows.to(tl.uint32) * (K // BLOCKSIZE) + (k0 + 32 * q).to(tl.uint32) // BLOCKSIZE
    return nf4_scale(block, True, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                     DOUBLE_QUANT, NESTED_BLOCKSIZE)


@triton.jit
def _codes(word):
    """The eight 4-bit codes of each word as three new register dims (j0, j1, j2): element
    j0 + 2 j1 + 4 j2 of the word (byte j // 2, its high nibble first)."""
    return tl.join(tl.join(tl.join((word >> 4) & 0xF, word & 0xF), tl.join((word >> 12) & 0xF, (word >> 8) & 0xF)),
                   tl.join(tl.join((word >> 20) & 0xF, (word >> 16) & 0xF),
                           tl.join((word >> 28) & 0xF, (word >> 24) & 0xF)))


@triton.jit
def lut_tile(words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, table, factor_ptr,
             rows_lo, rows_hi, kw, row_words, K,
             BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
             NATURAL: tl.constexpr, FACTOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 W[rows, 8 kw : 8 kw + BLOCK_K] (code times block scale, unrounded) of an NF4 weight
    whose rows hold whole quantization blocks, BLOCK_K = 128: rows 16 i + 8 h + g of the tile are
    `rows_lo` (h = 0) and `rows_hi` (h = 1) (`_rows`), `table` the 16 code values.

    Returned as (w, w · f) with f the factor `factor_ptr[row]` of each row when FACTOR, else
    (w, w). The tile's logical columns are in the order the register A operand of the tensor core
    wants (see `operand_order`) or, NATURAL, in K order (for a tile that goes to shared memory as a
    wgmma operand)."""
    WORDS: tl.constexpr = BLOCK_K // 8
    word = tl.join(_words(words_ptr, rows_lo, kw, row_words, WORDS),
                   _words(words_ptr, rows_hi, kw, row_words, WORDS))
    # one scale a row and quantization block; a block holds whole lanes' words (32 codes each)
    scale = tl.join(_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows_lo, kw * 8, K,
                            BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE),
                    _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows_hi, kw * 8, K,
                            BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE))
    if FACTOR:
        factor = tl.join(tl.load(factor_ptr + rows_lo), tl.load(factor_ptr + rows_hi))[:, :, :, :, :, None, None, None]
    else:
        factor = scale[:, :, :, :, :, None, None, None]   # unused
    if NATURAL:
        # [i, g, q, wpt, h, j0, j1, j2] -> [i, h, g, q, wpt, j2, j1, j0]: K = 32 q + 8 wpt + 4 j2 + 2 j1 + j0
        codes = tl.permute(_codes(word), (0, 4, 1, 2, 3, 7, 6, 5))
        scale = tl.permute(scale[:, :, :, :, :, None, None, None], (0, 4, 1, 2, 3, 7, 6, 5))
        factor = tl.permute(factor, (0, 4, 1, 2, 3, 7, 6, 5))
    else:
        # [i, g, q, wpt, h, j0, j1, j2] -> [i, h, g, wpt, j2, j1, q, j0]: rows 16 i + 8 h + g, columns L
        codes = tl.permute(_codes(word), (0, 4, 1, 3, 7, 6, 2, 5))
        scale = tl.permute(scale[:, :, :, :, :, None, None, None], (0, 4, 1, 3, 7, 6, 2, 5))
        factor = tl.permute(factor, (0, 4, 1, 3, 7, 6, 2, 5))
    value = tl.reshape(tl.gather(table, tl.reshape(codes, (BLOCK_N * BLOCK_K,)), 0), codes.shape) * scale
    w = tl.reshape(value, (BLOCK_N, BLOCK_K))
    if FACTOR:
        return w, tl.reshape(value * factor, (BLOCK_N, BLOCK_K))   # two roundings, as the dequantize kernel
    return w, w


@triton.jit
def _decode_linear_kernel(
    x_ptr, packed_ptr,
    # NF4 statistics
    absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
    # epilogue operands (one split), else the partials
    xa_ptr, b_ptr, mn_ptr, bias_ptr, scaling, y_ptr, z_ptr, part_ptr,
    # the fused shrink: lora_A (or, MIXED, the adapter table and each row's adapter) and the parts
    # of x Aᵀ it writes
    a_ptr, idx_ptr, xap_ptr,
    M, N, K, R, E, split_words, row_words,
    stride_xm, stride_xk, stride_xam, stride_bn, stride_br, stride_ym, stride_ps,
    stride_ar, stride_ak, stride_xaps,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    ROUND: tl.constexpr, BITWISE_BF16: tl.constexpr, DOT_DTYPE: tl.constexpr, RANK_PRECISION: tl.constexpr,
    DORA: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_Z: tl.constexpr, SPLIT_K: tl.constexpr,
    SHRINK_RANKS: tl.constexpr, MIXED: tl.constexpr, A_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """yᵀ tile [BLOCK_N, BLOCK_M] over K words kw_begin.. of this split. `split_words` and
    `row_words` are K counts in 4-byte words, so the JIT sees them divisible by 16 and loads 16
    bytes a thread.

    With SHRINK_RANKS (K split), the program of tile n also forms this split's part of ranks
    n, n + tiles, .. (SHRINK_RANKS of them) of x Aᵀ from the x tiles it reads, in fp32 (fused
    multiply-adds over K in a fixed order), into `xap_ptr` [splits, M, R]: the split-K epilogue
    sums them, so the shrink needs no launch of its own. (The static model charges that work to
    every program; only those of the first R tiles do it.) MIXED: each row m takes its own
    adapter's A (`kernels.multi_lora`'s table at `a_ptr`, int64 [4, E], and idx[m]), zero for a
    row of no adapter and past that adapter's rank, as `multi_lora.multi_shrink` forms it."""
    pdl_chain(PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    WORDS: tl.constexpr = BLOCK_K // 8
    # Weight rows past N re-read row N - 1 (no mask in the loop) and are not stored: the tile starts
    # at most BLOCK_N rows before the end.
    row0 = tl.minimum(pid_n * BLOCK_N, N - BLOCK_N)
    offs_n = row0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    table = tl.load(code_ptr + tl.arange(0, 16))
    offs_k = tl.arange(0, BLOCK_K)
    words_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
    rows_lo = _rows(row0, BLOCK_N)
    rows_hi = _rows(row0 + 8, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # the fused shrink: this split's part of ranks n, n + tiles (`SHRINK_RANKS` of them) of x Aᵀ,
    # formed beside the tile from the same x tiles by the programs that have a rank to form
    rank0 = pid_n
    rank1 = pid_n + tl.num_programs(0)
    a_rows = a_ptr
    r_rows = R
    if MIXED:   # each row's A (its first row) and rank
        e = tl.load(idx_ptr + offs_m, mask=mask_m, other=-1)
        named = mask_m & (e >= 0) & (e < E)
        e = tl.where(named, e, 0)
        a_rows = tl.load(a_ptr + e, mask=named, other=0).to(tl.pointer_type(A_DTYPE))
        r_rows = tl.where(named, tl.load(a_ptr + 3 * E + e, mask=named, other=0), 0)
    xa0 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    xa1 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    kw_begin = pid_s * split_words
    for kw in range(kw_begin, tl.minimum(kw_begin + split_words, row_words), WORDS):
        k0 = kw * 8
        w = lut_tile(words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, table, code_ptr,
                     rows_lo, rows_hi, kw, row_words, K, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE,
                     False, False, BLOCK_N, BLOCK_K)[0]
        w = round_to(w, ROUND, BITWISE_BF16).to(DOT_DTYPE)   # bitsandbytes' value in x's dtype
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk, mask=mask_m[:, None],
                    other=0.0)
        acc = tl.dot(w, tl.trans(operand_order(x, BLOCK_K)).to(DOT_DTYPE), acc)   # x in W's column order
        if SHRINK_RANKS > 0:
            if rank0 < R:
                xa0 = _shrink_step(x, xa0, a_rows, r_rows, rank0, k0 + offs_k, stride_ar, stride_ak, K, MIXED)
        if SHRINK_RANKS > 1:
            if rank1 < R:
                xa1 = _shrink_step(x, xa1, a_rows, r_rows, rank1, k0 + offs_k, stride_ar, stride_ak, K, MIXED)
    xap = xap_ptr + pid_s * stride_xaps + offs_m * R
    if SHRINK_RANKS > 0:
        if rank0 < R:
            tl.store(xap + rank0, tl.sum(xa0, axis=1), mask=mask_m)
    if SHRINK_RANKS > 1:
        if rank1 < R:
            tl.store(xap + rank1, tl.sum(xa1, axis=1), mask=mask_m)
    acc_mn = tl.trans(acc)                        # [BLOCK_M, BLOCK_N], as the epilogue takes it
    # a tile moved back from the end leaves the rows the previous tile stores: they point past N
    offs_n64 = tl.where(offs_n >= pid_n * BLOCK_N, offs_n, N).to(tl.int64)
    if SPLIT_K == 1:
        _forward_epilogue(acc_mn, acc_mn, offs_m.to(tl.int64), offs_n64, M, N,
                          xa_ptr, stride_xam, b_ptr, stride_bn, stride_br, scaling, 1.0,
                          mn_ptr, bias_ptr, y_ptr, stride_ym, z_ptr, stride_ym, R,
                          DORA, False, HAS_BIAS, SAVE_Z, RANK_PRECISION, BLOCK_R)
    else:
        mask = mask_m[:, None] & (offs_n64 < N)[None, :]
        tl.store(part_ptr + pid_s * stride_ps + offs_m[:, None] * N + offs_n64[None, :], acc_mn, mask=mask)


def eligible(x, weight) -> str:
    """'' when `decode_linear` takes this call, else why not."""
    if isinstance(weight, torch.Tensor):
        return "a dense weight"
    N, K = weight.shape
    if N < _config(x.shape[0], N)["BLOCK_N"]:
        return f"fewer than {_config(x.shape[0], N)['BLOCK_N']} output features"
    if K % weight.blocksize or K % BLOCK_K:
        return f"in_features not a multiple of {BLOCK_K} and of the quantization block"
    if x.shape[0] > MAX_M:
        return f"more than {MAX_M} rows"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"{x.dtype} activations"
    if weight.shape[0] * K // 8 >= 2**31:
        return "a weight of 2^34 elements or more"
    return ""


def _config(M, N):
    if interpreting():
        # tiles of 16 rows or more (the layout's unit), at most N's largest power of two
        return dict(BLOCK_N=max(16, min(64, 1 << max(0, N.bit_length() - 1))), num_warps=4, num_stages=1)
    # 128 weight rows x 128 columns a trip: about 0.2 warp-instructions a weight element (the
    # integer pipe the bound) and no spill up to 64 rows of x with 8 warps, whose ~120 registers
    # a thread leave room for four programs an SM to hide the loads' latency (sm_90 lowering,
    # `python -m bench.model`)
    return dict(BLOCK_N=128, num_warps=8, num_stages=1)


def decode_linear(x, weight, xa, lora_B, scaling, *, bias=None, mn=None, save_z=False, split_k=None,
                  lora_A=None, shrink_split_k=None, parts=False, mixed_shrink=None):
    """y (and z with `save_z`) of `lora.fused_linear` for an NF4 weight at M <= 64, without dropout
    (`eligible` says when); same arguments and outputs. Given `lora_A` ([r, K]) instead of xa
    (None), xa = x Aᵀ is formed here. When K is split and each tile's programs have at most
    `MAX_SHRINK_RANKS` ranks to form, the GEMM's own programs form it, split as the GEMM is;
    otherwise `lora.lora_shrink` does (`shrink_split_k` pins its splits, as `split_k` the
    GEMM's, and asks for it). Either way, when K is split the split-K epilogue sums the shrink's
    parts in order, so no launch sums them before. With `parts`, when K is split, the fp32 parts
    of x Wᵀ, [splits, M, N], come back instead, with no epilogue (for a consumer that sums them
    itself: the mixed-adapter expand). With those parts, `mixed_shrink` = (table, idx, R,
    adapter dtype) of a mixed-adapter batch (`kernels.multi_lora`) asks for its shrink's parts
    too, [splits, M, R], formed in the same programs when there are few ranks a tile: then
    (x Wᵀ parts, xa parts) come back."""
    M, K = x.shape
    N, R = lora_B.shape
    if (xa is None) == (lora_A is None):
        raise ValueError("decode_linear: pass exactly one of xa and lora_A")
    cfg = _config(M, N)
    BLOCK_N = cfg["BLOCK_N"]
    if N < BLOCK_N:   # (the last tile starts at N - BLOCK_N)
        raise ValueError(f"decode_linear: {N} output features, fewer than a {BLOCK_N}-row tile (see `eligible`)")
    BLOCK_M = max(16, _pow2(M))
    absmax, nested, nested_code, offset, code, dq, nbs = stats_args(weight)
    dots = _dot_args(x.dtype)
    tiles = triton.cdiv(N, BLOCK_N)
    if split_k is None:
        # at most two programs an SM (what fits at once): a third wave would run one split's
        # worth of work on a fraction of the SMs
        split_k = 1 if interpreting() else max(1, min(2 * _lora._sm_count(x.device) // tiles, K // BLOCK_K, 32))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), BLOCK_K) * BLOCK_K
    split_k = triton.cdiv(K, k_per_split)
    parts = parts and split_k > 1
    mixed = parts and mixed_shrink is not None and triton.cdiv(mixed_shrink[2], tiles) <= MAX_SHRINK_RANKS
    xa_parts = None
    # ranks each tile's programs form of the shrink (0: a shrink launch of its own, or none)
    shrink_ranks = 0
    if lora_A is not None and not parts:
        fuse = split_k > 1 and shrink_split_k is None and triton.cdiv(R, tiles) <= MAX_SHRINK_RANKS
        if fuse:
            shrink_ranks = triton.cdiv(R, tiles)
            xa_parts = torch.empty((split_k, M, R), dtype=torch.float32, device=x.device)
        else:
            xa_parts = _lora.lora_shrink(x, lora_A, split_k=shrink_split_k, sum_splits=split_k == 1)
        if split_k > 1:
            xa = xa_parts[0]   # [parts, M, R]; the first part stands for xa's strides
        else:
            xa, xa_parts = xa_parts, None
    if mixed:
        table, idx, R_mixed, _ = mixed_shrink
        shrink_ranks = triton.cdiv(R_mixed, tiles)
        xa_parts = torch.empty((split_k, M, R_mixed), dtype=torch.float32, device=x.device)
    out_dtype = store_dtype(x.dtype)
    if parts:   # x Wᵀ's fp32 parts alone: the kernel writes `part`, nothing reads y, z or xa
        part = y = z = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
        xa = part if xa is None else xa
    else:
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
        table if mixed else lora_A if shrink_ranks else xa, idx if mixed else xa,
        xa_parts if shrink_ranks else xa,
        M, N, K, R_mixed if mixed else R, table.shape[1] if mixed else 0, k_per_split // 8, K // 8,
        x.stride(0), x.stride(1), xa.stride(0), lora_B.stride(0), lora_B.stride(1), y.stride(0),
        part.stride(0) if split_k > 1 else 0,
        *((0, 0, xa_parts.stride(0)) if mixed else (lora_A.stride(0), lora_A.stride(1), xa_parts.stride(0))
          if shrink_ranks else (0, 0, 0)),
        BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=dq, NESTED_BLOCKSIZE=nbs,
        ROUND=_ROUND[x.dtype] if interpreting() else 0, BITWISE_BF16=interpreting(),
        DOT_DTYPE=dots["DOT_DTYPE"], RANK_PRECISION=dots["RANK_PRECISION"], **flags, SPLIT_K=split_k,
        SHRINK_RANKS=shrink_ranks, MIXED=mixed, A_DTYPE=_A_DTYPES[mixed_shrink[3]] if mixed else tl.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False, **pdl_args(x.device),
    )
    if parts:
        return (part, xa_parts) if mixed else part
    if split_k > 1:
        EM, EN = (16 if M <= 16 else 32), 64
        xa_sum = dict(stride_xas=0, XA_PARTS=1) if xa_parts is None else dict(
            stride_xas=xa_parts.stride(0), XA_PARTS=xa_parts.shape[0])
        _split_k_epilogue_kernel[(triton.cdiv(M, EM), triton.cdiv(N, EN))](
            part, part, xa, lora_B, mn_arg, bias_arg, scaling, 1.0, y, z, M, N, R, xa.stride(0),
            lora_B.stride(0), lora_B.stride(1), y.stride(0), part.stride(0), **flags, SECOND=False,
            RANK_PRECISION=dots["RANK_PRECISION"], SPLIT_K=split_k, BLOCK_M=EM, BLOCK_N=EN, BLOCK_R=BLOCK_R,
            **xa_sum, enable_fp_fusion=False, **pdl_args(x.device),
        )
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
        z = z.to(x.dtype) if save_z else y
    return (y, z) if save_z else y
