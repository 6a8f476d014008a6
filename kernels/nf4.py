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
    numel,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
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


def nf4_dequantize(w, dtype):
    """Dense `dtype` copy of the NF4Weight-like `w` (shape `w.shape`), decoded by Triton."""
    numel = w.shape[0] * w.shape[1]
    # Under the interpreter this decodes to fp32 and torch rounds (SPEC §5), so the bytes still
    # match bitsandbytes.
    out = torch.empty(w.shape, dtype=store_dtype(dtype), device=w.packed.device)
    absmax, nested, nested_code, offset, code, dq, nbs = stats_args(w)
    BLOCK = 1024
    _nf4_dequantize_kernel[(triton.cdiv(numel, BLOCK),)](
        out, w.packed, absmax, nested, nested_code, offset, code, numel,
        BLOCKSIZE=w.blocksize, DOUBLE_QUANT=dq, NESTED_BLOCKSIZE=nbs, BLOCK=BLOCK,
        enable_fp_fusion=False,
    )
    return out if out.dtype == dtype else out.to(dtype)


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
