"""The decode-once strategy for training-sized batches: dense tensor-core GEMMs with the LoRA / DoRA
epilogue, over a 16-bit weight (a dense base as it is, or an NF4 base decoded once per call).

At large M the fused kernels of `lora.py` decode every NF4 tile once per M tile, and that decode,
not the tensor cores, bounds them. Here the weight is decoded once (`nf4.nf4_dequantize_rows` /
`_cols`) into a transient buffer, in chunks of at most `buffer_bytes` (never saved for backward,
freed when the call returns), and a GEMM streams it through the Hopper tensor memory accelerator
(tensor descriptors: a tile is one copy instruction, no per-element address arithmetic):

    forward  y[:, chunk] = epilogue(x · W[chunk]ᵀ)                 rows of W a chunk
    dx       dx[:, chunk] = epilogue(dy · W'[:, chunk])             columns of W a chunk

with the epilogues of `lora.py` (s·xa Bᵀ added into the accumulator, DoRA's m/n, bias, DoRA's
second accumulator on the dropped input; s·gb A and the regenerated dropout mask for dx). For
DoRA without dropout dx = (dy ⊙ m/n) W + s·gb A = dy (m/n ⊙ W) + s·gb A: the buffer holds the
rows of W scaled by m/n (rounded once to the activation dtype, as the fused kernel rounds dy ⊙ m/n).

Descriptors need 16-byte aligned rows: a 16-bit x with K a multiple of 8, contiguous rows; the
dispatcher (`peft_ops.strategy`) only picks this strategy then.
"""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._config import interpreting, pdl_args, pdl_chain, store_dtype
from .decode import _rows, lut_tile
from .dropout import dropout_scale, keep_threshold, round_to
from .lora import _ROUND, _dot_args, _forward_epilogue, _pow2, _rank_block, grouped_pid, rank_product
from .nf4 import nf4_dequantize_cols, nf4_dequantize_rows, stats_args

DEFAULT_BUFFER_BYTES = 64 << 20
LUT_BLOCK_K = 128


@triton.jit
def _gemm_forward_kernel(
    x_desc, w_desc, xd_desc,
    # LUT: the NF4 weight itself, decoded tile by tile in registers (`w_desc` unused)
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
    # epilogue operands
    xa_ptr, b_ptr, mn_ptr, bias_ptr, scaling, inv_keep,
    y_ptr, z_ptr,
    M, N_end, K, R, n0,
    stride_xam, stride_bn, stride_br, stride_ym,
    DOT_DTYPE: tl.constexpr, RANK_PRECISION: tl.constexpr,
    DORA: tl.constexpr, SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_Z: tl.constexpr,
    LUT: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    ROUND: tl.constexpr, BITWISE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """y[:, n0:N_end] of the forward from the weight rows n0..N_end in `w_desc` (local row 0 is
    global row n0), or with LUT from the NF4 weight of N_end rows (n0 = 0)."""
    pdl_chain(PDL)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N_end - n0, BLOCK_N)
    pid_m, pid_n = grouped_pid(tl.program_id(0), num_m, num_n, GROUP_M)
    row = pid_m * BLOCK_M
    col = pid_n * BLOCK_N
    if LUT:
        table = tl.load(code_ptr + tl.arange(0, 16))
        words_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
        # rows past the end re-read the last row: finite values in output columns never stored
        rows_lo = tl.minimum(_rows(col, BLOCK_N), N_end - 1)
        rows_hi = tl.minimum(_rows(col + 8, BLOCK_N), N_end - 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if LUT:
            w = lut_tile(words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, table, code_ptr,
                         rows_lo, rows_hi, k0 // 8, K // 8, K, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE,
                         True, False, BLOCK_N, BLOCK_K)[0]
            wt = tl.trans(round_to(w, ROUND, BITWISE_BF16).to(DOT_DTYPE))
        else:
            wt = tl.trans(w_desc.load([col, k0]).to(DOT_DTYPE))
        acc = tl.dot(x_desc.load([row, k0]).to(DOT_DTYPE), wt, acc)
        if SECOND:
            acc_d = tl.dot(xd_desc.load([row, k0]).to(DOT_DTYPE), wt, acc_d)
    offs_m = row.to(tl.int64) + tl.arange(0, BLOCK_M)
    offs_n = (n0 + col).to(tl.int64) + tl.arange(0, BLOCK_N)
    _forward_epilogue(acc, acc_d, offs_m, offs_n, M, N_end,
                      xa_ptr, stride_xam, b_ptr, stride_bn, stride_br, scaling, inv_keep,
                      mn_ptr, bias_ptr, y_ptr, stride_ym, z_ptr, stride_ym, R,
                      DORA, SECOND, HAS_BIAS, SAVE_Z, RANK_PRECISION, BLOCK_R)


@triton.jit
def _gemm_dx_kernel(
    dy_desc, w_desc, w2_desc,
    # LUT: the NF4 weight itself, decoded tile by tile in registers (`w_desc`, `w2_desc` unused),
    # its rows times `factor_ptr` (m/n) for the base term when FACTOR and for `w2` when SECOND
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr, factor_ptr,
    gb_ptr, a_ptr, scaling,
    dx_ptr,
    M, N, K, K_end, R, k0,
    stride_gbm, stride_ar, stride_ak, stride_dxm,
    seed, p, inv_keep,
    DOT_DTYPE: tl.constexpr, RANK_PRECISION: tl.constexpr, SECOND: tl.constexpr, DROPOUT: tl.constexpr,
    LUT: tl.constexpr, FACTOR: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr, ROUND: tl.constexpr, BITWISE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """dx[:, k0:K_end] from weight columns k0..K_end (`w_desc`, local column 0 is global k0), the
    dx kernel of `lora.py` with the column scales folded into the weights: acc = dy · W, with
    SECOND acc2 = dy · W2 (W2 = (m/n − 1) ⊙ W), then dx = acc + D ⊙ (acc2 + s·gb A) with dropout,
    dx = acc + s·gb A without."""
    pdl_chain(PDL)
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K_end - k0, BLOCK_K)
    pid_m, pid_k = grouped_pid(tl.program_id(0), num_m, num_k, GROUP_M)
    row = pid_m * BLOCK_M
    col = pid_k * BLOCK_K
    if LUT:
        table = tl.load(code_ptr + tl.arange(0, 16))
        words_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        dy = dy_desc.load([row, n0]).to(DOT_DTYPE)
        if LUT:
            # rows past N re-read the last row: finite values times dy's zero padding
            w, wf = lut_tile(words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, table, factor_ptr,
                             tl.minimum(_rows(n0, BLOCK_N), N - 1), tl.minimum(_rows(n0 + 8, BLOCK_N), N - 1),
                             (k0 + col) // 8, K // 8, K, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE,
                             True, FACTOR or SECOND, BLOCK_N, BLOCK_K)
            if FACTOR:
                w = wf
            acc = tl.dot(dy, round_to(w, ROUND, BITWISE_BF16).to(DOT_DTYPE), acc)
            if SECOND:
                acc2 = tl.dot(dy, round_to(wf, ROUND, BITWISE_BF16).to(DOT_DTYPE), acc2)
        else:
            acc = tl.dot(dy, w_desc.load([n0, col]).to(DOT_DTYPE), acc)
            if SECOND:
                acc2 = tl.dot(dy, w2_desc.load([n0, col]).to(DOT_DTYPE), acc2)
    offs_m = row.to(tl.int64) + tl.arange(0, BLOCK_M)
    offs_k = (k0 + col).to(tl.int64) + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K_end
    if DROPOUT:
        inner = rank_product(acc2, gb_ptr, stride_gbm, 1, a_ptr, stride_ar, stride_ak, offs_m, offs_k,
                             mask_m, mask_k, R, scaling, RANK_PRECISION, BLOCK_R)
        # the mask of element (m, k) of the full [M, K] input, whichever chunk this is
        dx = acc + inner * dropout_scale(seed, offs_m, k0 + col, keep_threshold(p), inv_keep, BLOCK_K)
    else:
        dx = rank_product(acc + acc2, gb_ptr, stride_gbm, 1, a_ptr, stride_ar, stride_ak, offs_m, offs_k,
                          mask_m, mask_k, R, scaling, RANK_PRECISION, BLOCK_R)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

def tma_ready(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor can back a tensor descriptor: unit last stride, 16-byte aligned rows
    and base."""
    return (t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
            and t.data_ptr() % 16 == 0)


# Tiles chosen from sm_90 lowering (`python -m bench.model`): the largest that keep every
# accumulator in registers (no spill) with the rank-r epilogue, and the tensor cores the bound.
def _forward_config(M, dora, second):
    if interpreting():
        return dict(BLOCK_M=min(64, _pow2(M)), BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)
    if second:   # two accumulators (the base term on x and on the dropped x)
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _dx_config(M):
    """BLOCK_N is dx's reduction step (over N), BLOCK_K its output columns."""
    if interpreting():
        return dict(BLOCK_M=min(64, _pow2(M)), BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)


# The table-lookup decode's tile is 128 K columns (four words a lane, `decode.lut_tile`); with it
# in the loop the 128 x 128 tile stays the tensor cores' bound (sm_90 lowering, `bench.model`).
def _lut_forward_config(M, second):
    if interpreting():
        return dict(BLOCK_M=min(64, _pow2(M)), BLOCK_N=32, BLOCK_K=LUT_BLOCK_K, GROUP_M=4, num_warps=4, num_stages=1)
    if second:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=LUT_BLOCK_K, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=LUT_BLOCK_K, GROUP_M=8, num_warps=8, num_stages=3)


def _lut_dx_config(M):
    if interpreting():
        return dict(BLOCK_M=min(64, _pow2(M)), BLOCK_N=32, BLOCK_K=LUT_BLOCK_K, GROUP_M=4, num_warps=4, num_stages=1)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=LUT_BLOCK_K, GROUP_M=8, num_warps=8, num_stages=3)


def lut_eligible(weight) -> str:
    """'' when the GEMMs can decode this weight tile by tile (`backend="lut"`), else why not."""
    if isinstance(weight, torch.Tensor):
        return "a dense weight"
    N, K = weight.shape
    if K % weight.blocksize or K % LUT_BLOCK_K:
        return f"in_features not a multiple of {LUT_BLOCK_K} and of the quantization block"
    if N * K // 8 >= 2**31:
        return "a weight of 2^34 elements or more"
    return ""


def _lut_args(weight, x):
    """The NF4 operands of the LUT kernels (`weight` an NF4Weight), or placeholders never read."""
    if weight is None:
        return dict(args=(x, x, x, x, 0.0, x), meta=dict(LUT=False, BLOCKSIZE=64, DOUBLE_QUANT=False,
                                                         NESTED_BLOCKSIZE=256, ROUND=0, BITWISE_BF16=False))
    absmax, nested, nested_code, offset, code, dq, nbs = stats_args(weight)
    return dict(args=(weight.packed, absmax, nested, nested_code, offset, code),
                meta=dict(LUT=True, BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=dq, NESTED_BLOCKSIZE=nbs,
                          ROUND=_ROUND[x.dtype] if interpreting() else 0, BITWISE_BF16=interpreting()))


def _chunks(total, unit, per_unit_bytes, budget):
    """(start, size) chunks of `total` rows (or columns) in multiples of `unit`, each at most
    `budget` bytes at `per_unit_bytes` a row (at least one unit); one chunk when `budget` is None."""
    if budget is None:
        return [(0, total)]
    step = max(unit, (budget // max(per_unit_bytes, 1)) // unit * unit)
    return [(s, min(step, total - s)) for s in range(0, total, step)]


def _desc(t, block):
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def _buffer(rows, cols, dtype, device):
    """A 16-bit decode buffer, or under the interpreter an fp32 one (it truncates 16-bit casts:
    SPEC §5) that the caller rounds."""
    return torch.empty((rows, cols), dtype=store_dtype(dtype), device=device)


def _rounded(buf, dtype):
    """The decode buffer in `dtype`: bitsandbytes' values, rounded once to the activation dtype."""
    return buf if buf.dtype == dtype else buf.to(dtype)


def _weight_chunk_rows(weight, n0, rows, dtype, device):
    """W[n0:n0+rows] as a dense `dtype` matrix: decoded from NF4, or a view of a dense weight."""
    if isinstance(weight, torch.Tensor):
        return weight[n0:n0 + rows]
    return _rounded(nf4_dequantize_rows(weight, n0, rows, _buffer(rows, weight.shape[1], dtype, device)), dtype)


def gemm_forward(x, weight, xa, lora_B, scaling, *, bias=None, mn=None, xd=None, inv_keep=1.0, save_z=False,
                 buffer_bytes=DEFAULT_BUFFER_BYTES, backend="triton"):
    """The forward of `lora.fused_linear` (same arguments and outputs) by a tensor-core GEMM with
    the epilogue fused: over a weight decoded once into transient chunks (`backend="triton"`), the
    same chunks through cuBLAS (torch.mm) and one epilogue pass (`"cublas"`), or an NF4 weight
    decoded tile by tile in the GEMM's loop, no buffer (`"lut"`, when `lut_eligible`)."""
    M, K = x.shape
    N, R = lora_B.shape
    out_dtype = store_dtype(x.dtype)
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    z = torch.empty((M, N), dtype=out_dtype, device=x.device) if save_z else y
    second = xd is not None
    dots = _dot_args(x.dtype)
    flags = dict(DORA=mn is not None, SECOND=second, HAS_BIAS=bias is not None, SAVE_Z=save_z)
    BLOCK_R = _rank_block(R)
    lut = backend == "lut"
    cfg = _lut_forward_config(M, second) if lut else _forward_config(M, mn is not None, second)
    quantized = not isinstance(weight, torch.Tensor)
    budget = buffer_bytes if quantized else None   # a dense weight is read in place
    unit = cfg["BLOCK_N"] if not quantized else max(cfg["BLOCK_N"], weight.blocksize)
    mn_arg = mn if mn is not None else xa
    bias_arg = bias if bias is not None else xa
    nf4 = _lut_args(weight if lut else None, x)
    if backend != "cublas":
        x_desc = _desc(x, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
        xd_desc = _desc(xd, [cfg["BLOCK_M"], cfg["BLOCK_K"]]) if second else x_desc
    for n0, rows in [(0, N)] if lut else _chunks(N, unit, K * x.element_size(), budget):
        w = None if lut else _weight_chunk_rows(weight, n0, rows, x.dtype, x.device)
        if backend != "cublas":
            grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(rows, cfg["BLOCK_N"]),)
            _gemm_forward_kernel[grid](
                x_desc, x_desc if lut else _desc(w, [cfg["BLOCK_N"], cfg["BLOCK_K"]]), xd_desc, *nf4["args"],
                xa, lora_B, mn_arg, bias_arg, scaling, inv_keep, y, z,
                M, n0 + rows, K, R, n0,
                xa.stride(0), lora_B.stride(0), lora_B.stride(1), y.stride(0),
                DOT_DTYPE=dots["DOT_DTYPE"], RANK_PRECISION=dots["RANK_PRECISION"], **flags, **nf4["meta"],
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=BLOCK_R,
                GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                enable_fp_fusion=False, **pdl_args(x.device),
            )
        else:
            _cublas_forward_chunk(x, w, xd, n0, rows, xa, lora_B, mn_arg, bias_arg, scaling, inv_keep, y, z,
                                  flags, dots, BLOCK_R)
        del w
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
        z = z.to(x.dtype) if save_z else y
    return (y, z) if save_z else y


def _cublas_forward_chunk(x, w, xd, n0, rows, xa, lora_B, mn, bias, scaling, inv_keep, y, z, flags, dots, BLOCK_R):
    """cuBLAS x · W[chunk]ᵀ (and xd · W[chunk]ᵀ), then the split-K epilogue kernel with one split."""
    from .lora import _split_k_epilogue_kernel

    M = x.shape[0]
    part = torch.mm(x, w.t())
    part_d = torch.mm(xd, w.t()) if flags["SECOND"] else part
    EM, EN = 32, 64
    # The epilogue indexes operands by global column: shift every per-column pointer to the chunk.
    _split_k_epilogue_kernel[(triton.cdiv(M, EM), triton.cdiv(rows, EN))](
        part, part_d, xa, lora_B[n0:n0 + rows], mn[n0:n0 + rows] if flags["DORA"] else mn,
        bias[n0:n0 + rows] if flags["HAS_BIAS"] else bias, scaling, inv_keep,
        y[:, n0:n0 + rows], z[:, n0:n0 + rows] if flags["SAVE_Z"] else y[:, n0:n0 + rows],
        M, rows, lora_B.shape[1], xa.stride(0), lora_B.stride(0), lora_B.stride(1), y.stride(0), 0,
        **flags, RANK_PRECISION=dots["RANK_PRECISION"], SPLIT_K=1, BLOCK_M=EM, BLOCK_N=EN, BLOCK_R=BLOCK_R,
        enable_fp_fusion=False, **pdl_args(x.device),
    )


def gemm_dx(dy, weight, gb, lora_A, scaling, *, col_scale=None, second_scale=None, dropout=0.0, seed=0,
            out_dtype=None, buffer_bytes=DEFAULT_BUFFER_BYTES, lut=False):
    """dx of `lora.fused_linear_dx` (same arguments) by a tensor-core GEMM: `dy` a contiguous
    16-bit [M, N] matrix; the weight decoded (or, dense, scaled) column chunk by column chunk into
    a transient buffer, DoRA's column scales folded into the chunk's rows, or with `lut` (an NF4
    weight, `lut_eligible`) decoded tile by tile in the GEMM's loop, the scales applied there."""
    M, N = dy.shape
    R, K = lora_A.shape
    out_dtype = out_dtype or dy.dtype
    dx = torch.empty((M, K), dtype=store_dtype(out_dtype), device=dy.device)
    dots = _dot_args(out_dtype)
    cfg = _lut_dx_config(M) if lut else _dx_config(M)
    quantized = not isinstance(weight, torch.Tensor)
    scaled = col_scale is not None or second_scale is not None
    buffers = 2 if second_scale is not None else 1
    budget = buffer_bytes // buffers if quantized or scaled else None
    unit = cfg["BLOCK_K"] if not quantized else max(cfg["BLOCK_K"], weight.blocksize)
    dy_desc = _desc(dy, [cfg["BLOCK_M"], cfg["BLOCK_N"]])
    nf4 = _lut_args(weight if lut else None, dy)
    factor = col_scale if col_scale is not None else second_scale
    factor = factor if factor is not None else gb
    block = [cfg["BLOCK_N"], cfg["BLOCK_K"]]
    for k0, cols in [(0, K)] if lut else _chunks(K, unit, N * dy.element_size(), budget):
        if lut:
            w_desc = w2_desc = dy_desc
        elif second_scale is not None:
            w_desc = _desc(_weight_chunk_cols(weight, k0, cols, out_dtype, dy.device), block)
            w2_desc = _desc(_weight_chunk_cols(weight, k0, cols, out_dtype, dy.device, second_scale), block)
        else:
            w_desc = w2_desc = _desc(_weight_chunk_cols(weight, k0, cols, out_dtype, dy.device, col_scale), block)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(cols, cfg["BLOCK_K"]),)
        _gemm_dx_kernel[grid](
            dy_desc, w_desc, w2_desc, *nf4["args"], factor,
            gb, lora_A, scaling, dx,
            M, N, K, k0 + cols, R, k0,
            gb.stride(0), lora_A.stride(0), lora_A.stride(1), dx.stride(0),
            seed, dropout, 1.0 / (1.0 - dropout) if dropout else 1.0,
            DOT_DTYPE=dots["DOT_DTYPE"], RANK_PRECISION=dots["RANK_PRECISION"],
            SECOND=second_scale is not None, DROPOUT=dropout > 0, FACTOR=lut and col_scale is not None,
            **nf4["meta"],
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=_rank_block(R),
            GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            enable_fp_fusion=False, **pdl_args(dy.device),
        )
        del w_desc, w2_desc   # the chunk's buffer goes with its descriptor
    return dx if dx.dtype == out_dtype else dx.to(out_dtype)


def _weight_chunk_cols(weight, k0, cols, dtype, device, row_scale=None):
    """W[:, k0:k0+cols] (times `row_scale` per row) as a dense `dtype` matrix with aligned rows."""
    if isinstance(weight, torch.Tensor):
        w = weight[:, k0:k0 + cols]
        # a dense weight scaled once per call: its one rounding, as the NF4 decode's
        return w if row_scale is None else (w.float() * row_scale.float()[:, None]).to(dtype)
    buf = _buffer(weight.shape[0], cols, dtype, device)
    return _rounded(nf4_dequantize_cols(weight, k0, cols, buf, row_scale), dtype)
