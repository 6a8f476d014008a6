"""The fused ops, each dispatched to its Triton launcher or to its plain-PyTorch twin.

Execution rule (SPEC §1): CUDA tensors run the Triton kernels; CPU tensors run the twin here,
unless TRITON_INTERPRET=1, in which case they run the Triton kernels in Triton's interpreter.
The twins compute the same math (fp32 products and accumulation, the weight rounded to the
activation dtype first; for bf16 activations on CPUs with bf16 units, and for one-row products,
the base GEMMs take bf16 operands and round their fp32 sums once to bf16, see `cpu_gemm_dtype`)
and draw the same dropout masks, so the autograd Functions above them are backend-agnostic. Two
of the twins' loops, the dropout mask and the NF4 decode, run as native code on the CPU where it
builds (`peft_ops._cpu_loops`), with the PyTorch passes' bits.
"""

import functools
import math
import os

import torch

from . import _cpu_loops
from . import nf4 as _nf4
from . import strategy
from .kernels import _config
from .kernels import decode as _decode
from .kernels import dora as _dora
from .kernels import dropout as _dropout
from .kernels import gemm as _gemm
from .kernels import lora as _lora


def use_triton(t: torch.Tensor) -> bool:
    """True when ops on `t` run the Triton kernels (CUDA, or any device under the interpreter)."""
    return t.is_cuda or _config.interpreting()


# ---------------------------------------------------------------------------------------------
# Dropout: the kernels' Philox stream (`tl.randint4x`, four decisions a call) reproduced in PyTorch
# ---------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85

# Counters per pass. Ten rounds of about ten int64 passes each run over one chunk, which stays in
# cache; at 2¹⁵ counters (torch's grain size) each pass runs on the calling thread. Larger passes
# are parallel regions, and on a busy 2-core machine each region can wait a scheduler time slice
# for its second thread: a 1024 x 704 mask took 4 s in passes of 2¹⁶ and 0.05 s in passes of 2¹⁵.
_CHUNK = 1 << 15


def _mul(word, factor):
    """word * factor; a tensor word is a temporary of the rounds, multiplied in place."""
    return word.mul_(factor) if isinstance(word, torch.Tensor) else word * factor


def _hi_xor(prod, carried, key):
    """The Philox output word ((prod >> 32) ^ carried ^ key) & 0xFFFFFFFF.

    Each word is a Python int while it is the same for every counter, else an int64 tensor. Only
    the low 32 bits of `carried` count: it is the raw product of the round before (its low word),
    and the final mask clears what lies above."""
    hi = prod >> 32
    if isinstance(hi, torch.Tensor):
        if isinstance(carried, torch.Tensor):
            word = hi.bitwise_xor_(carried).bitwise_xor_(key)
        else:
            word = hi.bitwise_xor_(carried ^ key)
    elif isinstance(carried, torch.Tensor):
        word = carried ^ (hi ^ key)
    else:
        return (hi ^ carried ^ key) & _MASK32
    return word.bitwise_and_(_MASK32)


def _philox4(seed: int, c0: torch.Tensor, c1=0):
    """The four 32-bit outputs of Philox4x32-10 (Triton's `randint4x`) for counters (c0, c1, 0, 0)
    and key `seed`, as exact uint32 values in int64 tensors.

    c0: uint32 words in an int64 tensor (overwritten); c1: the same, or an int when every counter
    shares it (0 for counters below 2³²). uint32 words are held in int64: an int64 product of two
    such words wraps modulo 2⁶⁴, which leaves exactly the 64 bits of the unsigned product (the
    high word is bits 32..63). Words that are the same for every counter stay Python ints, so
    the first two rounds, whose inputs are mostly the zero words, cost a few passes instead of ten."""
    c2 = c3 = 0
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        prod_b, prod_a = _mul(c2, _ROUND_B), _mul(c0, _ROUND_A)
        c0, c2 = _hi_xor(prod_b, c1, k0), _hi_xor(prod_a, c3, k1)
        c1, c3 = prod_b, prod_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1.bitwise_and_(_MASK32), c2, c3.bitwise_and_(_MASK32)


def _philox4_words(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """int32 [n, 4]: the four words of `randint4x(seed, counters)` for int64 `counters` (flattened)."""
    flat = counters.reshape(-1).to(torch.int64)
    out = torch.empty((flat.numel(), 4), dtype=torch.int32, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK]
        c1 = (chunk >> 32).bitwise_and_(_MASK32)
        words = _philox4(seed, chunk & _MASK32, c1 if c1.any() else 0)
        out[start:start + _CHUNK] = torch.stack(words, dim=1)   # int32 keeps the low 32 bits
    return out


def keep_threshold(p: float) -> int:
    """floor(fp32(p) · 2²⁴), as the kernels compute it: an element is kept when the top 24 bits
    of its Philox word are at least this (0 keeps all; 2²⁴, at p = 1, keeps none)."""
    return int(float(torch.tensor(float(p), dtype=torch.float32)) * (1 << _dropout.THRESHOLD_BITS))


def dropout_keep(seed: int, shape, p: float, device=None) -> torch.Tensor:
    """bool keep mask of a LoRA input of `shape` (flattened to [M, K], K its last dim), drawn as
    the fused kernels draw it (`kernels/dropout.py`): element (m, k) is word k % 4 of Philox at
    the counter (k // 4, m, 0, 0), kept when that word >> 8 is at least `keep_threshold(p)`.
    Regenerated by every op that needs it, never stored."""
    numel = math.prod(shape)
    if numel == 0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    K = shape[-1]
    M, groups = numel // K, -(-K // 4)
    threshold = keep_threshold(p)
    if (device is None or torch.device(device).type == "cpu") and _cpu_loops.available():
        return _cpu_loops.dropout_keep(seed, M, K, threshold).view(shape)
    count = M * groups
    keep = torch.empty((count, 4), dtype=torch.bool, device=device)
    for start in range(0, count, _CHUNK):
        stop = min(count, start + _CHUNK)
        index = torch.arange(start, stop, dtype=torch.int64, device=device)
        row = torch.div(index, groups, rounding_mode="floor")
        words = _philox4(seed, index.sub_(row * groups), row)      # counters (k // 4, m, 0, 0)
        for j, w in enumerate(words):
            torch.ge(w.bitwise_right_shift_(32 - _dropout.THRESHOLD_BITS), threshold, out=keep[start:stop, j])
    keep = keep.view(M, groups * 4)
    return (keep if groups * 4 == K else keep[:, :K].contiguous()).view(shape)


def dropout_scale(seed: int, shape, p: float, device) -> torch.Tensor:
    """keep/(1-p) as fp32 for a LoRA input of `shape` (flattened to [M, K] row-major), exactly as
    the fused kernels draw it from `seed`. Tests and references use it; the kernels never
    materialise it."""
    device = torch.device(device)
    if device.type == "cuda" or _config.interpreting():
        return _dropout.dropout_scale_tensor(seed, tuple(shape), p, device)
    keep = dropout_keep(seed, tuple(shape), p, device)
    return keep.to(torch.float32) * torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# The CPU path: the base GEMMs' precision, and the base weight a row chunk at a time
# ---------------------------------------------------------------------------------------------

CPU_PRECISIONS = ("auto", "fp32", "bf16")
_BF16_UNITS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_units() -> tuple:
    """This CPU's bf16 matrix units, as /proc/cpuinfo names them ('avx512_bf16', 'amx_bf16'): what
    torch's oneDNN bf16 GEMMs run on. Empty without (AVX2-only x86, AVX-512 before Cooper Lake,
    ...), where torch emulates bf16 GEMMs several times slower than fp32 ones."""
    found = set(_cpu_loops.cpu_flags())
    # Without /proc/cpuinfo (macOS, Windows), torch's own cpuinfo probes (private, so looked up;
    # every CPU with AMX tiles so far has AMX-BF16).
    for unit, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported")):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                found.add(unit)
        except RuntimeError:
            pass
    return tuple(u for u in _BF16_UNITS if u in found)


def cpu_gemm_dtype(dtype: torch.dtype, rows: int = 0) -> torch.dtype:
    """Operand dtype of the CPU twins' base GEMMs (x Wᵀ, dy W) for activations of `dtype` with
    `rows` rows (M).

    `PEFT_OPS_CPU_PRECISION` picks: `fp32` multiplies the weight, rounded to the activation dtype,
    in fp32 (exact products, fp32 sums: the Triton kernels' arithmetic); `bf16` runs bf16 GEMMs
    for bf16 activations (exact products, fp32 accumulation, the product rounded once to bf16
    before the LoRA / DoRA epilogue, which stays fp32: how PEFT + bitsandbytes compute on a CPU);
    `auto` (the default) is `bf16` on CPUs with bf16 units (`cpu_bf16_units()`), where those run
    several times faster than fp32, and for matrix-vector products (one row) on any CPU, where
    torch's bf16 kernel sums in fp32 too (so the result is the fp32 one, rounded) and reads half
    the bytes; `fp32` elsewhere. fp16 and fp32 activations always run fp32 GEMMs."""
    choice = os.environ.get("PEFT_OPS_CPU_PRECISION", "auto").strip().lower() or "auto"
    if choice not in CPU_PRECISIONS:
        raise ValueError(f"PEFT_OPS_CPU_PRECISION: expected one of {CPU_PRECISIONS}, got {choice!r}")
    if dtype != torch.bfloat16 or choice == "fp32":
        return torch.float32
    return torch.bfloat16 if choice == "bf16" or rows == 1 or cpu_bf16_units() else torch.float32


def _chunk_rows(weight, m: int) -> int:
    """Weight rows a twin takes at a time for an operand of `m` rows: a chunk of about
    `DECODE_CHUNK` elements stays in cache, and at least `m` rows, so that the GEMMs read the
    activations (m x K) no more often than they read the weight."""
    return max(1, _nf4.DECODE_CHUNK // weight.shape[1], m)


def _weight_rows(weight, dtype, gemm_dtype, step):
    """(row0, row1, W[row0:row1]) over the base weight, `step` rows at a time: W rounded to `dtype`
    (as the kernels and bitsandbytes round it), in `gemm_dtype`. An NF4 weight is decoded a chunk
    at a time, so no dense copy of the whole weight is made when it takes several."""
    N = weight.shape[0]
    absmax = None if isinstance(weight, torch.Tensor) else _nf4._decode_absmax(weight)
    for row0 in range(0, N, step):
        row1 = min(N, row0 + step)
        if absmax is not None:
            rows = _nf4.decode_rows(weight, row0, row1, absmax, dtype, gemm_dtype)
        else:
            rows = weight if row1 - row0 == N else weight[row0:row1]
            # (the dtype tests spare a decode-sized call the cost of a no-op `.to`)
            if rows.dtype != dtype:
                rows = rows.to(dtype)
        yield row0, row1, rows if rows.dtype == gemm_dtype else rows.to(gemm_dtype)


def _weight_products(operands, weight, dtype, gemm_dtype, step):
    """[v Wᵀ for v in operands] ([M, N] each, in `gemm_dtype`), W decoded once for all of them."""
    M, N = operands[0].shape[0], weight.shape[0]
    if step >= N:
        if isinstance(weight, torch.Tensor) and weight.dtype == dtype == gemm_dtype:
            w = weight   # (the common dense call, spared the generator: decode sizes feel it)
        else:
            w = next(_weight_rows(weight, dtype, gemm_dtype, N))[2]
        return [torch.nn.functional.linear(v, w) for v in operands]
    out = [operands[0].new_empty((M, N), dtype=gemm_dtype) for _ in operands]
    for row0, row1, w in _weight_rows(weight, dtype, gemm_dtype, step):
        for v, o in zip(operands, out):
            torch.mm(v, w.t(), out=o[:, row0:row1])
    return out


def _weight_transposed_products(operands, weight, dtype, gemm_dtype, step):
    """[v W for v in operands] ([M, K] each), W decoded once for all of them: fp32 sums over the
    weight's row chunks, or (a 16-bit GEMM, whose result is rounded) the whole weight at once."""
    if gemm_dtype != torch.float32:
        step = weight.shape[0]
    out = [None] * len(operands)
    for row0, row1, w in _weight_rows(weight, dtype, gemm_dtype, step):
        for i, v in enumerate(operands):
            part = v[:, row0:row1]
            out[i] = part @ w if out[i] is None else out[i].addmm_(part, w)
    return out


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

def lora_shrink(x, a, *, dropout=0.0, seed=0, write_xd=False):
    """xa = drop(x) aᵀ as fp32 [M, r]; with `write_xd` also keep ⊙ x (exact, x's dtype)."""
    if use_triton(x):
        return _lora.lora_shrink(x, a, dropout=dropout, seed=seed, write_xd=write_xd)
    if not dropout:
        return torch.nn.functional.linear(x.float(), a if a.dtype == torch.float32 else a.float())
    xk = torch.where(dropout_keep(seed, tuple(x.shape), dropout, x.device), x, 0)   # keep ⊙ x, exact
    xa = (xk.float() @ a.float().t()).mul_(1.0 / (1.0 - dropout))
    return (xa, xk) if write_xd else xa


def fused_linear(x, weight, xa, lora_B, scaling, *, bias=None, mn=None, xd=None, inv_keep=1.0,
                 save_z=False, lora_A=None, parts=False, mixed_shrink=None):
    """Forward GEMM with epilogue; returns y, or (y, z) with `save_z` (DoRA's pre-scale output).
    For DoRA with dropout, xd = keep ⊙ x and inv_keep = 1/(1-p). Given `lora_A` instead of xa
    (None), without dropout, the op forms xa = x Aᵀ itself and does not return it (the forward
    without grad; at decode sizes the split-K epilogue sums the shrink's K splits). With `parts`
    (a zero adapter: x Wᵀ alone, the mixed-adapter path's base), the decode GEMM, when it splits
    K, returns its fp32 parts [splits, M, N] for the consumer to sum, with no epilogue; with
    `mixed_shrink` as well ((table, idx, R, adapter dtype) of a mixed-adapter batch), it may form
    that batch's shrink in the same launch and return (x Wᵀ parts, xa parts) (see
    `kernels.decode.decode_linear`)."""
    if (xa is None) == (lora_A is None) or (lora_A is not None and xd is not None):
        raise ValueError("fused_linear: pass exactly one of xa and lora_A (lora_A only without xd)")
    if use_triton(x):
        kw = dict(bias=bias, mn=mn, xd=xd, inv_keep=inv_keep, save_z=save_z)
        budget = strategy.buffer_mib() << 20

        def xa_():   # a fresh shrink for each call that needs it (so timed candidates pay for it)
            return xa if lora_A is None else lora_shrink(x, lora_A)

        candidates = {
            "fused": lambda: _lora.fused_linear(x, weight, xa_(), lora_B, scaling, **kw),
            # the table-lookup decode: in the swapped GEMM up to 64 rows, in the TMA GEMM's loop above
            "fused_lut": lambda: _decode.decode_linear(x, weight, xa, lora_B, scaling, bias=bias, mn=mn,
                                                       save_z=save_z, lora_A=lora_A, parts=parts,
                                                       mixed_shrink=mixed_shrink)
            if x.shape[0] <= _decode.MAX_M
            else _gemm.gemm_forward(x, weight, xa_(), lora_B, scaling, backend="lut", **kw),
            "dequant_gemm": lambda: _gemm.gemm_forward(x, weight, xa_(), lora_B, scaling, buffer_bytes=budget,
                                                       **kw),
            "dequant_cublas": lambda: _gemm.gemm_forward(x, weight, xa_(), lora_B, scaling, buffer_bytes=budget,
                                                         backend="cublas", **kw),
        }
        if x.shape[0] > _decode.MAX_M:
            why_not_lut = _gemm.lut_eligible(weight) or strategy.why_not_decode_once("forward", x, weight)
        else:   # the swapped GEMM has no second accumulator (DoRA's dropout form)
            why_not_lut = "DoRA's dropout form" if xd is not None else _decode.eligible(x, weight)
        flags = dict(dora=mn is not None, second=xd is not None, bias=bias is not None, z=save_z,
                     shrink=lora_A is not None or mixed_shrink is not None, parts=parts)
        return candidates[strategy.choose("forward", x, weight, flags, candidates, why_not_lut)]()
    if lora_A is not None:
        xa = lora_shrink(x, lora_A)
    gemm = cpu_gemm_dtype(x.dtype, x.shape[0])
    operands = [x if x.dtype == gemm else x.to(gemm)] + ([] if xd is None else [xd.to(gemm)])
    acc, *acc_d = _weight_products(operands, weight, x.dtype, gemm, _chunk_rows(weight, x.shape[0]))
    b = lora_B if lora_B.dtype == torch.float32 else lora_B.float()
    if mn is None:
        # x Wᵀ + (bias + s·xa Bᵀ): the epilogue in fp32 and rounded once to x's dtype, written
        # straight from the (perhaps 16-bit) product (the fewest passes: they are most of the
        # time at decode sizes)
        if bias is None:
            lora, alpha = torch.nn.functional.linear(xa, b), scaling
        else:
            lora, alpha = torch.addmm(bias.float(), xa, b.t(), alpha=scaling), 1.0
        return torch.add(acc, lora, alpha=alpha, out=acc.new_empty(acc.shape, dtype=x.dtype))
    acc, acc_d, b = acc.float(), [a.float() for a in acc_d], b.t()
    if xd is None:
        z = acc.addmm_(xa, b, alpha=scaling)
        y = z * mn
    else:
        lora = (xa @ b).mul_(scaling)
        acc_d = acc_d[0].mul_(inv_keep)                         # drop(x) Wᵀ
        z = acc_d + lora if save_z else None
        y = acc.addcmul_(acc_d, mn - 1.0).addcmul_(lora, mn)
    if bias is not None:
        y = y.add_(bias)
    y = y.to(x.dtype)
    return (y, z.to(x.dtype)) if save_z else y


def fused_linear_dx(dy, weight, gb, lora_A, scaling, *, col_scale=None, second_scale=None,
                    dropout=0.0, seed=0, out_dtype=None):
    """dx = (dy ⊙ col_scale) W + D ⊙ (s·gb A + (dy ⊙ second_scale) W)."""
    out_dtype = out_dtype or dy.dtype
    if use_triton(dy):
        kw = dict(col_scale=col_scale, second_scale=second_scale, dropout=dropout, seed=seed, out_dtype=out_dtype)
        budget = strategy.buffer_mib() << 20
        candidates = {
            "fused": lambda: _lora.fused_linear_dx(dy, weight, gb, lora_A, scaling, **kw),
            # the TMA GEMM reads dy by 16-byte rows: an expanded or strided dy is copied once
            "dequant_gemm": lambda: _gemm.gemm_dx(dy.contiguous(), weight, gb, lora_A, scaling,
                                                  buffer_bytes=budget, **kw),
            "fused_lut": lambda: _gemm.gemm_dx(dy.contiguous(), weight, gb, lora_A, scaling, lut=True, **kw),
        }
        if dy.dtype != out_dtype:
            # the GEMMs read dy as dx's own 16-bit type
            del candidates["dequant_gemm"], candidates["fused_lut"]
        flags = dict(dora=col_scale is not None or second_scale is not None, second=second_scale is not None,
                     dropout=dropout > 0)
        why_not_lut = _gemm.lut_eligible(weight) or strategy.why_not_decode_once("dx", dy, weight)
        return candidates[strategy.choose("dx", dy, weight, flags, candidates, why_not_lut)]()
    gemm = cpu_gemm_dtype(out_dtype, dy.shape[0]) if dy.dtype == out_dtype else torch.float32
    operands = [dy.to(gemm) if col_scale is None else (dy.float() * col_scale).to(gemm)]
    if second_scale is not None:
        operands.append((dy.float() * second_scale).to(gemm))
    acc, *second = (a.float() for a in _weight_transposed_products(operands, weight, out_dtype, gemm,
                                                                   _chunk_rows(weight, dy.shape[0])))
    a = lora_A.float()
    if not dropout:
        return acc.add_(second[0]).addmm_(gb, a, alpha=scaling).to(out_dtype) if second else \
            acc.addmm_(gb, a, alpha=scaling).to(out_dtype)
    inner = second[0].addmm_(gb, a, alpha=scaling) if second else (gb @ a).mul_(scaling)
    keep = dropout_keep(seed, (dy.shape[0], lora_A.shape[1]), dropout, dy.device)
    return acc.addcmul_(inner, keep, value=1.0 / (1.0 - dropout)).to(out_dtype)   # + D ⊙ inner


def outer_reduce(lhs, rhs, *, dropout=0.0, seed=0, scale=1.0, factor=None):
    """scale · factor ⊙ Σ_m lhs[m]ᵀ (rhs[m] ⊙ D[m]) in fp32 (D: the dropout scale of rhs, when
    dropout > 0; `factor`: fp32 [P], one per output row, when given)."""
    if use_triton(lhs):
        return _lora.outer_reduce(lhs, rhs, dropout=dropout, seed=seed, scale=scale, factor=factor)
    if dropout:
        rhs = torch.where(dropout_keep(seed, tuple(rhs.shape), dropout, rhs.device), rhs, 0)
        scale = scale / (1.0 - dropout)
    out = lhs.float().t() @ rhs.float()
    if scale != 1.0:
        out.mul_(scale)
    return out if factor is None else out.mul_(factor.float()[:, None])


def row_norm(weight, lora_A, lora_B, scaling):
    """fp32 [N] ‖W + s·B A‖₂ per row (detached), streamed over the weight on the Triton path."""
    if use_triton(lora_A):
        return _dora.row_norm(weight, lora_A, lora_B, scaling)
    # PEFT's norm reads W in its original dtype; fp32 sums, a chunk of rows at a time
    b, a = lora_B.float(), lora_A.float()
    norm = torch.empty(weight.shape[0], dtype=torch.float32, device=a.device)
    for row0, row1, w in _weight_rows(weight, weight.dtype, torch.float32, _chunk_rows(weight, 1)):
        torch.linalg.vector_norm(torch.addmm(w, b[row0:row1], a, alpha=scaling), dim=1, out=norm[row0:row1])
    return norm


def column_dot(a, b):
    """fp32 [N]: Σ_i a_ij b_ij."""
    if use_triton(a):
        return _dora.column_dot(a, b)
    return (a.float() * b.float()).sum(0)
