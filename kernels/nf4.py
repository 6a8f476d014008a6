"""NF4 (4-bit NormalFloat) encoding and decoding in Triton, byte-compatible with bitsandbytes.

Layout (SPEC §2): the weight is flattened row-major and cut into blocks of ``BLOCKSIZE``
elements; element ``i`` lives in byte ``i // 2`` (even element in the high nibble) and is scaled
by ``absmax[i // BLOCKSIZE]``. With double quantization ``absmax`` holds uint8 codes into the
signed 8-bit dynamic map and is decoded as ``code8[q] * nested_absmax[b // 256] + offset``.

The jitted decode helpers are shared by the fused GEMMs in ``lora.py`` and ``dora.py``: they
return fp32 values and never write a dense copy of the weight. The file then has the standalone
dequantize kernel and, last, the quantize kernel (4-bit codes and fp32 absmax; the nested 8-bit
step of double quantization runs in torch, see ``peft_ops.nf4``).
"""

import torch
import triton
import triton.language as tl

from ._config import store_dtype

# The 16 NF4 values, as fp32 (bitsandbytes' `get_4bit_type("nf4")`).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@triton.jit
def nf4_scale(block, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
              DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 absmax of the quantization blocks `block` (decoding the nested 8-bit code in place)."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        # Two roundings (multiply, then add), as bitsandbytes does; the launcher turns off FMA
        # contraction so the GPU rounds the same way.
        scale = tl.load(nested_code_ptr + q) * nested + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def nf4_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
             rows, mask_rows, k0, K,
             BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
             EVEN_K: tl.constexpr, ALIGNED_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile W[rows, k0:k0+BLOCK_K] of an NF4 weight with K columns (zero where masked).

    `rows` are int64 row indices and `k0` a multiple of BLOCK_K. With K even every row starts
    on a byte boundary, so the tile is read as BLOCK_K/2 whole bytes a row and the two nibbles
    are interleaved in registers; with K odd rows straddle bytes and each element finds its own.
    With K a multiple of BLOCKSIZE (ALIGNED_K, every Llama projection) and BLOCK_K dividing it,
    each row of the tile has one scale, decoded once instead of once an element.
    """
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = mask_rows[:, None] & (cols < K)[None, :]
    flat = rows[:, None] * K + cols[None, :]
    if EVEN_K:
        pair = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        pair_mask = mask_rows[:, None] & (pair * 2 < K)[None, :]
        byte = tl.load(packed_ptr + rows[:, None] * (K // 2) + pair[None, :], mask=pair_mask, other=0)
        byte = byte.to(tl.int32)
        nibble = tl.interleave(byte >> 4, byte & 0xF)
    else:
        byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
        nibble = (byte >> ((1 - (flat & 1)) * 4).to(tl.int32)) & 0xF
    value = tl.load(code_ptr + nibble)
    if ALIGNED_K and BLOCKSIZE % BLOCK_K == 0:
        # Rows hold whole quantization blocks and the tile sits inside one: one scale a row.
        block = rows * (K // BLOCKSIZE) + k0 // BLOCKSIZE
        scale = nf4_scale(block, mask_rows, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                          DOUBLE_QUANT, NESTED_BLOCKSIZE)[:, None]
    else:
        scale = nf4_scale(flat // BLOCKSIZE, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                          DOUBLE_QUANT, NESTED_BLOCKSIZE)
    return tl.where(mask, value * scale, 0.0)


@triton.jit
def _nf4_dequantize_kernel(
    out_ptr, packed_ptr,
    # quantization statistics
    absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
    # which blocks: `n_blocks` blocks of a sub-rectangle `block_cols` blocks wide whose first
    # block is (row0, col_block0); rows of the weight hold `row_blocks` blocks (K / BLOCKSIZE;
    # a flat weight is one row of all its whole blocks)
    first, n_blocks, row0, col_block0, block_cols, row_blocks, ld_out,
    # optional per-row factor (DoRA's m/n folded into a decode buffer), read at row0 + r
    row_scale_ptr,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    BLOCKS: tl.constexpr, WIDE: tl.constexpr, MASKED: tl.constexpr, ROW_SCALE: tl.constexpr,
):
    """Whole quantization blocks to a dense buffer, a tile row per block: its bytes are one
    contiguous run, its scale one value. Each byte becomes one output word holding its two
    values (the even element in the low half: the byte's high nibble), so the stores are as
    contiguous as the loads; WIDE words are two fp32, else two 16-bit values. With ROW_SCALE
    the fp32 value is multiplied by the row's factor before its one rounding."""
    t = first + tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    r = t // block_cols
    c = t - r * block_cols
    block = (row0 + r).to(tl.int64) * row_blocks + col_block0 + c
    pair = tl.arange(0, BLOCKSIZE // 2)
    src = block[:, None] * (BLOCKSIZE // 2) + pair[None, :]
    dst = (r.to(tl.int64) * ld_out + c * BLOCKSIZE)[:, None] // 2 + pair[None, :]
    if MASKED:
        live = t < n_blocks
        byte = tl.load(packed_ptr + src, mask=live[:, None], other=0).to(tl.int32)
        scale = nf4_scale(block, live, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                          DOUBLE_QUANT, NESTED_BLOCKSIZE)[:, None]
    else:
        byte = tl.load(packed_ptr + src).to(tl.int32)
        scale = nf4_scale(block, True, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                          DOUBLE_QUANT, NESTED_BLOCKSIZE)[:, None]
    even = tl.load(code_ptr + (byte >> 4)) * scale
    odd = tl.load(code_ptr + (byte & 0xF)) * scale
    if ROW_SCALE:
        factor = tl.load(row_scale_ptr + row0 + r)[:, None]
        even *= factor
        odd *= factor
    if WIDE:
        word = even.to(tl.uint32, bitcast=True).to(tl.uint64) | (odd.to(tl.uint32, bitcast=True).to(tl.uint64) << 32)
    else:
        half = out_ptr.dtype.element_ty   # the 16-bit float the words hold, passed as a typed view
        word = (even.to(half).to(tl.uint16, bitcast=True).to(tl.uint32)
                | (odd.to(half).to(tl.uint16, bitcast=True).to(tl.uint32) << 16))
    words = out_ptr.to(tl.pointer_type(tl.uint64 if WIDE else tl.uint32))
    if MASKED:
        tl.store(words + dst, word, mask=live[:, None])
    else:
        tl.store(words + dst, word)


@triton.jit
def _nf4_dequantize_tail_kernel(
    out_ptr, packed_ptr,
    absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
    start, numel,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Elements start..numel one by one: the partial last block of a flat weight (at most
    BLOCKSIZE - 1 elements), where a block's bytes and an odd element count do not line up."""
    idx = start + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < numel
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    nibble = (byte >> ((1 - (idx & 1)) * 4).to(tl.int32)) & 0xF
    value = tl.load(code_ptr + nibble)
    scale = nf4_scale(idx // BLOCKSIZE, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                      DOUBLE_QUANT, NESTED_BLOCKSIZE)
    tl.store(out_ptr + idx, (value * scale).to(out_ptr.dtype.element_ty), mask=mask)


def stats_args(w):
    """Kernel arguments for the quantization statistics of an NF4Weight-like object `w`.

    Returns (absmax, nested_absmax, nested_code, offset, code, double_quant, nested_blocksize);
    without double quantization the nested pointers repeat `absmax` and are never read.
    """
    if w.double_quant:
        return (w.absmax, w.nested_absmax, w.nested_code, float(w.offset), w.code, True,
                w.nested_blocksize)
    return (w.absmax, w.absmax, w.absmax, 0.0, w.code, False, 256)


# about 4096 elements a program: the whole blocks of one 16-byte load a thread at 4 warps
_ELEMENTS_PER_PROGRAM = 4096


def _launch_blocks(out, w, first_row, col_block0, rows, block_cols, row_blocks, ld_out, row_scale=None):
    """Dequantize `rows` x `block_cols` whole blocks into `out` (a contiguous buffer with row
    stride `ld_out`), optionally times `row_scale[first_row + r]`: full programs unmasked, the
    ragged rest in one masked program."""
    absmax, nested, nested_code, offset, code, dq, nbs = stats_args(w)
    n_blocks = rows * block_cols
    BLOCKS = max(1, min(_ELEMENTS_PER_PROGRAM // w.blocksize, triton.next_power_of_2(n_blocks)))
    wide = out.element_size() == 4
    meta = dict(BLOCKSIZE=w.blocksize, DOUBLE_QUANT=dq, NESTED_BLOCKSIZE=nbs, BLOCKS=BLOCKS, WIDE=wide,
                ROW_SCALE=row_scale is not None, num_warps=4, enable_fp_fusion=False)
    full = n_blocks // BLOCKS
    args = (out, w.packed, absmax, nested, nested_code, offset, code)
    scale = row_scale if row_scale is not None else absmax
    if full:
        _nf4_dequantize_kernel[(full,)](*args, 0, n_blocks, first_row, col_block0, block_cols, row_blocks, ld_out,
                                        scale, MASKED=False, **meta)
    if full * BLOCKS < n_blocks:
        _nf4_dequantize_kernel[(1,)](*args, full * BLOCKS, n_blocks, first_row, col_block0, block_cols, row_blocks,
                                     ld_out, scale, MASKED=True, **meta)


def nf4_dequantize(w, dtype):
    """Dense `dtype` copy of the NF4Weight-like `w` (shape `w.shape`), decoded by Triton."""
    N, K = w.shape
    # Under the interpreter this decodes to fp32 and torch rounds (SPEC §5), so the bytes still
    # match bitsandbytes.
    out = torch.empty(w.shape, dtype=store_dtype(dtype), device=w.packed.device)
    if K % w.blocksize == 0:
        _launch_blocks(out, w, 0, 0, N, K // w.blocksize, K // w.blocksize, K)
    else:
        # blocks straddle rows: the weight as one flat row of whole blocks, then the partial last one
        numel = N * K
        whole = numel // w.blocksize
        if whole:
            _launch_blocks(out, w, 0, 0, 1, whole, whole, whole * w.blocksize)
        if whole * w.blocksize < numel:
            absmax, nested, nested_code, offset, code, dq, nbs = stats_args(w)
            _nf4_dequantize_tail_kernel[(1,)](
                out, w.packed, absmax, nested, nested_code, offset, code, whole * w.blocksize, numel,
                BLOCKSIZE=w.blocksize, DOUBLE_QUANT=dq, NESTED_BLOCKSIZE=nbs,
                BLOCK=triton.next_power_of_2(numel - whole * w.blocksize), enable_fp_fusion=False)
    return out if out.dtype == dtype else out.to(dtype)


def nf4_dequantize_rows(w, row0, rows, out):
    """Rows row0..row0+rows of an NF4 weight whose rows hold whole blocks (K % blocksize == 0),
    into `out` [rows, K]: the transient buffer of the decode-once forward."""
    K = w.shape[1]
    _launch_blocks(out, w, row0, 0, rows, K // w.blocksize, K // w.blocksize, out.stride(0))
    return out


def nf4_dequantize_cols(w, col0, cols, out, row_scale=None):
    """Columns col0..col0+cols (multiples of the block size) of every row, into `out` [N, cols],
    each row times `row_scale` when given: the transient buffer of the decode-once dx."""
    K = w.shape[1]
    _launch_blocks(out, w, 0, col0 // w.blocksize, w.shape[0], cols // w.blocksize, K // w.blocksize,
                   out.stride(0), row_scale)
    return out


# --- quantize ---------------------------------------------------------------------------------
#
# bitsandbytes (0.50, the torch op its CPU backend runs) scales a full block by the reciprocal,
# x * (1 / absmax), but the partial last block by division, x / absmax, and stores that block's
# absmax clamped to at least 1e-38; every block is scaled against max(absmax, 1e-38), so an
# all-zero block gives codes 7. We do the same, so the bytes match. Divisions use `div_rn`
# (IEEE round-to-nearest; plain `/` may lower to an approximate divide on the GPU).

@triton.jit
def _nf4_nearest(scaled, midpoint_ptr):
    """Index of the nearest NF4 value: the number of fp32 midpoints strictly below `scaled`, so
    an exact midpoint goes to the lower code (as `torch.bucketize` does in bitsandbytes)."""
    q = tl.zeros(scaled.shape, dtype=tl.int32)
    for j in tl.static_range(15):
        q += (scaled > tl.load(midpoint_ptr + j)).to(tl.int32)
    return q


@triton.jit
def _nf4_scaled(x, partial, recip, safe_absmax):
    scaled = tl.where(partial, tl.math.div_rn(x, safe_absmax), x * recip)
    return tl.minimum(tl.maximum(scaled, -1.0), 1.0)


@triton.jit
def _nf4_quantize_kernel(
    x_ptr, packed_ptr, absmax_ptr, midpoint_ptr,
    numel, n_blocks,
    BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
):
    # One program quantizes BLOCKS_PER_PROGRAM whole blocks; each row of the tile is one block,
    # read as its even and its odd elements so the two nibbles of a byte sit side by side.
    pid = tl.program_id(0).to(tl.int64)
    block = pid * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    pair = tl.arange(0, BLOCKSIZE // 2)
    even = block[:, None] * BLOCKSIZE + 2 * pair[None, :]
    # Past the end (including the pad element of an odd count) reads 0, which encodes as code 7.
    x_even = tl.load(x_ptr + even, mask=even < numel, other=0.0).to(tl.float32)
    x_odd = tl.load(x_ptr + even + 1, mask=even + 1 < numel, other=0.0).to(tl.float32)

    absmax = tl.maximum(tl.max(tl.abs(x_even), axis=1), tl.max(tl.abs(x_odd), axis=1))
    # 1e-38 is subnormal in fp32: as a bare literal Triton 3.6 types it fp64 and the divide below
    # refuses it, so it is made an fp32 tensor (the value torch's clamp uses too).
    safe_absmax = tl.maximum(absmax, tl.full(absmax.shape, 1e-38, tl.float32))
    recip = tl.math.div_rn(tl.full(safe_absmax.shape, 1.0, tl.float32), safe_absmax)
    partial = (block + 1) * BLOCKSIZE > numel
    tl.store(absmax_ptr + block, tl.where(partial, safe_absmax, absmax), mask=block < n_blocks)

    q_even = _nf4_nearest(_nf4_scaled(x_even, partial[:, None], recip[:, None], safe_absmax[:, None]),
                          midpoint_ptr)
    q_odd = _nf4_nearest(_nf4_scaled(x_odd, partial[:, None], recip[:, None], safe_absmax[:, None]),
                         midpoint_ptr)
    byte = ((q_even << 4) | q_odd).to(tl.uint8)
    tl.store(packed_ptr + (even >> 1), byte, mask=even < numel)


def nf4_midpoints(device) -> torch.Tensor:
    """fp32 midpoints between neighbouring NF4 values, computed in fp32 as bitsandbytes does."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return (code[:-1] + code[1:]) / 2


def nf4_quantize(weight: torch.Tensor, blocksize: int):
    """Packed NF4 codes (uint8, ``(numel + 1) // 2`` bytes) and fp32 absmax per block of the
    float tensor `weight`, flattened row-major."""
    x = weight.contiguous()
    numel = x.numel()
    n_blocks = triton.cdiv(numel, blocksize)
    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    # About 4096 elements a program, but no more blocks than there are.
    blocks_per_program = min(max(1, 4096 // blocksize), triton.next_power_of_2(n_blocks))
    grid = (triton.cdiv(n_blocks, blocks_per_program),)
    _nf4_quantize_kernel[grid](
        x, packed, absmax, nf4_midpoints(x.device), numel, n_blocks,
        BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=blocks_per_program,
        enable_fp_fusion=False,
    )
    return packed, absmax
