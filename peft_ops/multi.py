"""`lora_linear_multi`: one fused call for a batch whose rows use different adapters (LoRA and DoRA,
NF4 or dense base, ranks that differ), forward and backward.

Row m of x uses adapter idx[m] of E adapters (-1: the base layer alone, PEFT's "__base__"):

    LoRA  y[m] = x[m] Wᵀ + bias + s_a·(drop(x[m]) A_aᵀ) B_aᵀ
    DoRA  y[m] = (m_a/n_a) ⊙ (x[m] Wᵀ + s_a·(x[m] A_aᵀ) B_aᵀ) + bias      (with dropout as SPEC §3)

which is what PEFT's `adapter_names=` batch computes by running one sub-batch per adapter.
Gradients reach each adapter from its own rows only.

Layers, as for the single-adapter op: the ops here (`shrink`, `linear`, `linear_dx`,
`outer_reduce`, `column_dot`) dispatch to the Triton launchers of `kernels/multi_lora.py` (CUDA, or
any device under TRITON_INTERPRET=1) or to their PyTorch twins (CPU); `MultiLoraLinearFunction`
is the math with one line per op; `lora_linear_multi` validates, lines the adapters up and calls
it. The adapters are never stacked or copied: the kernels read them through a table of their
addresses, and the twins loop over the adapters present. These ops are not registered with
torch.library: under torch.compile the call runs eagerly (a graph break), the single-adapter
`lora_linear` compiles.
"""

import numbers
from collections import OrderedDict

import torch
import torch.nn.functional as F

from . import _library as lib
from . import ops
from .functional import (_FLOATS, DoraNormCache, EmptyOnCopy, _check_seed, _check_x_and_weight, _draw_seed,
                         cached_norms_allowed, dora_norm, scaling_key, tensor_key, warn_once)
from .kernels import multi_lora as _ml

__all__ = ["lora_linear_multi", "MultiAdapterCache", "BASE"]

BASE = -1   # the adapter index of a row that takes the base layer alone
# Above this many rows the kernels read the rows sorted by adapter, so a tile meets one or two
# adapters; below, one tile holds every row and sorting would cost more launches than it saves.
SORT_MIN_ROWS = 65


# ---------------------------------------------------------------------------------------------
# the adapters of one call
# ---------------------------------------------------------------------------------------------

class Adapters:
    """The E adapters of one call as the ops take them: A_e [r_e, K], B_e [N, r_e] (contiguous,
    one dtype), scalings (numbers or 0-d tensors), DoRA's m/n (fp32 [N], None for a LoRA
    adapter); for the kernels also the adapter table and scalings on the device (built on first
    use, or handed over from a cache)."""

    def __init__(self, As, Bs, mns, scalings, device, table=None, scale_table=None):
        self.As, self.Bs, self.mns, self.scalings = list(As), list(Bs), list(mns), list(scalings)
        self.E = len(self.As)
        self.R = max(a.shape[0] for a in self.As)
        self.dtype = self.As[0].dtype
        self.device = device
        self._table, self._scale_table = table, scale_table
        self._segments = None

    def segments(self, idx):
        """(order, [(e, lo, hi)]) for the twins: the rows sorted by adapter, and each adapter's run
        [lo, hi) of that order (adapters with rows only), found once for a call's idx."""
        if self._segments is None or self._segments[0] is not idx:
            self._segments = (idx, _segments(idx, self.E))
        return self._segments[1]

    @property
    def dora(self) -> bool:
        return any(mn is not None for mn in self.mns)

    @property
    def table(self):
        if self._table is None:
            self._table = adapter_table(self.As, self.Bs, self.mns, self.device)
        return self._table

    @property
    def scale_table(self):
        if self._scale_table is None:
            self._scale_table = scale_table(self.scalings, self.device)
        return self._scale_table


def adapter_table(As, Bs, mns, device):
    """int64 [4, E]: (A_e address, B_e address, m/n address or 0, r_e) — what the kernels read."""
    rows = [[a.data_ptr() for a in As], [b.data_ptr() for b in Bs],
            [0 if mn is None else mn.data_ptr() for mn in mns], [a.shape[0] for a in As]]
    return torch.tensor(rows, dtype=torch.int64).to(device)


def scale_table(scalings, device):
    """fp32 [E] of the scalings (a stack of the 0-d tensors among them: no `.item()`)."""
    if all(not isinstance(s, torch.Tensor) for s in scalings):
        return torch.tensor([float(s) for s in scalings], dtype=torch.float32).to(device)
    return torch.stack([torch.as_tensor(s, dtype=torch.float32, device=device).reshape(()) for s in scalings])


def table_key(As, Bs, mns, scalings):
    """What the adapter table and scalings depend on (addresses, ranks, dtype, the scalings)."""
    return (tuple((a.data_ptr(), a.shape[0], b.data_ptr(), None if mn is None else mn.data_ptr())
                  for a, b, mn in zip(As, Bs, mns)),
            As[0].dtype, As[0].device, tuple(scaling_key(s) for s in scalings))


def _segments(idx, E):
    """(order, [(e, lo, hi)]): rows sorted by adapter (indices outside [0, E) take no adapter and
    come first) and each adapter's run of them, so a twin does one product a present adapter on a
    contiguous slice."""
    key = torch.where((idx >= 0) & (idx < E), idx, BASE).long()
    order = torch.argsort(key, stable=True)
    bounds = torch.cumsum(torch.bincount(key + 1, minlength=E + 1), 0).tolist()
    return order, [(e, bounds[e], bounds[e + 1]) for e in range(E) if bounds[e + 1] > bounds[e]]


def _unsort(sorted_rows, order):
    out = torch.empty_like(sorted_rows)
    return out.index_copy_(0, order, sorted_rows)


def sort_rows(idx, E):
    """(perm, bounds): the rows ordered by adapter (stable; base rows first), and int64 [E + 1]
    with adapter e's run at [bounds[e], bounds[e + 1]) of that order. Device ops only, no sync."""
    ordered, perm = torch.sort(idx, stable=True)
    bounds = torch.searchsorted(ordered, torch.arange(E + 1, dtype=ordered.dtype, device=idx.device))
    return perm, bounds


# ---------------------------------------------------------------------------------------------
# the ops: Triton launcher or PyTorch twin
# ---------------------------------------------------------------------------------------------

def shrink(x, ad: Adapters, idx, *, perm=None, dropout=0.0, seed=0, write_xd=False, parts=False):
    """xa [M, R] fp32: drop(x[m]) A_aᵀ (zero past r_a, and for rows of no adapter); with
    `write_xd` also keep ⊙ x in x's dtype. With `parts`, xa may come as [splits, M, R], its K
    splits' parts, which only `expand` takes (sparing a launch that sums them)."""
    if ops.use_triton(x):
        return _ml.multi_shrink(x, ad.table, idx, ad.R, ad.dtype, perm=perm, dropout=dropout, seed=seed,
                                write_xd=write_xd, sum_splits=not parts)
    xf, xk = x.float(), None
    if dropout:
        d = ops.dropout_scale(seed, x.shape, dropout, x.device)
        xk = torch.where(d > 0, x, torch.zeros((), dtype=x.dtype))
        xf = xf * d
    order, segments = ad.segments(idx)
    xs, xa = xf.index_select(0, order), xf.new_zeros((x.shape[0], ad.R))
    for e, lo, hi in segments:
        a = ad.As[e]
        xa[lo:hi, :a.shape[0]] = xs[lo:hi] @ a.float().t()
    xa = _unsort(xa, order)
    return (xa, xk) if write_xd else xa


def shrink_b(dy, ad: Adapters, idx, *, perm=None, col_scale=False):
    """gb [M, R] fp32: (dy[m] ⊙ c_a) B_a, c_a the adapter's m/n with `col_scale` (else 1)."""
    if ops.use_triton(dy):
        return _ml.multi_shrink(dy, ad.table, idx, ad.R, ad.dtype, perm=perm, operand="B", col_scale=col_scale)
    order, segments = ad.segments(idx)
    gs = dy.float().index_select(0, order)
    gb = gs.new_zeros((dy.shape[0], ad.R))
    for e, lo, hi in segments:
        g, b, mn = gs[lo:hi], ad.Bs[e], ad.mns[e]
        if col_scale and mn is not None:
            g = g * mn
        gb[lo:hi, :b.shape[1]] = g @ b.float()
    return _unsort(gb, order)


def _row_scale(ad: Adapters, idx, N, device):
    """fp32 [M, N]: each row's m/n (1 for LoRA adapters, base rows and indices outside [0, E))."""
    ones = torch.ones(N, dtype=torch.float32, device=device)
    table = torch.stack([ones if mn is None else mn for mn in ad.mns] + [ones])
    safe = torch.where((idx >= 0) & (idx < ad.E), idx, ad.E).long()
    return table[safe]


_zeros = {}
ZERO_RANK = 16


def _zero_rank(rows, device):
    """A [rows, ZERO_RANK] fp32 zero operand (a view of one buffer a device): the zero adapter
    with which the single-adapter ops compute their base GEMM alone. Rank 16, as a typical
    adapter's, so those calls reuse the kernels a rank-16 call compiles (an int argument equal to
    1 would be specialised to a constant, another compile of each kernel)."""
    buf = _zeros.get(device)
    if buf is None or buf.shape[0] < rows:
        size = max(rows, 1024 if buf is None else 2 * buf.shape[0])
        buf = _zeros[device] = torch.zeros(size, ZERO_RANK, dtype=torch.float32, device=device)
    return buf[:rows]


def base_linear(x, weight, parts=False, mixed_shrink=None):
    """x Wᵀ [M, N] in x's dtype: the single-adapter forward GEMM (and its choice of strategy)
    with a zero adapter. With `parts`, a decode GEMM split over K may return its fp32 parts
    [splits, M, N] instead, which `expand` sums (sparing the split-K epilogue's launch), and,
    given `mixed_shrink`, (those parts, the batch's shrink parts) (`ops.fused_linear`)."""
    N = weight.shape[0]
    return ops.fused_linear(x, weight, _zero_rank(x.shape[0], x.device), _zero_rank(N, x.device), 0.0,
                            parts=parts, mixed_shrink=mixed_shrink)


def base_dx(g, weight, out_dtype):
    """g W [M, K] in `out_dtype`: the single-adapter dx GEMM with a zero adapter."""
    K = weight.shape[1]
    return ops.fused_linear_dx(g, weight, _zero_rank(g.shape[0], g.device), _zero_rank(K, g.device).t(), 0.0,
                               out_dtype=out_dtype)


def expand(base, base_d, xa, ad: Adapters, idx, *, perm=None, bias=None, inv_keep=1.0, save_z=False,
           out_dtype=None):
    """y (and z with `save_z`) in `out_dtype` (default base's) from base = x Wᵀ: each row's adapter
    term s_a·xa B_aᵀ, its m/n and the bias. For DoRA with dropout base_d = (keep ⊙ x) Wᵀ and
    inv_keep = 1/(1-p). On the Triton path base and xa may come as their splits' fp32 parts."""
    dora = ad.dora
    if ops.use_triton(base):
        return _ml.multi_expand(base, base_d, xa, ad.table, ad.scale_table, idx, ad.dtype, perm=perm, bias=bias,
                                dora=dora, inv_keep=inv_keep, save_z=save_z, out_dtype=out_dtype)
    M, N = base.shape
    acc = base.float()
    order, segments = ad.segments(idx)
    xs, lora = xa.index_select(0, order), acc.new_zeros((M, N))
    for e, lo, hi in segments:
        r = ad.As[e].shape[0]
        lora[lo:hi] = (xs[lo:hi, :r] @ ad.Bs[e].float().t()) * ad.scalings[e]
    lora = _unsort(lora, order)
    if not dora:
        z = y = acc + lora
    else:
        c = _row_scale(ad, idx, N, base.device)
        if base_d is None:
            z = acc + lora
            y = c * z
        else:
            acc_d = base_d.float() * inv_keep
            z = acc_d + lora
            y = acc - acc_d + c * z
    if bias is not None:
        y = y + bias.float()
    y = y.to(base.dtype)
    return (y, z.to(base.dtype)) if save_z else y


def linear(x, weight, xa, ad: Adapters, idx, *, perm=None, bias=None, xd=None, inv_keep=1.0, save_z=False):
    """y (and z): x Wᵀ (and xd Wᵀ) by the single-adapter GEMM, then `expand`. With xa None (no
    grad, no dropout), xa = x A_aᵀ is formed here: by the decode GEMM's own programs when it can
    (`base_linear`'s `mixed_shrink`), else by `shrink`, as parts `expand` sums."""
    if xa is None:
        fused = ops.use_triton(x)
        base = base_linear(x, weight, parts=True, mixed_shrink=(ad.table, idx, ad.R, ad.dtype) if fused else None)
        base, xa = base if isinstance(base, tuple) else (base, shrink(x, ad, idx, perm=perm, parts=True))
        return expand(base, None, xa, ad, idx, perm=perm, bias=bias, save_z=save_z, out_dtype=x.dtype)
    base = base_linear(x, weight, parts=xd is None)
    base_d = base_linear(xd, weight) if xd is not None else None
    return expand(base, base_d, xa, ad, idx, perm=perm, bias=bias, inv_keep=inv_keep, save_z=save_z,
                  out_dtype=x.dtype)


def dx_expand(base, base2, gb, ad: Adapters, idx, *, perm=None, dropout=0.0, seed=0):
    """dx = base + [D ⊙] (s_a·gb A_a [+ base2]) for each row's adapter a."""
    if ops.use_triton(base):
        return _ml.multi_dx_expand(base, base2, gb, ad.table, ad.scale_table, idx, ad.dtype, perm=perm,
                                   dropout=dropout, seed=seed)
    M, K = base.shape
    acc = base.float()
    order, segments = ad.segments(idx)
    gs, inner = gb.index_select(0, order), acc.new_zeros((M, K))
    for e, lo, hi in segments:
        r = ad.As[e].shape[0]
        inner[lo:hi] = (gs[lo:hi, :r] @ ad.As[e].float()) * ad.scalings[e]
    inner = _unsort(inner, order)
    if base2 is not None:
        inner = inner + base2.float()
    if dropout:
        inner = inner * ops.dropout_scale(seed, (M, K), dropout, base.device)
    return (acc + inner).to(base.dtype)


def linear_dx(dy, weight, gb, ad: Adapters, idx, *, perm=None, dropout=0.0, seed=0, out_dtype=None):
    """dx = (dy ⊙ c) W + D ⊙ (s_a·gb A_a + (dy ⊙ c2) W) with c = m/n of each row's adapter (DoRA
    without dropout; 1 otherwise), c2 = m/n − 1 (DoRA with dropout): the base dx GEMMs of the
    single-adapter op on dy scaled row by row (rounded to dy's dtype, as the GEMM reads it), then
    `dx_expand`."""
    out_dtype = out_dtype or dy.dtype
    base2 = None
    if not ad.dora:
        base = base_dx(dy, weight, out_dtype)
    else:
        c = _row_scale(ad, idx, dy.shape[1], dy.device)
        if dropout:
            base = base_dx(dy, weight, out_dtype)
            base2 = base_dx((dy.float() * (c - 1.0)).to(dy.dtype), weight, out_dtype)
        else:
            base = base_dx((dy.float() * c).to(dy.dtype), weight, out_dtype)
    return dx_expand(base, base2, gb, ad, idx, perm=perm, dropout=dropout, seed=seed)


def outer_reduce(lhs, rhs, ad: Adapters, idx, *, perm=None, bounds=None, dropout=0.0, seed=0):
    """[E, P, Q] fp32: Σ over adapter e's rows of lhs[m]ᵀ (rhs[m] ⊙ D[m])."""
    if ops.use_triton(lhs):
        return _ml.segment_outer_reduce(lhs, rhs, perm, bounds, dropout=dropout, seed=seed)
    r = rhs.float()
    if dropout:
        r = r * ops.dropout_scale(seed, rhs.shape, dropout, rhs.device)
    order, segments = ad.segments(idx)
    ls, rs = lhs.float().index_select(0, order), r.index_select(0, order)
    out = r.new_zeros((ad.E, lhs.shape[1], rhs.shape[1]))
    for e, lo, hi in segments:
        out[e] = ls[lo:hi].t() @ rs[lo:hi]
    return out


def column_dot(a, b, ad: Adapters, idx, *, perm=None, bounds=None):
    """[E, N] fp32: Σ over adapter e's rows of a_ij b_ij."""
    if ops.use_triton(a):
        return _ml.segment_column_dot(a, b, perm, bounds)
    order, segments = ad.segments(idx)
    prod = (a.float() * b.float()).index_select(0, order)
    out = torch.zeros((ad.E, a.shape[1]), dtype=torch.float32, device=a.device)
    for e, lo, hi in segments:
        out[e] = prod[lo:hi].sum(0)
    return out


# ---------------------------------------------------------------------------------------------
# the autograd Function
# ---------------------------------------------------------------------------------------------

class _Plan:
    """The call's Python-side facts (E, the scalings that are numbers, whether any gradient is
    wanted: `ctx.needs_input_grad` reads requires_grad even under no_grad) and, without grad,
    the adapter table and scalings a cache handed over; kept on ctx."""

    def __init__(self, E, scalings, table=None, scale_table=None, grad=True):
        self.E, self.scalings, self.table, self.scale_table = E, scalings, table, scale_table
        self.grad = grad


def _split(tensors, E):
    """(A, B, m, n, m/n, scaling tensors, weight tensors) from the Function's flat tensor list."""
    groups = [list(tensors[i * E:(i + 1) * E]) for i in range(6)]
    return (*groups, tensors[6 * E:])


class MultiLoraLinearFunction(torch.autograd.Function):
    """Mixed-adapter LoRA / DoRA for x [M, K], y [*lead, N]; see the module docstring. Tensors,
    E of each in turn: A_e, B_e, m_e (None: LoRA), n_e (DoRA's row norm, a constant), m/n (given
    only without grad), scaling_e when a tensor; then the weight's operands."""

    @staticmethod
    def forward(ctx, x, lead, idx, perm, bounds, bias, p, seed, meta, offset, plan, *tensors):
        E = plan.E
        As, Bs, ms, ns, mns, scs, weight_tensors = _split(tensors, E)
        weight = lib._weight(*weight_tensors, meta, offset)
        mns = [mn if mn is not None or m is None else m.float() / n for m, n, mn in zip(ms, ns, mns)]  # m/n
        scalings = [s if s is not None else f for s, f in zip(scs, plan.scalings)]
        with lib._exact(x):   # the ops compute in their own precision, also under autocast
            ad = Adapters(As, Bs, mns, scalings, x.device, plan.table, plan.scale_table)
            need = ctx.needs_input_grad if plan.grad else (False,) * len(ctx.needs_input_grad)
            save_z = any(need[11 + 2 * E + e] for e in range(E))
            if p and ad.dora:
                xa, xd = shrink(x, ad, idx, perm=perm, dropout=p, seed=seed, write_xd=True)  # drop(x) A_aᵀ, keep⊙x
            elif not p and not any(need):
                xa, xd = None, None   # not kept: `linear` forms it, as parts `expand` sums
            else:
                xa, xd = shrink(x, ad, idx, perm=perm, dropout=p, seed=seed, parts=not any(need)), None  # drop(x) A_aᵀ
            out = linear(x, weight, xa, ad, idx, perm=perm, bias=bias, xd=xd, inv_keep=1.0 / (1.0 - p),
                         save_z=save_z)                                                        # y (and z)
        y, z = out if save_z else (out, None)
        # m/n is saved (not recomputed) so that backward's table points at live tensors; the
        # table itself is rebuilt there from the saved tensors (saved-tensor hooks may move them)
        ctx.save_for_backward(x, xa, idx, perm, bounds, z, *As, *Bs, *ms, *ns, *mns, *scs, *weight_tensors)
        ctx.plan, ctx.p, ctx.seed, ctx.meta, ctx.offset = plan, p, seed, meta, offset
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*lead, y.shape[1]).detach()

    @staticmethod
    def backward(ctx, dy):
        x, xa, idx, perm, bounds, z, *tensors = ctx.saved_tensors
        plan, p, seed = ctx.plan, ctx.p, ctx.seed
        E = plan.E
        As, Bs, ms, ns, mns, scs, weight_tensors = _split(tensors, E)
        weight = lib._weight(*weight_tensors, ctx.meta, ctx.offset)
        scalings = [s if s is not None else f for s, f in zip(scs, plan.scalings)]
        ad = Adapters(As, Bs, mns, scalings, x.device)
        dora = ad.dora
        dy = dy.reshape(-1, dy.shape[-1])                                          # [*lead, N] -> [M, N]
        need = ctx.needs_input_grad
        need_x, need_bias = need[0], need[5]
        need_A = [need[11 + e] for e in range(E)]
        need_B = [need[11 + E + e] for e in range(E)]
        need_m = [need[11 + 2 * E + e] for e in range(E)]
        dx = dbias = None
        dA, dB, dm = [None] * E, [None] * E, [None] * E
        with lib._exact(dy):
            kw = dict(perm=perm, bounds=bounds)
            if need_x or any(need_A):
                gb = shrink_b(dy, ad, idx, perm=perm, col_scale=dora)                   # (dy ⊙ m/n) B_a
            if need_x:
                dx = linear_dx(dy, weight, gb, ad, idx, perm=perm, dropout=p, seed=seed,
                               out_dtype=x.dtype)                           # (dy ⊙ c) W + D ⊙ (s·gb A [+ …])
            if any(need_A):
                grads = outer_reduce(gb, x, ad, idx, dropout=p, seed=seed, **kw)        # Σ_a gbᵀ drop(x)
                dA = [(scalings[e] * grads[e, :As[e].shape[0]]).to(As[e].dtype) if need_A[e] else None
                      for e in range(E)]
            if any(need_B):
                grads = outer_reduce(dy, xa, ad, idx, **kw)                             # Σ_a dyᵀ xa
                dB = [None if not need_B[e] else
                      (scalings[e] * (grads[e, :, :Bs[e].shape[1]] if mns[e] is None else
                                      mns[e][:, None] * grads[e, :, :Bs[e].shape[1]])).to(Bs[e].dtype)
                      for e in range(E)]
            if any(need_m):
                sums = column_dot(dy, z, ad, idx, **kw)                                 # Σ_a dy ⊙ z
                dm = [(sums[e] / ns[e]).to(ms[e].dtype) if need_m[e] else None for e in range(E)]
        if need_bias:
            dbias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return ((dx, None, None, None, None, dbias, None, None, None, None, None) + tuple(dA) + tuple(dB)
                + tuple(dm) + (None,) * (3 * E + len(weight_tensors)))


# ---------------------------------------------------------------------------------------------
# the cache a layer keeps between calls without grad
# ---------------------------------------------------------------------------------------------

class MultiAdapterCache(EmptyOnCopy):
    """What a layer keeps between calls of `lora_linear_multi` (or `lora_linear`) without grad:
    each DoRA adapter's row norm and m/n (a `DoraNormCache`, N floats each, keyed on what they
    depend on), the last few adapter tables (a few integers an adapter) and row indices. Never a
    copy of a weight or of an adapter. With grad enabled nothing is read from it."""

    _TABLES = 8

    def __init__(self):
        self.clear()

    def clear(self):
        """Forget everything (recomputed on the next call without grad)."""
        self._norms = {}
        self._tables = OrderedDict()
        self._index = OrderedDict()

    def norm_cache(self, key) -> DoraNormCache:
        """The `DoraNormCache` of adapter `key` (an adapter name, or `lora_A` itself)."""
        if isinstance(key, torch.Tensor):
            base = key if key._base is None else key._base
            key = ("tensor", id(base), key.data_ptr())
        cache = self._norms.get(key)
        if cache is None:
            cache = self._norms[key] = DoraNormCache()
        return cache

    def keep_only(self, keys):
        """Drop the norm caches of adapters not in `keys` (deleted adapters)."""
        for key in [k for k in self._norms if isinstance(k, str) and k not in keys]:
            del self._norms[key]

    def tables(self, As, Bs, mns, scalings, device):
        """(adapter table, scalings) on `device`, reused while addresses, ranks and scalings stay."""
        return self._lookup(self._tables, table_key(As, Bs, mns, scalings),
                            lambda: (adapter_table(As, Bs, mns, device), scale_table(scalings, device)))

    def index(self, key, build):
        """A row-index tensor for `key` (e.g. the adapter names of a batch and x's shape)."""
        return self._lookup(self._index, key, build)

    def _lookup(self, entries, key, build):
        """entries[key], built on a miss; the least recently used entries beyond `_TABLES` go."""
        hit = entries.get(key)
        if hit is None:
            hit = entries[key] = build()
            while len(entries) > self._TABLES:
                entries.popitem(last=False)
        else:
            entries.move_to_end(key)
        return hit


# ---------------------------------------------------------------------------------------------
# the functional form
# ---------------------------------------------------------------------------------------------

def _as_list(value, E, what):
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0))
    if isinstance(value, (list, tuple)):
        if len(value) != E:
            raise ValueError(f"{what}: expected {E} entries (one per adapter), got {len(value)}")
        return list(value)
    raise TypeError(f"{what}: expected a sequence of tensors or a stacked tensor, got {type(value).__name__}")


def _adapters_of(x, weight, lora_A, lora_B, scaling, magnitude):
    """Validated per-adapter lists (A, B, scalings, magnitudes), each adapter's A and B in one
    dtype for all (fp32 where they differ) and contiguous."""
    if isinstance(lora_A, torch.Tensor) and lora_A.dim() != 3:
        raise ValueError(f"lora_A: expected E tensors [r, K] or a stacked [E, r, K] tensor, got shape "
                         f"{tuple(lora_A.shape)}")
    As = _as_list(lora_A, len(lora_A), "lora_A")
    E = len(As)
    if E == 0:
        raise ValueError("lora_A: expected at least one adapter")
    if isinstance(lora_B, torch.Tensor) and lora_B.dim() != 3:
        raise ValueError(f"lora_B: expected E tensors [N, r] or a stacked [E, N, r] tensor, got shape "
                         f"{tuple(lora_B.shape)}")
    Bs = _as_list(lora_B, E, "lora_B")
    N, K = weight.shape
    for e, (a, b) in enumerate(zip(As, Bs)):
        for name, t in ((f"lora_A[{e}]", a), (f"lora_B[{e}]", b)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"{name}: expected a 2-D tensor")
            if t.dtype not in _FLOATS:
                raise TypeError(f"{name}: expected a float tensor, got {t.dtype}")
            if t.device != x.device:
                raise ValueError(f"{name}: on {t.device}, but x is on {x.device}")
        if a.shape[1] != K:
            raise ValueError(f"lora_A[{e}]: expected shape [r, {K}], got {tuple(a.shape)}")
        if tuple(b.shape) != (N, a.shape[0]):
            raise ValueError(f"lora_B[{e}]: expected shape [{N}, {a.shape[0]}] (out_features, r of lora_A[{e}]), "
                             f"got {tuple(b.shape)}")
    if isinstance(scaling, torch.Tensor) and scaling.dim() == 1:
        scalings = list(scaling.unbind(0))
    elif isinstance(scaling, (list, tuple)):
        scalings = list(scaling)
    else:
        scalings = [scaling] * E
    if len(scalings) != E:
        raise ValueError(f"scaling: expected one number per adapter ({E}), got {len(scalings)}")
    for e, s in enumerate(scalings):
        if isinstance(s, torch.Tensor):
            if s.dim() != 0 or not s.dtype.is_floating_point:
                raise TypeError(f"scaling[{e}]: expected a number or a 0-d float tensor")
        elif isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise TypeError(f"scaling[{e}]: expected a number or a 0-d float tensor, got {type(s).__name__}")
    if magnitude is None:
        mags = [None] * E
    else:
        mags = _as_list(magnitude, E, "magnitude")
        for e, m in enumerate(mags):
            if m is None:
                continue
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != (N,):
                raise ValueError(f"magnitude[{e}]: expected None (a LoRA adapter) or a tensor of shape [{N}]")
            if m.dtype not in _FLOATS:
                raise TypeError(f"magnitude[{e}]: expected a float tensor, got {m.dtype}")
            if m.device != x.device:
                raise ValueError(f"magnitude[{e}]: on {m.device}, but x is on {x.device}")
    dtypes = {t.dtype for t in As + Bs}
    if len(dtypes) > 1:   # the kernels read every adapter as one dtype
        As, Bs = [a.float() for a in As], [b.float() for b in Bs]
    return [a.contiguous() for a in As], [b.contiguous() for b in Bs], scalings, mags


def _check_base(x, weight, bias, dropout, seed):
    w_device = _check_x_and_weight(x, weight, "lora_linear_multi")
    if w_device != x.device:
        raise ValueError(f"weight: on {w_device}, but x is on {x.device}")
    N = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,) or bias.dtype not in _FLOATS:
            raise ValueError(f"bias: expected a float tensor of shape [{N}]")
        if bias.device != x.device:
            raise ValueError(f"bias: on {bias.device}, but x is on {x.device}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    _check_seed(seed)
    if isinstance(seed, torch.Tensor):
        raise TypeError("seed: lora_linear_multi takes an int seed (it is not traced by torch.compile)")


def row_index(adapter_index, x, E):
    """int32 [M] adapter index of each row of x.reshape(-1, K), on x's device. `adapter_index`
    has x's leading shape, or (for x of 3 or more dimensions) one entry per sample, x.shape[0], as
    PEFT's `adapter_names` has. Indices known on the host are checked to lie in [-1, E)."""
    lead = tuple(x.shape[:-1])
    if isinstance(adapter_index, (list, tuple)):
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in adapter_index):
            raise TypeError("adapter_index: expected integers (an adapter's position, or -1 for the base layer)")
        adapter_index = torch.tensor(adapter_index, dtype=torch.int32)
    if not isinstance(adapter_index, torch.Tensor) or adapter_index.dtype.is_floating_point \
            or adapter_index.dtype.is_complex or adapter_index.dtype == torch.bool:
        raise TypeError("adapter_index: expected an integer tensor or a list of ints")
    shape = tuple(adapter_index.shape)
    if shape != lead and not (len(lead) >= 2 and shape == lead[:1]) and not (len(lead) == 0 and shape in ((), (1,))):
        raise ValueError(f"adapter_index: expected shape {lead} (one adapter per row) or {lead[:1]} (one per "
                         f"sample), got {shape}")
    if adapter_index.device.type == "cpu" and adapter_index.numel():
        lo, hi = int(adapter_index.min()), int(adapter_index.max())
        if lo < BASE or hi >= E:
            raise ValueError(f"adapter_index: values must lie in [-1, {E}) (-1: the base layer), got {lo} .. {hi}")
    idx = adapter_index.to(device=x.device, dtype=torch.int32)
    if shape != lead:
        idx = idx.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)
    return idx.reshape(-1).contiguous()


def lora_linear_multi(x, weight, lora_A, lora_B, scaling, adapter_index, *, bias=None, magnitude=None,
                      dropout=0.0, training=False, seed=None, cache=None):
    """Fused LoRA / DoRA linear for a batch whose rows use different adapters, with autograd.

    Row m computes `lora_linear` with adapter ``adapter_index[m]`` (``-1``: the base layer alone,
    ``x Wᵀ + bias``), all rows in the same launches, as PEFT's ``adapter_names=`` batch would
    one sub-batch at a time (PEFT refuses DoRA there; this does not).

    Args:
        x: activations ``[..., K]``.
        weight: frozen base weight, dense ``[N, K]`` of x's dtype or an ``NF4Weight``.
        lora_A: E tensors ``[r_e, K]`` (ranks may differ), or a stacked ``[E, r, K]``.
        lora_B: E tensors ``[N, r_e]``, or a stacked ``[E, N, r]``.
        scaling: one number for all adapters, or one per adapter (numbers, 0-d tensors, or a
            1-D tensor); scalings get no gradient.
        adapter_index: integer tensor or list: one adapter per row (x's leading shape), or one
            per sample (``x.shape[0]`` entries, for x of 3 or more dimensions), each in
            ``[-1, E)``. Indices on a CPU tensor or list are checked; on a GPU tensor an index
            outside that range gives the row the base output (checking would cost a sync).
        bias: optional ``[N]``. magnitude: None (all LoRA), or E entries each None (a LoRA
            adapter) or a DoRA magnitude ``[N]`` (or a stacked ``[E, N]``: all DoRA).
        dropout: LoRA-input dropout probability (one for every adapter), applied only when
            ``training``. seed: dropout seed (an int), drawn when None; the masks equal
            ``lora_linear``'s for the same seed.
        cache: a `MultiAdapterCache`: without grad, DoRA's row norms and m/n and the adapter
            table come from it while nothing they depend on changed (a decode loop reads each
            adapter's norm once). Not read with grad enabled.

    Returns:
        ``[..., N]`` in x's dtype. Gradients reach x, bias, and each adapter's A, B and magnitude
        from the rows that use it.
    """
    _check_base(x, weight, bias, dropout, seed)
    if cache is not None and not isinstance(cache, MultiAdapterCache):
        raise TypeError(f"cache: expected a peft_ops.MultiAdapterCache, got {type(cache).__name__}")
    As, Bs, scalings, mags = _adapters_of(x, weight, lora_A, lora_B, scaling, magnitude)
    E = len(As)
    idx = row_index(adapter_index, x, E)
    return multi_call(x, weight, As, Bs, scalings, mags, idx, bias=bias, dropout=dropout, training=training,
                      seed=seed, cache=cache)


def multi_call(x, weight, As, Bs, scalings, mags, idx, *, bias=None, dropout=0.0, training=False, seed=None,
               cache=None, norm_keys=None):
    """`lora_linear_multi` on validated operands (the modules call it): per-adapter lists, idx
    int32 [M] on x's device. `norm_keys` name each adapter's norm cache (default: its lora_A)."""
    N, K = weight.shape
    E = len(As)
    p = float(dropout) if training else 0.0
    if not p:
        seed = 0
    elif seed is None:
        seed = int(_draw_seed())   # a 0-d tensor under torch.compile: this call is eager anyway
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        # every input stays in the graph with a zero gradient (see lora_linear)
        inputs = [t for t in [x2, bias, *As, *Bs, *mags] if t is not None]
        anchor = sum(t.sum() for t in inputs) * 0
        y = x.new_zeros(*x.shape[:-1], N) + anchor.to(x.dtype)
        return y if bias is None else y + bias.to(x.dtype)
    if bias is not None:
        bias = bias.contiguous()
    cached = cache is not None and cached_norms_allowed()
    ns, mns = [None] * E, [None] * E
    for e, m in enumerate(mags):
        if m is None:
            continue
        if cached:
            key = As[e] if norm_keys is None else norm_keys[e]
            ns[e], mns[e] = cache.norm_cache(key).get(weight, As[e], Bs[e], scalings[e], m)
        else:
            ns[e] = dora_norm(weight, As[e], Bs[e], scalings[e])      # n_e, one streamed pass over W
    table = scale_t = None
    if cached and ops.use_triton(x2):
        table, scale_t = cache.tables(As, Bs, mns, scalings, x.device)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in [x, bias, *As, *Bs, *mags])
    perm = bounds = None
    if ops.use_triton(x2) and (grad or M >= SORT_MIN_ROWS):
        perm, bounds = sort_rows(idx, E)
    if not grad:
        mns = [mn if mn is not None or m is None else m.detach().float() / n for m, n, mn in zip(mags, ns, mns)]
    plan = _Plan(E, [None if isinstance(s, torch.Tensor) else float(s) for s in scalings], table, scale_t, grad)
    scs = [s if isinstance(s, torch.Tensor) else None for s in scalings]
    tensors, meta, offset = lib.weight_operands(weight)
    return MultiLoraLinearFunction.apply(x2, tuple(x.shape[:-1]), idx, perm, bounds, bias, p, seed, meta, offset,
                                         plan, *As, *Bs, *mags, *ns, *mns, *scs, *tensors)
