"""The fused ops, each dispatched to its Triton launcher or to its plain-PyTorch twin.

Execution rule (SPEC §1): CUDA tensors run the Triton kernels; CPU tensors run the twin here,
unless TRITON_INTERPRET=1, in which case they run the Triton kernels in Triton's interpreter.
The twins compute the same math in the same precision (fp32 products and accumulation, the weight
rounded to the activation dtype first; fp32 GEMMs are also the fastest on CPUs without bf16
units) and draw the same dropout masks, so the
autograd Functions above them are backend-agnostic.
"""

import torch
import torch.nn.functional as F

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
# Dropout: Triton's Philox stream (tl.rand) reproduced in PyTorch
# ---------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


_CHUNK = 1 << 15   # elements per pass: the ten rounds' temporaries stay in cache


def _philox_rounds(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """First 32-bit output of Philox4x32-10 (Triton's `randint`) for int64 `offsets`, as int32.

    uint32 words are held in int64. An int64 product of two such words wraps modulo 2⁶⁴, which
    leaves exactly the 64 bits of the unsigned product: the high word is bits 32..63."""
    c0, c1 = offsets & _MASK32, (offsets >> 32) & _MASK32
    c2, c3 = torch.zeros_like(offsets), torch.zeros_like(offsets)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        prod_b = c2.mul_(_ROUND_B)        # c2 is not needed past this product
        prod_a = c0 * _ROUND_A
        c0 = (prod_b >> 32).bitwise_and_(_MASK32).bitwise_xor_(c1).bitwise_xor_(k0)
        c2 = (prod_a >> 32).bitwise_and_(_MASK32).bitwise_xor_(c3).bitwise_xor_(k1)
        c1, c3 = prod_b.bitwise_and_(_MASK32), prod_a.bitwise_and_(_MASK32)
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0.to(torch.int32)   # the low 32 bits, reinterpreted as signed


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """fp32 U[0, 1) equal bit for bit to `tl.rand(seed, offsets)` for int64 `offsets`."""
    flat = offsets.reshape(-1)
    x = torch.cat([_philox_rounds(seed, flat[i:i + _CHUNK]) for i in range(0, flat.numel(), _CHUNK)]
                  or [flat.new_empty(0, dtype=torch.int32)])
    x = torch.where(x < 0, ~x, x)
    u = x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=x.device)
    return u.reshape(offsets.shape)


def dropout_scale(seed: int, shape, p: float, device) -> torch.Tensor:
    """keep/(1-p) as fp32 for a LoRA input of `shape` (flattened to [M, K] row-major), exactly as
    the fused kernels draw it from `seed`. Tests and references use it; the kernels never
    materialise it."""
    device = torch.device(device)
    if device.type == "cuda" or _config.interpreting():
        return _dropout.dropout_scale_tensor(seed, tuple(shape), p, device)
    numel = 1
    for s in shape:
        numel *= s
    u = philox_uniform(seed, torch.arange(numel, dtype=torch.int64, device=device)).reshape(shape)
    keep = u >= torch.tensor(p, dtype=torch.float32)
    return keep.to(torch.float32) * torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

def dense_weight(weight, dtype):
    """Dense `dtype` [N, K] copy of a dense tensor or an NF4Weight (twins only: the kernels
    never make one)."""
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype)
    return weight.dequantize(dtype)


def lora_shrink(x, a, *, dropout=0.0, seed=0, write_xd=False):
    """xa = drop(x) aᵀ as fp32 [M, r]; with `write_xd` also keep ⊙ x (exact, x's dtype)."""
    if use_triton(x):
        return _lora.lora_shrink(x, a, dropout=dropout, seed=seed, write_xd=write_xd)
    xf = x.float()
    if dropout:
        d = dropout_scale(seed, x.shape, dropout, x.device)
        xk = torch.where(d > 0, x, torch.zeros((), dtype=x.dtype))
        xf = xf * d
    xa = xf @ a.float().t()
    return (xa, xk) if write_xd else xa


def fused_linear(x, weight, xa, lora_B, scaling, *, bias=None, mn=None, xd=None, inv_keep=1.0,
                 save_z=False):
    """Forward GEMM with epilogue; returns y, or (y, z) with `save_z` (DoRA's pre-scale output).
    For DoRA with dropout, xd = keep ⊙ x and inv_keep = 1/(1-p)."""
    if use_triton(x):
        kw = dict(bias=bias, mn=mn, xd=xd, inv_keep=inv_keep, save_z=save_z)
        budget = strategy.buffer_mib() << 20
        candidates = {
            "fused": lambda: _lora.fused_linear(x, weight, xa, lora_B, scaling, **kw),
            # the table-lookup decode: in the swapped GEMM up to 64 rows, in the TMA GEMM's loop above
            "fused_lut": lambda: _decode.decode_linear(x, weight, xa, lora_B, scaling, bias=bias, mn=mn,
                                                       save_z=save_z) if x.shape[0] <= _decode.MAX_M
            else _gemm.gemm_forward(x, weight, xa, lora_B, scaling, backend="lut", **kw),
            "dequant_gemm": lambda: _gemm.gemm_forward(x, weight, xa, lora_B, scaling, buffer_bytes=budget, **kw),
            "dequant_cublas": lambda: _gemm.gemm_forward(x, weight, xa, lora_B, scaling, buffer_bytes=budget,
                                                         backend="cublas", **kw),
        }
        if x.shape[0] > _decode.MAX_M:
            why_not_lut = _gemm.lut_eligible(weight) or strategy.why_not_decode_once("forward", x, weight)
        else:   # the swapped GEMM has no second accumulator (DoRA's dropout form)
            why_not_lut = "DoRA's dropout form" if xd is not None else _decode.eligible(x, weight)
        flags = dict(dora=mn is not None, second=xd is not None, bias=bias is not None, z=save_z)
        return candidates[strategy.choose("forward", x, weight, flags, candidates, why_not_lut)]()
    w = dense_weight(weight, x.dtype).float()
    acc = F.linear(x.float(), w)
    lora = (xa @ lora_B.float().t()) * scaling
    if mn is None:
        y = acc + lora
    elif xd is None:
        z = acc + lora
        y = mn * z
    else:
        acc_d = F.linear(xd.float(), w) * inv_keep
        z = acc_d + lora
        y = acc + (mn - 1.0) * acc_d + mn * lora
    if bias is not None:
        y = y + bias.float()
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
    w = dense_weight(weight, out_dtype).float()
    g = dy.float() if col_scale is None else dy.float() * col_scale
    acc = g @ w
    inner = (gb @ lora_A.float()) * scaling
    if second_scale is not None:
        inner = inner + (dy.float() * second_scale) @ w
    if dropout:
        M, K = dy.shape[0], lora_A.shape[1]
        inner = inner * dropout_scale(seed, (M, K), dropout, dy.device)
    return (acc + inner).to(out_dtype)


def outer_reduce(lhs, rhs, *, dropout=0.0, seed=0):
    """Σ_m lhs[m]ᵀ (rhs[m] ⊙ D[m]) in fp32 (D: the dropout scale of rhs, when dropout > 0)."""
    if use_triton(lhs):
        return _lora.outer_reduce(lhs, rhs, dropout=dropout, seed=seed)
    r = rhs.float()
    if dropout:
        r = r * dropout_scale(seed, rhs.shape, dropout, rhs.device)
    return lhs.float().t() @ r


def row_norm(weight, lora_A, lora_B, scaling):
    """fp32 [N] ‖W + s·B A‖₂ per row (detached), streamed over the weight on the Triton path."""
    if use_triton(lora_A):
        return _dora.row_norm(weight, lora_A, lora_B, scaling)
    dtype = weight.dtype
    w = dense_weight(weight, dtype).float()
    return torch.linalg.vector_norm(w + scaling * (lora_B.float() @ lora_A.float()), dim=1)


def column_dot(a, b):
    """fp32 [N]: Σ_i a_ij b_ij."""
    if use_triton(a):
        return _dora.column_dot(a, b)
    return (a.float() * b.float()).sum(0)
