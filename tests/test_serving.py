"""Serving unmerged adapters: DoRA's no-grad row-norm cache, and mixed-adapter batches
(`peft_ops.lora_linear_multi`, `LoraLinear(..., adapter_names=...)`, PEFT's `adapter_names=` on a
`from_peft` model) against the fp64 reference, the single-adapter op and PEFT's own mixed batch.

Every numeric test runs the Triton kernels (in the interpreter, TRITON_INTERPRET=1 from conftest)
and the plain-PyTorch twins. Shapes are kept small: the interpreter pays per program.
"""

import copy
import os
import pickle
import subprocess
import sys
import warnings

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import peft_ops
from peft_ops import functional, multi, ops, reference
from peft_ops.kernels import _config
from peft_ops.modules import layer_cache

# Normwise, as tests/test_lora.py: the mixed path rounds the base GEMM's output to the activation
# dtype before adding each row's adapter term (as PEFT does), so 16-bit outputs see two roundings.
TOL = {torch.float32: 3e-5, torch.bfloat16: 2.4e-2}
DEVICE = torch.device(os.environ.get("PEFT_OPS_TEST_DEVICE", "cpu"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["triton", "twin"])
def backend(request, monkeypatch):
    """The Triton kernels (interpreter) or the PyTorch twins."""
    monkeypatch.delenv("PEFT_OPS_STRATEGY", raising=False)
    if request.param == "twin":
        monkeypatch.setattr(ops, "use_triton", lambda t: False)
    else:
        assert _config.interpreting() or DEVICE.type == "cuda", "tests/conftest.py sets TRITON_INTERPRET=1"
    return request.param


def assert_close(actual, expected, tol, what):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * max(scale, 1e-6), f"{what}: max error {err:.3e} > {tol:.1e} × {scale:.3e}"


def make_adapters(E, N, K, ranks, dora, gen, adapter_dtype=torch.float32):
    """E adapters of the given ranks (random B: every gradient is non-trivial); DoRA magnitudes
    (m != n) where `dora[e]`."""
    As = [(torch.randn(r, K, generator=gen) / K ** 0.5).to(DEVICE, adapter_dtype).requires_grad_() for r in ranks]
    Bs = [torch.randn(N, r, generator=gen).to(DEVICE, adapter_dtype).requires_grad_() for r in ranks]
    ms = [(torch.rand(N, generator=gen) + 0.5).to(DEVICE, adapter_dtype).requires_grad_() if d else None
          for d in dora]
    return As, Bs, ms


def run_multi(*, lead, N, K, ranks, dora, base_rows, dtype, nf4, bias, seed=0, per_sample=False, scalings=None):
    """Forward + backward of lora_linear_multi and of the reference; compare y and every grad."""
    gen = torch.Generator().manual_seed(seed)
    E = len(ranks)
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(DEVICE, dtype)
    weight = peft_ops.NF4Weight.quantize(w, blocksize=64) if nf4 else w
    x = torch.randn(*lead, K, generator=gen).to(DEVICE, dtype).requires_grad_()
    As, Bs, ms = make_adapters(E, N, K, ranks, dora, gen)
    b = torch.randn(N, generator=gen).to(DEVICE, dtype).requires_grad_() if bias else None
    scalings = scalings or [0.5 + 0.25 * e for e in range(E)]
    shape = lead[:1] if per_sample else lead
    idx = torch.randint(0, E, shape, generator=gen)
    if base_rows:
        idx = torch.where(torch.rand(shape, generator=gen) < 0.3, torch.full_like(idx, -1), idx)
    y = peft_ops.lora_linear_multi(x, weight, As, Bs, scalings, idx, bias=b, magnitude=ms)
    row_idx = idx.reshape(-1, *([1] * (len(lead) - 1))).expand(lead) if per_sample else idx
    y_ref = reference.lora_linear_multi(x, weight, As, Bs, scalings, row_idx.reshape(-1), bias=b, magnitudes=ms)
    assert_close(y, y_ref, TOL[dtype], "y")
    dy = torch.randn(y.shape, generator=gen).to(DEVICE, dtype)
    params = [("x", x)] + [(f"A{e}", a) for e, a in enumerate(As)] + [(f"B{e}", t) for e, t in enumerate(Bs)]
    params += [(f"m{e}", m) for e, m in enumerate(ms) if m is not None] + ([("bias", b)] if bias else [])
    grads = torch.autograd.grad(y, [t for _, t in params], dy, allow_unused=True)
    ref_grads = torch.autograd.grad(y_ref, [t for _, t in params], dy, allow_unused=True)
    for (name, _), g, g_ref in zip(params, grads, ref_grads):
        if g_ref is None:   # an adapter no row uses: no gradient, as in PEFT
            assert g is None or not g.abs().any(), name
            continue
        assert_close(g, g_ref, TOL[dtype], f"d{name}")
    return idx


# --- lora_linear_multi against the reference ---------------------------------------------------

@settings(max_examples=8)
@given(st.data())
def test_mixed_batch_matches_reference_fuzz(data):
    """Random shapes (1, primes, ragged tiles), adapter counts, ranks that differ, LoRA and DoRA
    adapters in one batch, base rows, NF4 or dense, fp32 or bf16, on the Triton kernels."""
    M = data.draw(st.sampled_from([1, 2, 7, 13]), "M")
    N = data.draw(st.sampled_from([8, 17, 24]), "N")
    K = data.draw(st.sampled_from([16, 33, 64]), "K")
    E = data.draw(st.integers(1, 4), "E")
    ranks = data.draw(st.lists(st.integers(1, 9), min_size=E, max_size=E), "ranks")
    dora = data.draw(st.lists(st.booleans(), min_size=E, max_size=E), "dora")
    run_multi(lead=(M,), N=N, K=K, ranks=ranks, dora=dora, base_rows=data.draw(st.booleans(), "base_rows"),
              dtype=data.draw(st.sampled_from([torch.float32, torch.bfloat16]), "dtype"),
              nf4=data.draw(st.booleans(), "nf4"), bias=data.draw(st.booleans(), "bias"),
              seed=data.draw(st.integers(0, 1000), "seed"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_mixed_lora_and_dora_ranks_differ(backend, nf4, dtype):
    run_multi(lead=(11,), N=24, K=40, ranks=[4, 2, 7], dora=[True, False, True], base_rows=True, dtype=dtype,
              nf4=nf4, bias=True)


def test_sorted_rows_path(backend):
    # from SORT_MIN_ROWS rows the kernels read the rows sorted by adapter; 3-D x, per-row index
    run_multi(lead=(5, 15), N=17, K=32, ranks=[3, 5, 1], dora=[False, True, False], base_rows=True,
              dtype=torch.float32, nf4=True, bias=True, seed=3)


def test_per_sample_index_on_3d_input(backend):
    # one adapter per sample of x [B, T, K], as PEFT's adapter_names
    run_multi(lead=(3, 4), N=16, K=24, ranks=[2, 4], dora=[True, False], base_rows=True, dtype=torch.float32,
              nf4=False, bias=False, per_sample=True)


def test_64_adapters_in_one_layer(backend):
    E = 64
    run_multi(lead=(80,), N=8, K=16, ranks=[1 + e % 4 for e in range(E)], dora=[e % 3 == 0 for e in range(E)],
              base_rows=True, dtype=torch.float32, nf4=False, bias=True, seed=5,
              scalings=[0.5 + e / 64 for e in range(E)])


@pytest.mark.skipif(not (_config.interpreting() or DEVICE.type == "cuda"),
                    reason="calls the Triton launchers directly (the twins have no split parts): in the "
                    "interpreter, which tests/conftest.py turns on, or on a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixed_expand_sums_split_parts(dtype):
    # At decode sizes the mixed forward hands the expand kernel the split shrink's K parts
    # (without grad) and the split decode GEMM's K parts of x Wᵀ; it sums both (no launch between):
    # the same y as from the summed operands, and as the reference.
    from peft_ops.kernels import decode as kdecode
    from peft_ops.kernels import multi_lora as kml

    gen = torch.Generator().manual_seed(7)
    M, N, K, ranks = 5, 24, 384, [4, 2, 7]
    weight = (torch.randn(N, K, generator=gen) / K ** 0.5).to(DEVICE, dtype)
    x = torch.randn(M, K, generator=gen).to(DEVICE, dtype)
    As, Bs, ms = make_adapters(3, N, K, ranks, [True, False, True], gen)
    idx = torch.tensor([0, -1, 2, 1, 0], device=DEVICE)
    with torch.no_grad():   # (m/2 stands for m/n: the kernels take any row scale)
        ad = multi.Adapters(As, Bs, [None if m is None else m / 2 for m in ms], [0.5, 1.0, 0.75], DEVICE)
        parts = kml.multi_shrink(x, ad.table, idx, ad.R, ad.dtype, split_k=3, sum_splits=False)
        assert parts.shape == (3, M, ad.R)
        xa = kml.multi_shrink(x, ad.table, idx, ad.R, ad.dtype)
        torch.testing.assert_close(parts.sum(0), xa, atol=1e-5, rtol=1e-5)
        base = multi.base_linear(x, weight)
        y_parts = kml.multi_expand(base, None, parts, ad.table, ad.scale_table, idx, ad.dtype, dora=True)
        y_xa = kml.multi_expand(base, None, xa, ad.table, ad.scale_table, idx, ad.dtype, dora=True)
        assert_close(y_parts, y_xa, TOL[dtype], "y from parts")
        y_ref = reference.lora_linear_multi(x, weight, As, Bs, [0.5, 1.0, 0.75], idx, magnitudes=ms)
        y_op = peft_ops.lora_linear_multi(x, weight, As, Bs, [0.5, 1.0, 0.75], idx, magnitude=ms)
        assert_close(y_op, y_ref, TOL[dtype], "y without grad")
        if dtype == torch.bfloat16:   # the decode GEMM (NF4, 16-bit activations) split in three
            w4 = peft_ops.NF4Weight.quantize(weight, blocksize=64)
            zero_a, zero_b = multi._zero_rank(M, DEVICE), multi._zero_rank(N, DEVICE)
            base_parts = kdecode.decode_linear(x, w4, zero_a, zero_b, 0.0, split_k=3, parts=True)
            assert base_parts.shape == (3, M, N) and base_parts.dtype == torch.float32
            base = kdecode.decode_linear(x, w4, zero_a, zero_b, 0.0, split_k=1)
            y_parts = kml.multi_expand(base_parts, None, parts, ad.table, ad.scale_table, idx, ad.dtype, dora=True,
                                       out_dtype=dtype)
            y_base = kml.multi_expand(base, None, xa, ad.table, ad.scale_table, idx, ad.dtype, dora=True)
            assert_close(y_parts, y_base, TOL[dtype], "y from the decode's parts")
            y_ref = reference.lora_linear_multi(x, w4, As, Bs, [0.5, 1.0, 0.75], idx, magnitudes=ms)
            y_op = peft_ops.lora_linear_multi(x, w4, As, Bs, [0.5, 1.0, 0.75], idx, magnitude=ms)
            assert_close(y_op, y_ref, TOL[dtype], "y without grad, NF4")


@pytest.mark.skipif(not (_config.interpreting() or DEVICE.type == "cuda"),
                    reason="calls the Triton launchers directly (the twins have no split parts): in the "
                    "interpreter, which tests/conftest.py turns on, or on a GPU")
@pytest.mark.parametrize("ranks, idx, adapter_dtype", [
    ([4, 2, 3], [0, -1, 2, 1, 0], torch.float32),
    ([1, 2], [1, 1, 1], torch.bfloat16),
    ([3], [-1, 0], torch.float16),
    ([2, 4], [1, 0, 2, -1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0], torch.float32),   # 20 rows; 2 names none
], ids=["three", "one-adapter-rows-bf16", "two-rows-fp16", "twenty-rows"])
def test_decode_forms_the_mixed_shrink_in_its_own_programs(monkeypatch, ranks, idx, adapter_dtype):
    # Without grad the mixed batch's decode GEMM (split over K, few ranks a tile) forms each row's
    # x A_aᵀ in its own programs: x Wᵀ's parts exactly as without, the shrink's parts summing to
    # the mixed shrink's (zero for rows of no adapter and past an adapter's rank), and the same y
    # from the expand (m/2 stands for m/n, as above).
    from peft_ops.kernels import decode as kdecode
    from peft_ops.kernels import multi_lora as kml

    gen = torch.Generator().manual_seed(len(idx) * 10 + len(ranks))
    # two tiles in the interpreter, three on a GPU
    M, N, K, dtype = len(idx), 48 if _config.interpreting() else 384, 384, torch.bfloat16
    w4 = peft_ops.NF4Weight.quantize((torch.randn(N, K, generator=gen) / K ** 0.5).to(DEVICE, dtype))
    x = torch.randn(M, K, generator=gen).to(DEVICE, dtype)
    As, Bs, ms = make_adapters(len(ranks), N, K, ranks, [True] * len(ranks), gen, adapter_dtype)
    idx = torch.tensor(idx, device=DEVICE, dtype=torch.int32)
    ad = multi.Adapters(As, Bs, [m.float() / 2 for m in ms], [0.5] * len(ranks), DEVICE)
    zero_a, zero_b = multi._zero_rank(M, DEVICE), multi._zero_rank(N, DEVICE)
    shrink = mock.Mock(wraps=kml.multi_shrink)
    monkeypatch.setattr(kml, "multi_shrink", shrink)
    base_parts, xa_parts = kdecode.decode_linear(x, w4, zero_a, zero_b, 0.0, split_k=3, parts=True,
                                                 mixed_shrink=(ad.table, idx, ad.R, ad.dtype))
    assert not shrink.called
    assert xa_parts.shape == (3, M, ad.R) and xa_parts.dtype == torch.float32
    assert torch.equal(base_parts, kdecode.decode_linear(x, w4, zero_a, zero_b, 0.0, split_k=3, parts=True))
    xa = kml.multi_shrink(x, ad.table, idx, ad.R, ad.dtype)
    torch.testing.assert_close(xa_parts.sum(0), xa, atol=1e-5, rtol=1e-5)
    for m, a in enumerate(idx.tolist()):   # exact zeros where a row has no adapter or rank
        r = ranks[a] if 0 <= a < len(ranks) else 0
        assert not xa_parts[:, m, r:].any()
    y_parts = kml.multi_expand(base_parts, None, xa_parts, ad.table, ad.scale_table, idx, ad.dtype, dora=True,
                               out_dtype=dtype)
    y_xa = kml.multi_expand(base_parts, None, xa, ad.table, ad.scale_table, idx, ad.dtype, dora=True, out_dtype=dtype)
    assert_close(y_parts, y_xa, TOL[dtype], "y from the fused shrink")


@pytest.mark.skipif(not (_config.interpreting() or DEVICE.type == "cuda"),
                    reason="patches the Triton decode launcher (the twins have no split parts): in the "
                    "interpreter, which tests/conftest.py turns on, or on a GPU")
@pytest.mark.parametrize("adapters_require_grad", [False, True], ids=["frozen", "trainable"])
def test_mixed_decode_without_grad_forms_its_shrink_in_the_decode(monkeypatch, adapters_require_grad):
    # lora_linear_multi without grad (trainable adapters too, as in an eval loop during training),
    # the decode GEMM split over K as on a GPU: it forms the batch's shrink (no mixed shrink
    # launch), and y is the reference's
    from functools import partial

    from peft_ops.kernels import decode as kdecode
    from peft_ops.kernels import multi_lora as kml

    gen = torch.Generator().manual_seed(11)
    M, N, K, ranks, dtype = 6, 48 if _config.interpreting() else 384, 384, [4, 2, 3], torch.bfloat16
    w4 = peft_ops.NF4Weight.quantize((torch.randn(N, K, generator=gen) / K ** 0.5).to(DEVICE, dtype))
    x = torch.randn(M, K, generator=gen).to(DEVICE, dtype)
    As, Bs, ms = make_adapters(3, N, K, ranks, [True, False, True], gen)
    if not adapters_require_grad:
        As, Bs, ms = ([None if t is None else t.detach() for t in ts] for ts in (As, Bs, ms))
    idx = torch.tensor([0, -1, 2, 1, 0, 2], device=DEVICE)
    monkeypatch.setattr(kdecode, "decode_linear", partial(kdecode.decode_linear, split_k=3))
    shrink = mock.Mock(wraps=kml.multi_shrink)
    monkeypatch.setattr(kml, "multi_shrink", shrink)
    with torch.no_grad():
        y = peft_ops.lora_linear_multi(x, w4, As, Bs, [0.5, 1.0, 0.75], idx, magnitude=ms)
    assert not shrink.called
    y_ref = reference.lora_linear_multi(x, w4, As, Bs, [0.5, 1.0, 0.75], idx, magnitudes=ms)
    assert_close(y, y_ref, TOL[dtype], "y without grad, shrink in the decode")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("M", [6, 70], ids=["decode", "sorted"])
def test_one_adapter_for_every_row_is_lora_linear(backend, dora, M):
    # same op, same dropout masks (same seed), same numbers as the single-adapter path
    gen = torch.Generator().manual_seed(1)
    N, K, r = 16, 24, 3
    weight = peft_ops.NF4Weight.quantize(torch.randn(N, K, generator=gen).to(DEVICE))
    x = torch.randn(M, K, generator=gen).to(DEVICE).requires_grad_()
    (A,), (B,), (m,) = make_adapters(1, N, K, [r], [dora], gen)
    b = torch.randn(N, generator=gen).to(DEVICE).requires_grad_()
    kw = dict(bias=b, dropout=0.1, training=True, seed=1234)
    y = peft_ops.lora_linear_multi(x, weight, [A], [B], 0.75, torch.zeros(M, dtype=torch.long),
                                   magnitude=[m], **kw)
    y1 = peft_ops.lora_linear(x, weight, A, B, 0.75, magnitude=m, **kw)
    torch.testing.assert_close(y, y1, rtol=2e-5, atol=2e-5)
    dy = torch.randn(M, N, generator=gen).to(DEVICE)
    params = [x, A, B, b] + ([m] if dora else [])
    for g, g1 in zip(torch.autograd.grad(y, params, dy), torch.autograd.grad(y1, params, dy)):
        torch.testing.assert_close(g, g1, rtol=2e-5, atol=2e-5)


def test_rows_of_no_adapter_get_the_base_output(backend):
    gen = torch.Generator().manual_seed(2)
    N, K = 12, 20
    w = torch.randn(N, K, generator=gen).to(DEVICE)
    b = torch.randn(N, generator=gen).to(DEVICE)
    As, Bs, ms = make_adapters(2, N, K, [2, 3], [True, False], gen)
    x = torch.randn(5, K, generator=gen).to(DEVICE)
    with torch.no_grad():
        y = peft_ops.lora_linear_multi(x, w, As, Bs, 1.0, [-1, 0, -1, 1, -1], bias=b, magnitude=ms)
    torch.testing.assert_close(y[[0, 2, 4]], torch.nn.functional.linear(x[[0, 2, 4]], w, b), rtol=1e-5, atol=1e-5)


def test_stacked_adapters_equal_listed(backend):
    gen = torch.Generator().manual_seed(4)
    E, N, K, r = 3, 16, 24, 4
    w = torch.randn(N, K, generator=gen).to(DEVICE)
    A = torch.randn(E, r, K, generator=gen).to(DEVICE)
    B = torch.randn(E, N, r, generator=gen).to(DEVICE)
    m = (torch.rand(E, N, generator=gen) + 0.5).to(DEVICE)
    s = torch.tensor([0.5, 1.0, 2.0])
    x = torch.randn(7, K, generator=gen).to(DEVICE)
    idx = torch.tensor([2, 0, 1, 1, -1, 0, 2])
    with torch.no_grad():
        y = peft_ops.lora_linear_multi(x, w, A, B, s, idx, magnitude=m)
        y_list = peft_ops.lora_linear_multi(x, w, list(A), list(B), s.tolist(), idx.tolist(), magnitude=list(m))
    torch.testing.assert_close(y, y_list)


def test_empty_batch_stays_in_the_graph():
    gen = torch.Generator().manual_seed(0)
    As, Bs, ms = make_adapters(2, 8, 16, [2, 2], [True, False], gen)
    x = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    y = peft_ops.lora_linear_multi(x, torch.randn(8, 16, device=DEVICE), As, Bs, 1.0,
                                   torch.zeros(0, dtype=torch.long), magnitude=ms)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert all(t.grad is not None and not t.grad.any() for t in As + Bs + [ms[0]])


def test_bad_inputs_are_refused():
    gen = torch.Generator().manual_seed(0)
    As, Bs, _ = make_adapters(2, 8, 16, [2, 3], [False, False], gen)
    w, x = torch.randn(8, 16, device=DEVICE), torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"adapter_index: values must lie in \[-1, 2\)"):
        peft_ops.lora_linear_multi(x, w, As, Bs, 1.0, [0, 1, 2, 0])
    with pytest.raises(ValueError, match="adapter_index: expected shape"):
        peft_ops.lora_linear_multi(x, w, As, Bs, 1.0, [0, 1])
    with pytest.raises(TypeError, match="adapter_index"):
        peft_ops.lora_linear_multi(x, w, As, Bs, 1.0, torch.zeros(4))
    with pytest.raises(ValueError, match=r"lora_B\[1\]: expected shape \[8, 3\]"):
        peft_ops.lora_linear_multi(x, w, As, [Bs[0], Bs[0]], 1.0, [0, 1, 0, 1])
    with pytest.raises(ValueError, match="scaling: expected one number per adapter"):
        peft_ops.lora_linear_multi(x, w, As, Bs, [1.0], [0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"magnitude\[0\]"):
        peft_ops.lora_linear_multi(x, w, As, Bs, 1.0, [0, 1, 0, 1], magnitude=[torch.ones(3), None])


def test_adapters_of_mixed_dtypes(backend):
    # fp32 and bf16 adapters in one batch: read as fp32 (the kernels take one adapter dtype)
    gen = torch.Generator().manual_seed(6)
    N, K = 16, 24
    w = torch.randn(N, K, generator=gen).to(DEVICE)
    A0, B0 = torch.randn(2, K, generator=gen).to(DEVICE), torch.randn(N, 2, generator=gen).to(DEVICE)
    A1, B1 = (torch.randn(3, K, generator=gen).to(DEVICE, torch.bfloat16),
              torch.randn(N, 3, generator=gen).to(DEVICE, torch.bfloat16))
    x = torch.randn(4, K, generator=gen).to(DEVICE)
    with torch.no_grad():
        y = peft_ops.lora_linear_multi(x, w, [A0, A1], [B0, B1], 1.0, [0, 1, 1, 0])
        y_ref = reference.lora_linear_multi(x, w, [A0, A1], [B0, B1], [1.0, 1.0], torch.tensor([0, 1, 1, 0]))
    assert_close(y, y_ref, TOL[torch.float32], "y")


# --- DoRA's no-grad row-norm cache ---------------------------------------------------------------

@pytest.fixture
def counted_norms(monkeypatch):
    """Counts the row norms the no-grad cache computes."""
    calls = []
    real = functional.dora_norm

    def counting(*args):
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(functional, "dora_norm", counting)
    return calls


def dora_layer(seed=0, nf4=True):
    torch.manual_seed(seed)
    base = nn.Linear(32, 24)
    if nf4:
        base = peft_ops.NF4Linear.from_linear(base)
    layer = peft_ops.LoraLinear(base, r=4, lora_alpha=8, use_dora=True, init_lora_weights=False).to(DEVICE)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.0 + 0.1 * torch.rand_like(layer.lora_magnitude_vector))
    return layer.eval()


def fresh(layer, x):
    """The layer's output computed from scratch by the reference (no cache anywhere)."""
    from peft_ops.modules import base_weight_nk
    return reference.lora_linear(x, base_weight_nk(layer.base_layer), layer.lora_A, layer.lora_B, layer.scaling,
                                 bias=layer.base_layer.bias, magnitude=layer.lora_magnitude_vector,
                                 compute_dtype=torch.float32)


def test_no_grad_dora_computes_the_norm_once_and_again_when_an_input_changes(backend, counted_norms):
    layer = dora_layer()
    x = torch.randn(3, 32, device=DEVICE)
    with torch.no_grad():
        for _ in range(3):
            assert_close(layer(x), fresh(layer, x), TOL[torch.float32], "y")
        assert len(counted_norms) == 1
        layer.lora_A.add_(0.1)                               # an optimizer step's in-place update
        assert_close(layer(x), fresh(layer, x), TOL[torch.float32], "y after A changed")
        assert len(counted_norms) == 2
        layer.lora_B.mul_(1.5)
        assert_close(layer(x), fresh(layer, x), TOL[torch.float32], "y after B changed")
        assert len(counted_norms) == 3
        layer.lora_magnitude_vector.mul_(0.5)                # m/n again, n kept
        assert_close(layer(x), fresh(layer, x), TOL[torch.float32], "y after m changed")
        assert len(counted_norms) == 3
        layer.scaling = 3.0
        assert_close(layer(x), fresh(layer, x), TOL[torch.float32], "y after the scaling changed")
        assert len(counted_norms) == 4
        layer.base_layer.weight = peft_ops.NF4Weight.quantize(torch.randn(24, 32, device=DEVICE))
        assert_close(layer(x), fresh(layer, x), TOL[torch.float32], "y after the base changed")
        assert len(counted_norms) == 5
        layer.load_state_dict({k: v * 0.9 for k, v in layer.state_dict().items() if "lora_A" in k}, strict=False)
        assert_close(layer(x), fresh(layer, x), TOL[torch.float32], "y after load_state_dict")
        assert len(counted_norms) == 6


def test_training_never_reads_the_cached_norm(backend, counted_norms):
    layer = dora_layer()
    x = torch.randn(3, 32, device=DEVICE)
    with torch.no_grad():
        layer(x)
    with torch.no_grad():
        layer.lora_A.data.add_(0.5)     # through .data: invisible to the version counter
    layer.train()
    y = layer(x)                        # grad enabled: n computed afresh, never the stale cache
    assert_close(y.detach(), fresh(layer, x).detach(), TOL[torch.float32], "training forward")
    y.sum().backward()
    assert len(counted_norms) == 1      # the training step did not go through the cache
    layer.eval()
    layer_cache(layer).clear()          # what to do after writes through .data (DoraNormCache docs)
    with torch.no_grad():
        assert_close(layer(x), fresh(layer, x), TOL[torch.float32], "after clear()")


def test_the_cache_holds_n_floats_and_copies_start_empty():
    layer = dora_layer(nf4=False)
    x = torch.randn(2, 32, device=DEVICE)
    with torch.no_grad():
        y = layer(x)
    held = [t for t in vars(layer_cache(layer).norm_cache("default")).values() if isinstance(t, torch.Tensor)]
    assert held and all(t.shape == (24,) for t in held)       # n and m/n: N floats each, no weight
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert not any(isinstance(t, torch.Tensor) for t in vars(layer_cache(clone).norm_cache("default")).values())
        with torch.no_grad():
            torch.testing.assert_close(clone(x), y)


def test_functional_norm_cache_is_only_read_without_grad(counted_norms):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 24, generator=gen)
    (A,), (B,), (m,) = make_adapters(1, 16, 24, [3], [True], gen)
    cache, x = peft_ops.DoraNormCache(), torch.randn(2, 24, generator=gen)
    y = peft_ops.lora_linear(x, w, A, B, 0.5, magnitude=m, norm_cache=cache)
    assert counted_norms == []         # grad enabled: not even filled
    with torch.no_grad():
        y0 = peft_ops.lora_linear(x, w, A, B, 0.5, magnitude=m, norm_cache=cache)
        y1 = peft_ops.lora_linear(x, w, A, B, 0.5, magnitude=m, norm_cache=cache)
    assert len(counted_norms) == 1
    torch.testing.assert_close(y0, y.detach())
    torch.testing.assert_close(y1, y0)
    with pytest.raises(TypeError, match="norm_cache"):
        peft_ops.lora_linear(x, w, A, B, 0.5, magnitude=m, norm_cache={})


def test_multi_cache_reads_each_adapter_norm_once(backend, counted_norms):
    gen = torch.Generator().manual_seed(8)
    N, K = 16, 24
    w = peft_ops.NF4Weight.quantize(torch.randn(N, K, generator=gen))
    As, Bs, ms = make_adapters(3, N, K, [2, 3, 4], [True, True, False], gen)
    cache = peft_ops.MultiAdapterCache()
    x = torch.randn(6, K, generator=gen)
    with torch.no_grad():
        ys = [peft_ops.lora_linear_multi(x, w, As, Bs, 1.0, [0, 1, 2, -1, 1, 0], magnitude=ms, cache=cache)
              for _ in range(3)]
        y_ref = reference.lora_linear_multi(x, w, As, Bs, [1.0] * 3, torch.tensor([0, 1, 2, -1, 1, 0]),
                                            magnitudes=ms)
    assert len(counted_norms) == 2     # the two DoRA adapters, once each
    for y in ys:
        assert_close(y, y_ref, TOL[torch.float32], "y")


# --- LoraLinear and PEFT layers with adapter_names ------------------------------------------------

def test_lora_linear_takes_adapter_names(backend):
    layer = dora_layer()
    x = torch.randn(4, 3, 32, device=DEVICE)
    names = ["default", "__base__", "default", "other"]
    with torch.no_grad():
        y = layer(x, adapter_names=names)
        torch.testing.assert_close(y[[0, 2]], layer(x[[0, 2]]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[[1, 3]], layer.base_layer(x[[1, 3]]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        layer(x, adapter_names=["default"])


peft = pytest.importorskip("peft", reason="PEFT's mixed batch is the reference")
from peft import LoraConfig, get_peft_model  # noqa: E402


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 48)
        self.down = nn.Linear(48, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def peft_model(use_dora, seed=0, quantize=False):
    """A PEFT model with three adapters of different ranks and alphas (random B, m != n)."""
    torch.manual_seed(seed)
    base = TwoLayers()
    if quantize:
        bnb = pytest.importorskip("bitsandbytes", reason="QLoRA bases are bitsandbytes Linear4bit")
        for name in ("up", "down"):
            lin = getattr(base, name)
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            setattr(base, name, q.to("cpu"))
        base.is_loaded_in_4bit = True
    cfg = dict(target_modules=["up", "down"], use_dora=use_dora, init_lora_weights=False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **cfg), adapter_name="one")
    model.add_adapter("two", LoraConfig(r=2, lora_alpha=3, **cfg))
    model.add_adapter("three", LoraConfig(r=6, lora_alpha=6, **cfg))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand_like(p))
    return model.eval()


NAMES = ["one", "__base__", "three", "two", "one", "three"]


class adapter_names_into_layers:
    """Passes `adapter_names` straight to every LoRA layer's forward (as PEFT's model-level call
    does through the same kind of hook; PEFT's model refuses the argument in training mode, its
    layers take it)."""

    def __init__(self, model, names):
        self.model, self.names, self.handles = model, names, []

    def __enter__(self):
        for module in self.model.modules():
            if hasattr(module, "_mixed_batch_forward") and hasattr(module, "lora_A"):
                self.handles.append(module.register_forward_pre_hook(
                    lambda mod, args, kwargs: (args, dict(kwargs, adapter_names=self.names)), with_kwargs=True))

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def peft_mixed(model, x, names):
    """PEFT's own mixed batch: its layers' `_mixed_batch_forward` (PEFT refuses DoRA at the model
    level, but its per-adapter loop computes DoRA rows all the same)."""
    hooks = []
    for module in model.modules():
        if hasattr(module, "_mixed_batch_forward") and hasattr(module, "lora_A"):
            hooks.append(module.register_forward_hook(
                lambda mod, args, out: mod._mixed_batch_forward(args[0], adapter_names=names)))
    try:
        return model(x)
    finally:
        for h in hooks:
            h.remove()


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused mixed-batch calls the converted layers make (a silent fallback to PEFT's
    path would compare PEFT with itself)."""
    import peft_ops.convert as convert
    calls, real = [], convert.fused_lora_linear_multi

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(convert, "fused_lora_linear_multi", counting)
    return calls


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "bnb4bit"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_from_peft_mixed_batch_equals_peft(backend, use_dora, quantize, fused_calls):
    theirs, ours = peft_model(use_dora, quantize=quantize), peft_model(use_dora, quantize=quantize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_ops.from_peft(ours)
    x = torch.randn(len(NAMES), 5, 32)
    with torch.no_grad():
        want = peft_mixed(theirs, x, NAMES)
        with warnings.catch_warnings():
            warnings.simplefilter("error")        # the fused path: no fallback warning
            got = ours(x, adapter_names=NAMES)
            again = ours(x, adapter_names=NAMES)  # from the caches
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, got)
    assert len(fused_calls) == 4          # two layers, two calls
    if not use_dora:   # PEFT's model-level call itself
        with torch.no_grad():
            torch.testing.assert_close(got, theirs(x, adapter_names=NAMES), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_from_peft_mixed_batch_training_grads_equal_peft(backend, use_dora, fused_calls):
    # gradients reach each adapter from its own rows only, as PEFT's per-adapter loop gives them
    theirs, ours = peft_model(use_dora, seed=3), peft_model(use_dora, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_ops.from_peft(ours)
    for model in (theirs, ours):
        model.train()
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    x = torch.randn(len(NAMES), 3, 32)
    names = ["one", "__base__", "one", "three", "three", "__base__"]   # "two" gets no rows: no gradient
    grads = []
    def fused(model):
        with adapter_names_into_layers(model, names):
            return model(x)
    for model, run in ((theirs, lambda m: peft_mixed(m, x, names)), (ours, fused)):
        model.zero_grad(set_to_none=True)
        run(model).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, g_ref in grads[0].items():
        g = grads[1][name]
        if g_ref is None or ".two" in name:
            assert g is None or not g.abs().any(), name
        else:
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert len(fused_calls) == 2


def test_from_peft_mixed_batch_with_hooks_warns_and_falls_back():
    ours = peft_model(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_ops.from_peft(ours)
    ours.base_model.model.up.lora_A["one"].register_forward_hook(lambda *a: None)
    x = torch.randn(len(NAMES), 32)
    with pytest.warns(UserWarning, match="falling back to PEFT's unfused LoRA forward: hooks on lora_A"):
        with torch.no_grad():
            got = ours(x, adapter_names=NAMES)
    theirs = peft_model(False)
    with torch.no_grad():
        torch.testing.assert_close(got, theirs(x, adapter_names=NAMES), rtol=1e-5, atol=1e-5)


def test_generate_with_adapter_names_runs_fused_and_equals_peft():
    transformers = pytest.importorskip("transformers", reason="generate is transformers'")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)

    def build():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        cfg = dict(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, **cfg), adapter_name="one")
        model.add_adapter("two", LoraConfig(r=2, lora_alpha=8, **cfg))
        return model.eval()

    theirs, ours = build(), build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_ops.from_peft(ours)
    calls = []
    for module in ours.modules():
        if hasattr(module, "_peft_ops_mixed_forward"):
            module._peft_ops_mixed_forward = (lambda f: lambda *a: calls.append(1) or f(*a))(
                module._peft_ops_mixed_forward)
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=3, do_sample=False, adapter_names=["one", "__base__", "two"], pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ours.generate(input_ids=ids, **kw)
    assert torch.equal(got, theirs.generate(input_ids=ids, **kw))
    assert calls, "generate did not reach the fused mixed-batch path"


# --- the bench and the static model --------------------------------------------------------------

def test_serving_cases_run_in_the_bench(tmp_path):
    from bench import cases as C
    from bench.providers import PROVIDERS
    from bench.suite import Config, run_suite

    cases = C.shape_set("tiny", ["qlora", "qdora", "qlora_mixed", "qdora_mixed"], ["decode", "prefill"])
    assert {c.op for c in cases} >= {"qlora_mixed", "qdora_mixed"} and any(c.mode == "prefill" for c in cases)
    cfg = Config(device="cpu", cases=cases, providers=list(PROVIDERS), out_dir=str(tmp_path), cpu_rounds=2,
                 cpu_warmup=0, memory_table=False, plots=False, quiet=True)
    report = run_suite(cfg)
    errors = [s for s in report.skipped if "unsupported" not in s[2]]
    assert errors == [], errors
    metrics = {(r["op"], r["mode"], r["metric"]) for r in report.rows if r["provider"] == "peft_ops"}
    assert ("qdora", "prefill", "ratio_vs_peft_ops_lora") in metrics
    assert ("qlora_mixed", "decode", "ratio_vs_peft_ops_one_adapter") in metrics
    if "peft_bnb" in PROVIDERS and PROVIDERS["peft_bnb"].missing() is None:
        assert ("qdora_mixed", "decode", "ratio_vs_peft_bnb") in metrics
    assert "Serving targets" in report.summary


def test_every_mixed_kernel_has_a_loop_table():
    from bench import model
    from peft_ops.kernels import multi_lora

    kernels = {n for n, o in vars(multi_lora).items()
               if type(o).__name__ in ("JITFunction", "InterpretedFunction") and n.endswith("_kernel")}
    assert kernels and kernels <= set(model.LOOPS)


def test_decode_expand_tiles_fill_a_wave_without_spilling(monkeypatch):
    # The GPU's rule for the expand at decode sizes (a program an adapter): about one wave of
    # programs, 64 to 256 columns, and no wider than the decode GEMM's unrolled parts can sum in
    # registers (columns x parts at most 1024 above 64 columns).
    from peft_ops.kernels import multi_lora

    monkeypatch.setattr(multi_lora, "interpreting", lambda: False)
    monkeypatch.setattr(multi_lora, "_sms", lambda device: 132)
    cpu = torch.device("cpu")
    assert multi_lora._expand_tiles(16, 1024, 8, cpu, 32) == (16, 64)       # 16 tiles x 8 adapters
    assert multi_lora._expand_tiles(16, 4096, 8, cpu, 8) == (16, 128)      # 256 wide would spill
    assert multi_lora._expand_tiles(16, 4096, 8, cpu, 2) == (16, 256)
    assert multi_lora._expand_tiles(16, 14336, 8, cpu, 2) == (16, 256)
    assert multi_lora._expand_tiles(16, 14336, 1, cpu, 2) == (16, 128)     # one adapter: 112 tiles
    assert multi_lora._expand_tiles(16, 4096, None, cpu) == (16, 128)      # rows sorted: no adapter grid
    assert multi_lora._expand_tiles(48, 4096, 8, cpu, 2) == (32, 64)
    for cols in (1, 100, 1024, 4096, 14336, 65536):
        for adapters in (1, 3, 8, 64, 200):
            for parts in (1, 2, 8, 32):
                _, n = multi_lora._expand_tiles(16, cols, adapters, cpu, parts)
                assert 64 <= n <= 256 and (n == 64 or n * parts <= 1024)


STATIC_CHILD = r"""
import json, sys
sys.path.insert(0, {root!r})
from bench import cases as C, lowering, model
if lowering.available():
    print(json.dumps({{"unavailable": lowering.available()}})); sys.exit(0)
m, out = model.Model(2), {{}}
for case in (C.Case("qdora_mixed", "decode", 16, 1024, 1024, 16, adapters=8),
             C.Case("qdora", "decode", 16, 1024, 1024, 16), C.Case("qdora", "prefill", 512, 1024, 1024, 16),
             C.Case("qlora", "prefill", 512, 1024, 1024, 16)):
    p = m.predict(case, "peft_ops", model.H200)
    out[case.label()] = [p.seconds, [c.what for c in p.costs]]
print(json.dumps(out))
"""


def test_static_model_costs_the_serving_cases(tmp_path):
    # every launch of the serving cases matches its loop table (no ModelError), no row norm is
    # launched without grad once the cache is warm, and the decode steps run a fixed set of launches
    env = dict(os.environ, TRITON_INTERPRET="0", PEFT_OPS_MODEL_CACHE=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", STATIC_CHILD.format(root=ROOT)], env=env, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    out = __import__("json").loads(run.stdout.strip().splitlines()[-1])
    if "unavailable" in out:
        pytest.skip(out["unavailable"])
    # at decode sizes the decode GEMM forms the shrink in its own programs: two launches a step
    mixed = out["qdora_mixed decode M=16 N=1024 K=1024 r=16 adapters=8"]
    assert mixed[1] == ["_decode_linear_kernel", "_multi_expand_kernel"], mixed[1]
    one = out["qdora decode M=16 N=1024 K=1024 r=16"]
    assert one[1] == ["_decode_linear_kernel", "_split_k_epilogue_kernel"], one[1]
    for label, (seconds, launches) in out.items():
        assert seconds > 0 and "_row_norm_kernel" not in launches, (label, launches)
