"""`lora_linear`: the fused (Q)LoRA / (Q)DoRA linear as a differentiable function.

Two autograd Functions, one per layer kind, each reading as the math of SPEC §3 with one line per
kernel call. Each call is a registered custom op (`peft_ops._library`, so torch.compile traces the
Functions without graph breaks) running `peft_ops.ops`, which dispatches it to Triton or to its
PyTorch twin. What backward
needs goes through `ctx.save_for_backward`: x, xa = drop(x) Aᵀ (M×r, fp32), for DoRA the row norm
(N floats) and, when the magnitude trains, z (M×N, DoRA's pre-scale output); the frozen weight is
saved as the tensors it already is. Never a dropout mask (regenerated from a seed) and never a
dense copy of W.

Without grad (eval, `torch.no_grad`, `generate`) DoRA's row norm can come from a `DoraNormCache`:
n (and m/n), N floats an adapter, kept while what they depend on is unchanged, so a decode step
of QDoRA launches what QLoRA's does. With grad enabled n is always computed afresh.
"""

import itertools
import numbers
import warnings

import torch

from . import _library as lib
from .reference.lora import DORA_EPS


def _save(ctx, seed, *tensors):
    """ctx.save_for_backward(*tensors), plus the seed when it is a tensor (drawn under
    torch.compile); an int seed stays a plain ctx attribute."""
    if isinstance(seed, torch.Tensor):
        ctx.save_for_backward(*tensors, seed)
        ctx.seed = None
    else:
        ctx.save_for_backward(*tensors)
        ctx.seed = seed


def _saved(ctx):
    """(saved tensors, seed operand) as `_save` stored them."""
    saved = ctx.saved_tensors
    if ctx.seed is None:
        return saved[:-1], lib.seed_operand(saved[-1], ctx.p)
    return saved, lib.seed_operand(ctx.seed, ctx.p)


class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + bias + s·(drop(x) Aᵀ) Bᵀ for x [M, K]; y comes out [*lead, N]."""

    @staticmethod
    def forward(ctx, x, lead, lora_A, lora_B, bias, scaling, p, seed, meta, offset, *weight_tensors):
        weight = lib.WeightOperands(weight_tensors, meta, offset)
        seed_t = lib.seed_operand(seed, p)
        xa = lib.lora_shrink(x, lora_A, dropout=p, seed=seed_t)                   # drop(x) Aᵀ
        y = lib.fused_linear(x, weight, xa, lora_B, scaling, bias=bias, lead=lead)  # x Wᵀ + s·xa Bᵀ + b
        _save(ctx, seed, x, xa, lora_A, lora_B, *weight_tensors)
        ctx.scaling, ctx.p, ctx.meta, ctx.offset = scaling, p, meta, offset
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        (x, xa, lora_A, lora_B, *weight_tensors), seed = _saved(ctx)
        weight = lib.WeightOperands(tuple(weight_tensors), ctx.meta, ctx.offset)
        s, p = ctx.scaling, ctx.p
        dy = dy.reshape(-1, dy.shape[-1])                                          # [*lead, N] -> [M, N]
        need_x, _, need_A, need_B, need_bias = ctx.needs_input_grad[:5]
        dx = dA = dB = dbias = None
        if need_x or need_A:
            gb = lib.lora_shrink(dy, lora_B.t())                                   # dy B
        if need_x:
            dx = lib.fused_linear_dx(dy, weight, gb, lora_A, s, dropout=p, seed=seed,
                                     out_dtype=x.dtype)                            # dy W + s·D⊙(gb A)
        if need_A:
            dA = lib.outer_reduce(gb, x, dropout=p, seed=seed, scale=s).to(lora_A.dtype)  # s·gbᵀ drop(x)
        if need_B:
            dB = lib.outer_reduce(dy, xa, scale=s).to(lora_B.dtype)                  # s·dyᵀ xa
        if need_bias:
            dbias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return (dx, None, dA, dB, dbias, None, None, None, None, None) + (None,) * len(weight_tensors)


def _dora_scale(weight, lora_A, lora_B, scaling, magnitude, norm=None, mn=None):
    """(n, m/n) of DoRA's forward: n = ‖W + s·B A‖ clamped at DORA_EPS (one pass over W), unless
    the caller keeps it (a `DoraNormCache`, without grad), and the row scale m/n in fp32."""
    if norm is None:
        norm = lib.row_norm(weight, lora_A, lora_B, scaling).clamp_min(DORA_EPS)
    if mn is None:
        mn = magnitude.float() / norm
    return norm, mn


class DoraLinearFunction(torch.autograd.Function):
    """DoRA with PEFT's semantics; n = ‖W + s·B A‖ is a constant in backward (SPEC §3)."""

    @staticmethod
    def forward(ctx, x, lead, lora_A, lora_B, magnitude, bias, scaling, p, seed, meta, offset, norm, mn,
                *weight_tensors):
        weight = lib.WeightOperands(weight_tensors, meta, offset)
        seed_t = lib.seed_operand(seed, p)
        norm, mn = _dora_scale(weight, lora_A, lora_B, scaling, magnitude, norm, mn)   # n and m/n
        save_z = ctx.needs_input_grad[4]
        if p:
            xa, xd = lib.lora_shrink(x, lora_A, dropout=p, seed=seed_t, write_xd=True)  # drop(x) Aᵀ, keep⊙x
        else:
            xa, xd = lib.lora_shrink(x, lora_A), None                                 # x Aᵀ
        out = lib.fused_linear(x, weight, xa, lora_B, scaling, bias=bias, mn=mn, xd=xd,
                               inv_keep=1.0 / (1.0 - p), save_z=save_z, lead=lead)   # y (and z)
        y, z = out if save_z else (out, None)
        _save(ctx, seed, x, xa, lora_A, lora_B, magnitude, norm, z, *weight_tensors)
        ctx.scaling, ctx.p, ctx.meta, ctx.offset = scaling, p, meta, offset
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        (x, xa, lora_A, lora_B, magnitude, norm, z, *weight_tensors), seed = _saved(ctx)
        weight = lib.WeightOperands(tuple(weight_tensors), ctx.meta, ctx.offset)
        s, p = ctx.scaling, ctx.p
        dy = dy.reshape(-1, dy.shape[-1])                                          # [*lead, N] -> [M, N]
        need_x, _, need_A, need_B, need_m, need_bias = ctx.needs_input_grad[:6]
        mn = magnitude.float() / norm
        dx = dA = dB = dm = dbias = None
        if need_x or need_A:
            gb = lib.lora_shrink(dy, (lora_B.float() * mn[:, None]).t())           # (dy⊙m/n) B
        if need_x:
            if p:   # dx = dy W + D ⊙ (((m/n − 1)⊙dy) W + s·gb A)
                dx = lib.fused_linear_dx(dy, weight, gb, lora_A, s, second_scale=mn - 1.0,
                                         dropout=p, seed=seed, out_dtype=x.dtype)
            else:   # dx = (dy⊙m/n) W + s·gb A
                dx = lib.fused_linear_dx(dy, weight, gb, lora_A, s, col_scale=mn, out_dtype=x.dtype)
        if need_A:
            dA = lib.outer_reduce(gb, x, dropout=p, seed=seed, scale=s).to(lora_A.dtype)  # s·gbᵀ drop(x)
        if need_B:
            dB = lib.outer_reduce(dy, xa, scale=s, factor=mn).to(lora_B.dtype)      # s·(m/n)⊙dyᵀ xa
        if need_m:
            dm = (lib.column_dot(dy, z) / norm).to(magnitude.dtype)                 # Σ_i dy z / n
        if need_bias:
            dbias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return (dx, None, dA, dB, dm, dbias, None, None, None, None, None, None, None) + (None,) * len(weight_tensors)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_x_and_weight(x, weight, op="lora_linear"):
    """The checks of x and the base weight that `lora_linear` and `lora_linear_multi` (`op`, named
    in the messages) share; returns the weight's device (compared with x's by the caller)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x: expected float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected shape [..., K], got a 0-d tensor")
    if isinstance(weight, torch.Tensor):
        if weight.dim() != 2:
            raise ValueError(f"weight: expected a 2-D [N, K] tensor, got shape {tuple(weight.shape)}")
        if weight.dtype != x.dtype:
            raise TypeError(f"weight: dense weight dtype {weight.dtype} must equal x's dtype {x.dtype} "
                            "(quantize it to an NF4Weight to mix dtypes)")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"weight: the base weight is frozen in {op} (it gets no gradient), but "
                             "it requires grad; call weight.requires_grad_(False) or train it elsewhere")
        w_device = weight.device
    elif all(hasattr(weight, a) for a in ("packed", "shape", "blocksize", "dequantize")):
        w_device = weight.packed.device
    else:
        raise TypeError(f"weight: expected a dense [N, K] tensor or an NF4Weight, got {type(weight).__name__}")
    N, K = weight.shape
    if K == 0:
        raise ValueError(f"weight: expected in_features K >= 1, got shape {tuple(weight.shape)}")
    if x.shape[-1] != K:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match weight's in_features {K}")
    return w_device


def _check(x, weight, lora_A, lora_B, scaling, bias, magnitude, dropout, seed):
    w_device = _check_x_and_weight(x, weight)
    N, K = weight.shape
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name}: expected a float tensor, got {t.dtype}")
    r = lora_A.shape[0]
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A: expected shape [r, {K}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B: expected shape [{N}, {r}] (out_features, r of lora_A), "
                         f"got {tuple(lora_B.shape)}")
    for name, t in (("bias", bias), ("magnitude", magnitude)):
        if t is not None:
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (N,):
                raise ValueError(f"{name}: expected a tensor of shape [{N}]")
            if t.dtype not in _FLOATS:
                raise TypeError(f"{name}: expected a float tensor, got {t.dtype}")
    x_device = x.device
    for name, t in (("weight", None), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias),
                    ("magnitude", magnitude)):
        dev = w_device if name == "weight" else (None if t is None else t.device)
        if dev is not None and dev != x_device:
            raise ValueError(f"{name}: on {dev}, but x is on {x_device}")
    if type(scaling) in _NUMBERS and type(dropout) in _NUMBERS and 0.0 <= dropout < 1.0 \
            and (seed is None or type(seed) is int and _SEED_MIN <= seed <= _SEED_MAX):
        return   # the common call, checked without the general (slower) tests below
    if isinstance(scaling, torch.Tensor):
        if scaling.dim() != 0 or not scaling.dtype.is_floating_point:
            raise TypeError(f"scaling: expected a Python number or a 0-d float tensor, got a {scaling.dtype} "
                            f"tensor of shape {tuple(scaling.shape)}")
        if scaling.device != x.device and scaling.device.type != "cpu":
            raise ValueError(f"scaling: on {scaling.device}, but x is on {x.device}")
    elif isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling: expected a Python number or a 0-d float tensor, got {type(scaling).__name__}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"dropout: expected a probability in [0, 1), got {type(dropout).__name__}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
    _check_seed(seed)


_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1   # what an int64 seed operand holds
_NUMBERS = (float, int)                       # exact types (bool is not one)


def _check_seed(seed):
    if seed is None:
        return
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"seed: expected an int or a 0-d integer tensor, got a {seed.dtype} tensor of shape "
                            f"{tuple(seed.shape)}")
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int or a 0-d integer tensor, got {type(seed).__name__} {seed!r}")
    if not _SEED_MIN <= seed <= _SEED_MAX:
        raise ValueError(f"seed: expected an int64 value (-2**63 to 2**63 - 1), got {seed}")


def _draw_seed():
    """A dropout seed from torch's default generator. Under torch.compile it stays a 0-d tensor
    (read inside the ops; `.item()` would break the graph); eagerly it is an int, kept on ctx
    rather than saved for backward."""
    seed = torch.randint(0, 2**31 - 1, ())
    return seed if torch.compiler.is_compiling() else int(seed.item())


def lora_linear(x, weight, lora_A, lora_B, scaling, *, bias=None, magnitude=None, dropout=0.0,
                training=False, seed=None, norm_cache=None):
    """Fused LoRA / DoRA linear layer with autograd.

    Computes ``x Wᵀ + bias + scaling · (drop(x) Aᵀ) Bᵀ`` (LoRA), or with ``magnitude`` PEFT's
    DoRA: ``(m/n) ⊙ (x Wᵀ + scaling · (x Aᵀ) Bᵀ) + bias`` with ``n = ‖W + scaling · B A‖₂`` per
    output row, held constant in backward (with dropout in training the base term is recomputed on
    the dropped input, as PEFT does). Rows with ``n = 0`` divide by ``reference.DORA_EPS``.

    Args:
        x: activations ``[..., K]``, float32 / float16 / bfloat16.
        weight: frozen base weight, a dense ``[N, K]`` tensor of x's dtype or an ``NF4Weight``
            (decoded in registers, never materialised; rounded to x's dtype as bitsandbytes does).
        lora_A: ``[r, K]``; lora_B: ``[N, r]``; in x's dtype or float32 (PEFT's default).
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA): a number, or a 0-d
            float tensor (as PEFT's ``prepare_model_for_compiled_hotswap`` stores it), read as a
            tensor operand so a compiled graph neither breaks on it nor recompiles when it changes.
        bias: optional ``[N]``. magnitude: optional DoRA magnitude ``[N]``.
        dropout: LoRA-input dropout probability, applied only when ``training``.
        seed: dropout seed (an int, or a 0-d integer tensor); drawn from torch's default
            generator when None. The mask is a function of (seed, element index) only:
            `peft_ops.ops.dropout_scale` reproduces it.
        norm_cache: a `DoraNormCache` for this adapter and base (DoRA only). Without grad the row
            norm and m/n come from it, recomputed only when the weight, A, B, the scaling or the
            magnitude changed; with grad enabled (training) it is not read and n is computed as
            always.

    Returns:
        ``[..., N]`` in x's dtype. Gradients flow to x, lora_A, lora_B, magnitude and bias
        (each in its own dtype); the base weight is frozen.
    """
    _check(x, weight, lora_A, lora_B, scaling, bias, magnitude, dropout, seed)
    if norm_cache is not None and not isinstance(norm_cache, DoraNormCache):
        raise TypeError(f"norm_cache: expected a peft_ops.DoraNormCache, got {type(norm_cache).__name__}")
    N, K = weight.shape
    p = float(dropout) if training else 0.0
    if not p:
        seed = 0
    elif seed is None:
        seed = _draw_seed()
    elif not isinstance(seed, torch.Tensor):
        seed = int(seed)
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    if x2.shape[0] == 0:
        # Nothing to compute, but every input stays in the graph (with zero gradients), so an
        # empty batch (an expert with no tokens) neither breaks backward nor leaves DDP an
        # unused parameter.
        inputs = [t for t in (x2, lora_A, lora_B, magnitude, bias) if t is not None]
        anchor = sum(t.sum() for t in inputs) * 0
        y = x.new_zeros(*x.shape[:-1], N) + anchor.to(x.dtype)
        return y if bias is None else y + bias.to(x.dtype)
    if bias is not None:
        bias = bias.contiguous()   # the epilogue reads it with unit stride (N elements)
    norm = mn = None
    if magnitude is not None and norm_cache is not None and cached_norms_allowed():
        norm, mn = norm_cache.get(weight, lora_A, lora_B, scaling, magnitude)
    if isinstance(scaling, torch.Tensor):
        # s·(xa Bᵀ) = xa (s·B)ᵀ, and ‖W + s·B A‖ is the same with s folded into B. The ops take s
        # as a float, which a tensor only becomes through `.item()`: a graph break under
        # torch.compile, and a recompile whenever a hot-swap changes it. s·B ([N, r], kept for
        # backward in B's place) is formed in fp32 so that no rounding to a 16-bit B is added;
        # autograd carries its gradient back to lora_B (and to scaling, should it require grad).
        lora_B, scaling = lora_B.float() * scaling, 1.0
    tensors, meta, offset = lib.weight_operands(weight)
    lead = tuple(x.shape[:-1])   # y comes out [*lead, N], its own tensor (not a view of [M, N])
    if not p and not torch.is_grad_enabled() and lib.plain_eager(x2, lora_A, lora_B, bias, magnitude, norm, mn,
                                                                 *tensors):
        if magnitude is not None:   # m/n as DoraLinearFunction.forward forms it
            mn = _dora_scale(lib.WeightOperands(tensors, meta, offset), lora_A, lora_B, float(scaling), magnitude,
                             norm, mn)[1]
        y = lib.lora_inference(x2, weight, lora_A, lora_B, float(scaling), bias=bias, mn=mn)
        # y is fresh and contiguous, without grad; reshaped, it is still its own tensor (not a view)
        return y if x.dim() == 2 else y.view(*lead, N).detach()
    if magnitude is None:
        return LoraLinearFunction.apply(x2, lead, lora_A, lora_B, bias, float(scaling), p, seed, meta, offset,
                                        *tensors)
    return DoraLinearFunction.apply(x2, lead, lora_A, lora_B, magnitude, bias, float(scaling), p, seed, meta,
                                    offset, norm, mn, *tensors)


def dora_row_norm(weight, lora_A, lora_B, scaling):
    """fp32 ``[N]``: ‖W + scaling · B A‖₂ per output row, detached (one streamed pass over W).

    Use it to initialise a DoRA magnitude (``m = dora_row_norm(W, A, B, s)``) or to merge."""
    with torch.no_grad():
        return lib.row_norm(lib.operands(weight), lora_A, lora_B, float(scaling))


# --- DoRA's row norm, kept between calls without grad -------------------------------------------

_warned = set()


def warn_once(message, stacklevel=3):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=stacklevel)


def cached_norms_allowed() -> bool:
    """Caches are read only without grad and outside torch.compile: a training step always
    computes the norm afresh (it is cheap beside the step, and nothing stale can reach a gradient)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


_stamps = itertools.count()


def _stamp(t):
    """A mark of the tensor object itself, set on first use. A cache compares it with `id(t)`:
    a new tensor that happens to reuse a freed one's id (and memory, and version) has no mark or
    another one. Neither a weak reference (which `torch.utils.swap_tensors`, used by
    `Module._apply` for tensor subclasses, refuses) nor a strong one (which would keep a replaced
    weight alive) is held."""
    stamp = t.__dict__.get("_peft_ops_stamp")
    if stamp is None:
        stamp = t.__dict__["_peft_ops_stamp"] = next(_stamps)
    return stamp


def tensor_key(t):
    """What a value computed from tensor `t` depends on: the tensor (a view through its base, so a
    fresh `.t()` of the same weight matches), its version counter (bumped by every in-place change
    except writes through `.data`), where its data is, its shape, strides, dtype and device.
    Raises RuntimeError for an inference tensor (it has no version counter)."""
    base = t if t._base is None else t._base
    return (id(base), _stamp(base), base._version, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype,
            t.device)


def weight_key(weight):
    """`tensor_key` of a dense weight, or of every tensor of an NF4Weight plus its layout."""
    if isinstance(weight, torch.Tensor):
        return (tensor_key(weight),)
    tensors = (weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.code)
    return tuple(None if t is None else tensor_key(t) for t in tensors) + (
        tuple(weight.shape), weight.dtype, weight.blocksize, weight.nested_blocksize, weight.offset)


def scaling_key(scaling):
    return ("tensor", tensor_key(scaling)) if isinstance(scaling, torch.Tensor) else ("number", float(scaling))


class EmptyOnCopy:
    """A cache that a copy (deepcopy, pickle) of the module holding it starts empty: what it keeps
    is derived from tensors the copy has its own of. Subclasses define `clear()`."""

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.clear()

    def __deepcopy__(self, memo):
        return type(self)()


class DoraNormCache(EmptyOnCopy):
    """DoRA's row norm n = ‖W + s·B A‖ (clamped at `reference.DORA_EPS`) and m/n of one adapter
    over one base weight, kept between calls without grad.

    Each is keyed on what it depends on: the base weight's tensors (identity, version counter,
    storage), A, B and the scaling for n, and the magnitude as well for m/n; a change to any of
    them (an optimizer step, `load_state_dict`, `.to()`, a merge that requantizes, a new adapter
    under the same name) recomputes it on the next call. It holds 2N floats, never a weight, and no
    reference to the tensors it was computed from. Writes through `.data` (PEFT's
    `hotswap_adapter` makes them) bypass version counters: call `clear()` after them.

    `peft_ops.lora_linear(..., norm_cache=c)` reads it only without grad; `LoraLinear` and the
    layers `from_peft` converts keep one per adapter.
    """

    def __init__(self):
        self.clear()

    def clear(self):
        """Forget the cached values (they are recomputed on the next call without grad)."""
        self._norm_key = self._mn_key = None
        self._norm = self._mn = None

    def get(self, weight, lora_A, lora_B, scaling, magnitude):
        """(n, m/n), fp32 [N] each, from the cache or computed now (detached)."""
        try:
            key = (weight_key(weight), tensor_key(lora_A), tensor_key(lora_B), scaling_key(scaling))
            mn_key = (key, tensor_key(magnitude))
        except RuntimeError:   # inference tensors have no version counter: nothing to key on
            warn_once("peft_ops: DoRA row norm recomputed on every call: the adapter or base tensors are "
                      "inference tensors (created under torch.inference_mode), which have no version counter "
                      "to key a cache on; create them outside inference_mode to cache the norm")
            norm = dora_norm(weight, lora_A, lora_B, scaling)
            return norm, magnitude.detach().float() / norm
        if key != self._norm_key:
            self._norm, self._norm_key, self._mn_key = dora_norm(weight, lora_A, lora_B, scaling), key, None
        if mn_key != self._mn_key:
            self._mn, self._mn_key = magnitude.detach().float() / self._norm, mn_key
        return self._norm, self._mn


def dora_norm(weight, lora_A, lora_B, scaling):
    """fp32 [N] max(‖W + s·B A‖, DORA_EPS), detached; a tensor scaling is folded into B as
    `lora_linear` does."""
    with torch.no_grad():
        if isinstance(scaling, torch.Tensor):
            lora_B, scaling = lora_B.float() * scaling, 1.0
        return lib.row_norm(lib.operands(weight), lora_A, lora_B, float(scaling)).clamp_min(DORA_EPS)
