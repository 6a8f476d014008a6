"""The fused ops as PyTorch custom operators (`torch.ops.peft_ops.*`), so torch.compile traces a
model with our layers as one graph: dynamo sees each op as an opaque call with a fake (meta)
implementation giving exact output shapes and dtypes, and the real call runs `peft_ops.ops`
(Triton on CUDA or under TRITON_INTERPRET=1, the PyTorch twin on CPU).

`torch.library.triton_op` would trace the Triton body instead, and then has no CPU twin under
compile (SPEC §6), so the ops are `custom_op`s with one implementation for every device.

Operands: a base weight enters as tensors plus plain numbers (`weight_operands`), never as the
`NF4Weight` object; a dropout seed enters as a 0-d int64 tensor (or None without dropout), read
inside the op, so drawing it costs the traced graph no `.item()`.
"""

import contextlib
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .nf4 import NF4Weight

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- the base weight as operands ----------------------------------------------------------------

def weight_operands(weight):
    """(tensors, meta, offset) for a dense [N, K] tensor or an NF4Weight.

    tensors: (w, absmax, nested_absmax, nested_code, offset_tensor, code), the NF4 fields None for a
    dense weight; meta: None (dense) or [N, K, blocksize, nested_blocksize, dtype index];
    offset: the double-quantization offset as a float (0.0 without)."""
    if isinstance(weight, Tensor):
        return (weight, None, None, None, None, None), None, 0.0
    N, K = weight.shape
    tensors = (weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code,
               weight.offset_tensor, weight.code)
    meta = [N, K, weight.blocksize, weight.nested_blocksize, _DTYPES.index(weight.dtype)]
    return tensors, meta, float(weight.offset or 0.0)


def _weight(w, absmax, nested_absmax, nested_code, offset_tensor, code, meta, offset):
    """Inverse of `weight_operands`: the tensor, or an NF4Weight around these tensors."""
    if meta is None:
        return w
    N, K, blocksize, nested_blocksize, dtype = meta
    return NF4Weight._wrap(w, absmax, (N, K), _DTYPES[dtype], blocksize, nested_absmax=nested_absmax,
                           nested_code=nested_code, offset=offset, offset_tensor=offset_tensor, code=code,
                           nested_blocksize=nested_blocksize)


def _seed(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


def _exact(t: Tensor):
    """Autocast off: an op computes in its own precision even when backward runs inside an
    autocast region (the twins' fp32 matmuls would otherwise drop to bf16)."""
    # meta tensors (shape-only runs, as the bench's static model makes) have no autocast
    if t.device.type != "meta" and torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


# --- the ops ------------------------------------------------------------------------------------
# Each `_<name>` is the implementation of the op `peft_ops::<name>` registered after it. Each
# returns fresh, contiguous tensors (what its fake says): inductor plans around the fake's strides,
# and a custom op may not return an alias of an input.

def _lora_shrink(x: Tensor, a: Tensor, dropout: float, seed: Optional[Tensor],
                 write_xd: bool) -> list[Tensor]:
    """[drop(x) aᵀ (fp32 [M, r])] and, with `write_xd`, keep ⊙ x (x's dtype)."""
    with _exact(x):
        out = ops.lora_shrink(x, a, dropout=dropout, seed=_seed(seed), write_xd=write_xd)
    return [t.contiguous() for t in (out if write_xd else (out,))]


lora_shrink_op = torch.library.custom_op("peft_ops::lora_shrink", _lora_shrink, mutates_args=())


@lora_shrink_op.register_fake
def _(x, a, dropout, seed, write_xd):
    xa = x.new_empty((x.shape[0], a.shape[0]), dtype=torch.float32)
    return [xa, x.new_empty(x.shape)] if write_xd else [xa]


def _fused_linear(x: Tensor, w: Tensor, absmax: Optional[Tensor], nested_absmax: Optional[Tensor],
                 nested_code: Optional[Tensor], offset_tensor: Optional[Tensor], code: Optional[Tensor],
                 meta: Optional[Sequence[int]], offset: float,
                 xa: Tensor, lora_B: Tensor, scaling: float, bias: Optional[Tensor], mn: Optional[Tensor],
                 xd: Optional[Tensor], inv_keep: float, save_z: bool, lead: Sequence[int]) -> list[Tensor]:
    """[y] or [y, z] of `ops.fused_linear`; y shaped [*lead, N] (x's leading dimensions)."""
    weight = _weight(w, absmax, nested_absmax, nested_code, offset_tensor, code, meta, offset)
    with _exact(x):
        out = ops.fused_linear(x, weight, xa, lora_B, scaling, bias=bias, mn=mn, xd=xd, inv_keep=inv_keep,
                               save_z=save_z)
    y, *z = [t.contiguous() for t in (out if save_z else (out,))]
    # A fresh tensor, not a view of the [M, N] result: FSDP2 hooks a module's output, and an
    # in-place op on a view output would drop that hook.
    return [y.view(*lead, y.shape[1]).detach(), *z]


fused_linear_op = torch.library.custom_op("peft_ops::fused_linear", _fused_linear, mutates_args=())


@fused_linear_op.register_fake
def _(x, w, absmax, nested_absmax, nested_code, offset_tensor, code, meta, offset,
      xa, lora_B, scaling, bias, mn, xd, inv_keep, save_z, lead):
    y = x.new_empty((*lead, lora_B.shape[0]))
    return [y, x.new_empty((x.shape[0], lora_B.shape[0]))] if save_z else [y]


def _fused_linear_dx(dy: Tensor, w: Tensor, absmax: Optional[Tensor], nested_absmax: Optional[Tensor],
                    nested_code: Optional[Tensor], offset_tensor: Optional[Tensor], code: Optional[Tensor],
                    meta: Optional[Sequence[int]], offset: float,
                    gb: Tensor, lora_A: Tensor, scaling: float, col_scale: Optional[Tensor],
                    second_scale: Optional[Tensor], dropout: float, seed: Optional[Tensor],
                    out_dtype: torch.dtype) -> Tensor:
    """dx of `ops.fused_linear_dx`."""
    weight = _weight(w, absmax, nested_absmax, nested_code, offset_tensor, code, meta, offset)
    with _exact(dy):
        return ops.fused_linear_dx(dy, weight, gb, lora_A, scaling, col_scale=col_scale,
                                   second_scale=second_scale, dropout=dropout, seed=_seed(seed),
                                   out_dtype=out_dtype).contiguous()


fused_linear_dx_op = torch.library.custom_op("peft_ops::fused_linear_dx", _fused_linear_dx, mutates_args=())


@fused_linear_dx_op.register_fake
def _(dy, w, absmax, nested_absmax, nested_code, offset_tensor, code, meta, offset,
      gb, lora_A, scaling, col_scale, second_scale, dropout, seed, out_dtype):
    return dy.new_empty((dy.shape[0], lora_A.shape[1]), dtype=out_dtype)


def _outer_reduce(lhs: Tensor, rhs: Tensor, dropout: float, seed: Optional[Tensor], scale: float,
                  factor: Optional[Tensor]) -> Tensor:
    """fp32 scale · factor ⊙ Σ_m lhs[m]ᵀ (rhs[m] ⊙ D[m])."""
    with _exact(lhs):
        return ops.outer_reduce(lhs, rhs, dropout=dropout, seed=_seed(seed), scale=scale,
                                factor=factor).contiguous()


outer_reduce_op = torch.library.custom_op("peft_ops::outer_reduce", _outer_reduce, mutates_args=())


@outer_reduce_op.register_fake
def _(lhs, rhs, dropout, seed, scale, factor):
    return lhs.new_empty((lhs.shape[1], rhs.shape[1]), dtype=torch.float32)


def _row_norm(w: Tensor, absmax: Optional[Tensor], nested_absmax: Optional[Tensor],
             nested_code: Optional[Tensor], offset_tensor: Optional[Tensor], code: Optional[Tensor],
             meta: Optional[Sequence[int]], offset: float,
             lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """fp32 [N] ‖W + s·B A‖₂ per row."""
    weight = _weight(w, absmax, nested_absmax, nested_code, offset_tensor, code, meta, offset)
    with _exact(lora_A):
        return ops.row_norm(weight, lora_A, lora_B, scaling).contiguous()


row_norm_op = torch.library.custom_op("peft_ops::row_norm", _row_norm, mutates_args=())


@row_norm_op.register_fake
def _(w, absmax, nested_absmax, nested_code, offset_tensor, code, meta, offset, lora_A, lora_B, scaling):
    return lora_A.new_empty((lora_B.shape[0],), dtype=torch.float32)


def _column_dot(a: Tensor, b: Tensor) -> Tensor:
    """fp32 [N]: Σ_i a_ij b_ij."""
    with _exact(a):
        return ops.column_dot(a, b).contiguous()


column_dot_op = torch.library.custom_op("peft_ops::column_dot", _column_dot, mutates_args=())


@column_dot_op.register_fake
def _(a, b):
    return a.new_empty((a.shape[1],), dtype=torch.float32)


# --- calling conventions of `peft_ops.ops`, over the registered ops ------------------------------
# The autograd Functions call these: the same keywords as `ops`, the weight as `WeightOperands`.

_IMPLS = {"lora_shrink": _lora_shrink, "fused_linear": _fused_linear, "fused_linear_dx": _fused_linear_dx,
          "outer_reduce": _outer_reduce, "row_norm": _row_norm, "column_dot": _column_dot}
_PLAIN = (Tensor, torch.nn.Parameter)


class WeightOperands(NamedTuple):
    """A base weight as op operands (see `weight_operands`)."""
    tensors: tuple
    meta: Optional[list]
    offset: float


def operands(weight) -> WeightOperands:
    return WeightOperands(*weight_operands(weight))


def plain_eager(*args) -> bool:
    """True outside tracing (torch.compile, export) when every tensor among `args` is a plain
    tensor or Parameter (no fake, functional or DTensor subclass): the ops' implementations may
    then run directly."""
    return not torch.compiler.is_compiling() and all(type(t) in _PLAIN for t in args if isinstance(t, Tensor))


def _call(name, *args):
    """Run op `name`: through the dispatcher when traced or given tensor subclasses, else its
    implementation directly, sparing plain eager calls the dispatcher's tens of microseconds
    (they matter at decode sizes)."""
    if not plain_eager(*args):
        return getattr(torch.ops.peft_ops, name)(*args)
    return _IMPLS[name](*args)


def lora_inference(x, weight, lora_A, lora_B, scaling, bias=None, mn=None) -> Tensor:
    """LoRA's (with `mn` = m/n, DoRA's) forward for plain eager tensors without grad or dropout:
    the ops themselves, spared the autograd Function and the op layer around them (each adds
    tens of microseconds a call on a CPU at decode sizes). xa is not kept, so the forward op
    forms it: on a GPU at decode sizes the decode's split-K epilogue sums the shrink's K splits
    itself (in order, sparing a launch; the sum can round differently from the training path's),
    elsewhere the same ops, bit for bit. y is [M, N]."""
    with _exact(x):
        return ops.fused_linear(x, weight, None, lora_B, scaling, bias=bias, mn=mn, lora_A=lora_A)


def seed_operand(seed, p):
    """The dropout seed as an op operand: None without dropout, else a 0-d int64 tensor."""
    if not p:
        return None
    return seed if isinstance(seed, Tensor) else torch.tensor(seed, dtype=torch.int64)


def lora_shrink(x, a, *, dropout=0.0, seed=None, write_xd=False):
    out = _call("lora_shrink", x, a, dropout, seed, write_xd)
    return (out[0], out[1]) if write_xd else out[0]


def fused_linear(x, weight: WeightOperands, xa, lora_B, scaling, *, bias=None, mn=None, xd=None, inv_keep=1.0,
                 save_z=False, lead=None):
    """`ops.fused_linear`; y comes shaped [*lead, N] (default [M, N]), z [M, N]."""
    lead = (x.shape[0],) if lead is None else lead
    out = _call("fused_linear", x, *weight.tensors, weight.meta, weight.offset, xa, lora_B, scaling, bias, mn,
                xd, inv_keep, save_z, lead)
    return (out[0], out[1]) if save_z else out[0]


def fused_linear_dx(dy, weight: WeightOperands, gb, lora_A, scaling, *, col_scale=None, second_scale=None,
                    dropout=0.0, seed=None, out_dtype=None):
    return _call("fused_linear_dx", dy, *weight.tensors, weight.meta, weight.offset, gb, lora_A, scaling,
                 col_scale, second_scale, dropout, seed, out_dtype or dy.dtype)


def outer_reduce(lhs, rhs, *, dropout=0.0, seed=None, scale=1.0, factor=None):
    return _call("outer_reduce", lhs, rhs, dropout, seed, float(scale), factor)


def row_norm(weight: WeightOperands, lora_A, lora_B, scaling):
    return _call("row_norm", *weight.tensors, weight.meta, weight.offset, lora_A, lora_B, scaling)


def column_dot(a, b):
    return _call("column_dot", a, b)
