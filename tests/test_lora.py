"""Fused LoRA / DoRA linear (`peft_ops.lora_linear`) against the fp64 reference.

Every test runs both backends the package has on CPU: the Triton kernels (in the interpreter,
TRITON_INTERPRET=1 from conftest) and the plain-PyTorch twins. On a GPU machine run
`TRITON_INTERPRET=0 PEFT_OPS_TEST_DEVICE=cuda pytest tests/test_lora.py` to put the same cases on
the compiled kernels and real tensor cores. Tolerances are normwise: the largest error over the
largest reference magnitude, see `TOL`.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peft_ops
from peft_ops import ops, reference
from peft_ops.kernels import _config
from peft_ops.kernels import lora as klora

# Normwise tolerances per activation dtype. fp32: the kernels accumulate in fp32 over at most a few
# hundred terms (error ~ sqrt(K)·2⁻²⁴ ≪ 1e-5). fp16/bf16: the output and dx are rounded once to
# the dtype (2⁻¹¹ / 2⁻⁸ relative), and dx/DoRA's g = dy·m/n round one more operand: two half-ulps
# plus accumulation, so 4 ulps of headroom.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Adapter gradients are fp32 sums of products of inputs that are exact in the activation dtype;
# with fp32 adapters they see only the rounding of dy/x they share with the reference.
ADAPTER_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DEVICE = torch.device(os.environ.get("PEFT_OPS_TEST_DEVICE", "cpu"))


@pytest.fixture(params=["triton", "triton-decode-once", "triton-lut", "twin"])
def backend(request, monkeypatch):
    """Run the test on the Triton kernels (interpreter) as the strategy rule picks them; on them
    with the decode-once GEMMs, or the table-lookup decode, pinned wherever a call can take them
    (small shapes would otherwise reach them rarely); or on the PyTorch twins, with fp32 GEMMs on
    every CPU (the arithmetic these tolerances are derived for; tests/test_cpu_path.py checks the
    bf16 GEMMs that CPUs with bf16 units, and one-row products, get by default)."""
    monkeypatch.delenv("PEFT_OPS_STRATEGY", raising=False)
    if request.param == "twin":
        monkeypatch.setattr(ops, "use_triton", lambda t: False)
        monkeypatch.setenv("PEFT_OPS_CPU_PRECISION", "fp32")
    else:
        assert _config.interpreting() or DEVICE.type == "cuda", "tests/conftest.py sets TRITON_INTERPRET=1"
        if request.param == "triton-decode-once":
            monkeypatch.setenv("PEFT_OPS_STRATEGY", "dequant_gemm")
        elif request.param == "triton-lut":
            monkeypatch.setenv("PEFT_OPS_STRATEGY", "fused_lut")
    return request.param


def assert_close(actual, expected, tol, what):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * max(scale, 1e-6), f"{what}: max error {err:.3e} > {tol:.1e} × {scale:.3e}"


def make_weight(N, K, dtype, nf4, blocksize=64, gen=None):
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(DEVICE, dtype)
    if nf4:
        return peft_ops.NF4Weight.quantize(w, blocksize=blocksize, double_quant=True)
    return w


def run_case(*, lead, N, K, r, dtype, adapter_dtype, nf4, dora, bias, p, noncontig=False,
             blocksize=64, seed=7, scaling=0.5, dy_kind="random", magnitude=None):
    """Forward + backward through lora_linear and through the reference; compare all of it."""
    gen = torch.Generator().manual_seed(seed)
    weight = make_weight(N, K, dtype, nf4, blocksize, gen)
    if noncontig:   # x as a transposed view: last dim has stride != 1
        x = torch.randn(*lead[:-1], K, lead[-1], generator=gen).to(DEVICE, dtype).transpose(-1, -2)
    else:
        x = torch.randn(*lead, K, generator=gen).to(DEVICE, dtype)
    x.requires_grad_()
    A = (torch.randn(r, K, generator=gen) / K**0.5).to(DEVICE, adapter_dtype).requires_grad_()
    B = torch.randn(N, r, generator=gen).to(DEVICE, adapter_dtype).requires_grad_()
    b = torch.randn(N, generator=gen).to(DEVICE, dtype).requires_grad_() if bias else None
    m = None
    if dora:
        m = magnitude if magnitude is not None else torch.rand(N, generator=gen) + 0.5
        m = m.to(DEVICE).clone().requires_grad_()
    leaves = [t for t in (x, A, B, m, b) if t is not None]
    names = [n for n, t in zip("x A B m bias".split(), (x, A, B, m, b)) if t is not None]

    y = peft_ops.lora_linear(x, weight, A, B, scaling, bias=b, magnitude=m, dropout=p,
                             training=True, seed=1234)
    if dy_kind == "sum":    # stride-0 incoming gradient
        y.float().sum().backward()
        dy = torch.ones_like(y)
    else:
        dy = torch.randn(y.shape, generator=gen).to(DEVICE, dtype)
        y.backward(dy)
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None

    M = x.numel() // K
    scale = ops.dropout_scale(1234, (M, K), p, DEVICE).reshape(x.shape) if p else None
    y_ref = reference.lora_linear(x, weight, A, B, scaling, bias=b, magnitude=m, dropout_scale=scale)
    y_ref.backward(dy)
    # DoRA's row norm is computed in fp32 and loses κ·2⁻²⁴ relative to cancellation in W + s·B A
    # (κ = ‖|W| + s|B||A|‖ / ‖W + s·B A‖ per row), as PEFT's does; everything scaled by m/n inherits it.
    extra = 16 * 2.0**-24 * norm_condition(weight, A, B, scaling) if dora else 0.0
    assert_close(y, y_ref, TOL[dtype] + extra, "y")
    for name, t, g in zip(names, leaves, grads):
        if name == "m":
            assert_magnitude_grad_close(g, t.grad, x, weight, A, B, scaling, scale, dy, dtype, extra)
            continue
        tol = TOL[dtype] if name in ("x", "bias") else ADAPTER_TOL[dtype]
        assert_close(g, t.grad, tol + (extra if name != "bias" else 0.0), f"d{name}")
    return y


def norm_condition(weight, A, B, scaling):
    c = torch.float64
    w = reference.dense_weight(weight, c)
    n = reference.dora_row_norm(weight, A, B, scaling).clamp_min(reference.DORA_EPS)
    absolute = torch.linalg.vector_norm(w.abs() + scaling * (B.detach().to(c).abs() @ A.detach().to(c).abs()), dim=1)
    return (absolute / n).max().item()


def assert_magnitude_grad_close(dm, dm_ref, x, weight, A, B, scaling, scale, dy, dtype, extra):
    """dm_j = Σ_i dy_ij z_ij / n_j is formed from z saved in the activation dtype (the memory
    budget has no room for fp32 z), so each term carries z's rounding: the error bound is
    u · Σ_i |dy_ij z_ij| / n_j, which cancellation in the sum can make far larger than |dm_j|."""
    assert dm.dtype == dm_ref.dtype and torch.isfinite(dm).all()
    c = torch.float64
    xd = x.detach().to(c) if scale is None else x.detach().to(c) * scale.to(c)
    w = reference.dense_weight(weight, c, decode_dtype=dtype)
    z = reference.lora_linear(xd, w, A.detach().to(c), B.detach().to(c), scaling)
    n = reference.dora_row_norm(weight, A, B, scaling).clamp_min(reference.DORA_EPS)
    bound = (dy.to(c).abs() * z.abs()).reshape(-1, z.shape[-1]).sum(0) / n
    err = (dm.to(c) - dm_ref.to(c)).abs()
    assert (err <= (TOL[dtype] + extra) * bound + 1e-6 * dm_ref.abs().max().to(c)).all(), \
        f"dm: errors {err.tolist()} exceed {TOL[dtype]} × {bound.tolist()}"


dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
dims = st.sampled_from([1, 2, 5, 16, 31, 33, 64, 67])
small_k = st.sampled_from([2, 16, 31, 64, 66, 97, 128, 256])   # 64, 128: one NF4 scale a tile row


@st.composite
def cases(draw):
    dtype = draw(dtypes)
    # 130 rows = 3 row tiles of 64, so the grouped tile order and edge tiles are exercised too.
    lead = draw(st.sampled_from([(1,), (3,), (17,), (64,), (130,), (2, 5), (3, 1, 7)]))
    nf4 = draw(st.booleans())
    return dict(
        lead=lead, N=draw(dims), K=draw(small_k), r=draw(st.sampled_from([1, 2, 3, 8, 16, 33, 64])),
        dtype=dtype, adapter_dtype=draw(st.sampled_from([torch.float32, dtype])), nf4=nf4,
        blocksize=draw(st.sampled_from([32, 64, 128])) if nf4 else 64,
        bias=draw(st.booleans()), p=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])),
        noncontig=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
        scaling=draw(st.sampled_from([0.25, 1.0, 2.0])),
    )


# The backend fixture only patches the dispatcher: sharing it across examples is intended.
shared_fixture = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])


@shared_fixture
@given(case=cases())
def test_lora_matches_reference(backend, case):
    run_case(dora=False, **case)


@shared_fixture
@given(case=cases())
def test_dora_matches_reference(backend, case):
    run_case(dora=True, **case)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_stride_zero_grad_3d(backend, nf4, dora):
    # y.sum().backward() hands backward an expanded gradient with all strides 0.
    run_case(lead=(2, 3), N=33, K=64, r=4, dtype=torch.float32, adapter_dtype=torch.float32,
             nf4=nf4, dora=dora, bias=True, p=0.1, dy_kind="sum")


@pytest.mark.parametrize("K", [63, 64])   # odd K: NF4 rows straddle bytes and quant blocks
def test_nf4_rows_straddle_blocks(backend, K):
    run_case(lead=(5,), N=7, K=K, r=3, dtype=torch.bfloat16, adapter_dtype=torch.float32,
             nf4=True, dora=True, bias=False, p=0.0, blocksize=32)


@pytest.mark.parametrize("blocksize", [64, 128])   # K a multiple of the block: one scale a tile row
def test_nf4_row_aligned_blocks(backend, blocksize):
    run_case(lead=(9,), N=19, K=256, r=4, dtype=torch.bfloat16, adapter_dtype=torch.float32,
             nf4=True, dora=True, bias=True, p=0.1, blocksize=blocksize)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("nf4", [False, True])
def test_rank_spans_several_chunks(backend, nf4, p):
    # The rank loops walk r in chunks of 16 (32 in the shrink and in dA with dropout): r = 40 ends each
    # of them on a partial chunk, in every kernel, with and without dropout.
    run_case(lead=(70,), N=23, K=96, r=40, dtype=torch.float32, adapter_dtype=torch.float32,
             nf4=nf4, dora=True, bias=True, p=p)
    run_case(lead=(3,), N=23, K=96, r=40, dtype=torch.bfloat16, adapter_dtype=torch.float32,
             nf4=nf4, dora=False, bias=False, p=p)


@pytest.mark.parametrize("N, K, r, blocksize", [(70, 256, 5, 64), (16, 384, 40, 128), (33, 128, 1, 32)])
def test_table_lookup_row_norm_matches_reference(N, K, r, blocksize):
    # K a multiple of 128 and of the block: the row norm decodes W as the table-lookup GEMM does and
    # reads A in the decoded tile's column order; a ragged N tile, the rank in one or two chunks
    from peft_ops.kernels import dora as kdora

    gen = torch.Generator().manual_seed(N + K)
    weight = make_weight(N, K, torch.bfloat16, True, blocksize, gen)
    A = torch.randn(r, K, generator=gen).to(DEVICE) / K**0.5
    B = torch.randn(N, r, generator=gen).to(DEVICE)
    assert kdora._lut_eligible(weight, N)
    got = kdora.row_norm(weight, A, B, 0.5)
    want = reference.dora_row_norm(weight, A, B, 0.5)
    assert got.dtype == torch.float32 and got.shape == (N,)
    bound = 16 * 2.0**-24 * norm_condition(weight, A, B, 0.5) * want.abs()
    assert ((got.double() - want).abs() <= bound).all(), (got.double() - want).abs().max().item()


@pytest.mark.parametrize("nf4", [False, True])
def test_dora_at_initialisation_is_the_base_layer_bitwise(backend, nf4):
    # Right after PEFT's initialisation (B = 0, m = ‖W + s·B A‖) m/n is exactly 1, so DoRA must give
    # the base layer's output to the last bit in fp32, as PEFT does: here the same call without
    # an adapter contribution (B = 0 through the LoRA path), bias included, on a 3-D input.
    gen = torch.Generator().manual_seed(4)
    N, K, r = 37, 96, 4
    weight = make_weight(N, K, torch.float32, nf4, gen=gen)
    x = torch.randn(2, 5, K, generator=gen).to(DEVICE)
    A, B = torch.randn(r, K, generator=gen).to(DEVICE), torch.zeros(N, r, device=DEVICE)
    bias = torch.randn(N, generator=gen).to(DEVICE)
    m = peft_ops.dora_row_norm(weight, A, B, 2.0)
    y_dora = peft_ops.lora_linear(x, weight, A, B, 2.0, bias=bias, magnitude=m)
    y_base = peft_ops.lora_linear(x, weight, A, B, 2.0, bias=bias)
    assert torch.equal(y_dora, y_base)


def test_eval_ignores_dropout(backend):
    gen = torch.Generator().manual_seed(0)
    x, W = torch.randn(9, 32, generator=gen), torch.randn(17, 32, generator=gen)
    A, B = torch.randn(4, 32, generator=gen), torch.randn(17, 4, generator=gen)
    y_eval = peft_ops.lora_linear(x, W, A, B, 2.0, dropout=0.5, training=False)
    y_none = peft_ops.lora_linear(x, W, A, B, 2.0, dropout=0.0, training=True)
    y_train = peft_ops.lora_linear(x, W, A, B, 2.0, dropout=0.5, training=True, seed=3)
    assert torch.equal(y_eval, y_none)
    assert not torch.allclose(y_train, y_none)


def test_deterministic(backend):
    gen = torch.Generator().manual_seed(1)
    W = peft_ops.NF4Weight.quantize(torch.randn(40, 96, generator=gen).to(DEVICE))
    x = torch.randn(3, 11, 96, generator=gen).to(DEVICE)
    A, B = torch.randn(8, 96, generator=gen).to(DEVICE), torch.randn(40, 8, generator=gen).to(DEVICE)
    m, b = torch.rand(40, generator=gen).to(DEVICE), torch.randn(40, generator=gen).to(DEVICE)

    def once():
        leaves = [t.clone().requires_grad_() for t in (x, A, B, m, b)]
        y = peft_ops.lora_linear(leaves[0], W, leaves[1], leaves[2], 0.5, bias=leaves[4],
                                 magnitude=leaves[3], dropout=0.2, training=True, seed=99)
        y.backward(torch.ones_like(y))
        return [y] + [t.grad for t in leaves]

    for a, c in zip(once(), once()):
        assert torch.equal(a, c)


@pytest.mark.parametrize("shape", [(37, 1001), (2, 3, 130), (129, 3)])
def test_dropout_stream_matches_triton_and_keep_rate(shape):
    # The twin's Philox reproduces the kernels' four-words-a-call stream bit for bit, so CPU and
    # GPU masks agree for a seed (rows of K % 4 != 0 and 3-D shapes included).
    triton_scale = ops.dropout_scale(2024, shape, 0.3, "cpu")     # interpreter: Triton kernel
    assert torch.equal(triton_scale > 0, ops.dropout_keep(2024, shape, 0.3))
    # Keep rate: n Bernoulli(0.7) draws, 5 sigma.
    n = triton_scale.numel()
    assert abs((triton_scale > 0).float().mean().item() - 0.7) < 5 * (0.21 / n) ** 0.5
    # Different seeds give different masks; values are exactly 0 or 1/(1-p).
    assert not torch.equal(triton_scale, ops.dropout_scale(2025, shape, 0.3, "cpu"))
    values = triton_scale.unique()
    assert values.numel() == 2 and values[0] == 0.0
    assert values[1] == torch.tensor(1 / 0.7, dtype=torch.float32)


def test_twin_dropout_keep_rate_large():
    # The four words of a call and the columns they land in are each Bernoulli(1 - p), and
    # neighbouring columns (words of one call) are uncorrelated.
    keep = ops.dropout_keep(7, (1000, 1000), 0.05).float()
    sigma = (0.05 * 0.95 / 1e6) ** 0.5
    assert abs(keep.mean().item() - 0.95) < 5 * sigma
    for j in range(4):
        assert abs(keep[:, j::4].mean().item() - 0.95) < 10 * sigma
    both = (keep[:, :-1] * keep[:, 1:]).mean().item()
    assert abs(both - 0.95 ** 2) < 10 * sigma


def test_triton_kernels_run_under_interpreter(monkeypatch):
    calls = []
    for name in ("lora_shrink", "fused_linear", "fused_linear_dx", "outer_reduce"):
        fn = getattr(klora, name)
        monkeypatch.setattr(klora, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    run_case(lead=(4,), N=8, K=16, r=2, dtype=torch.float32, adapter_dtype=torch.float32,
             nf4=True, dora=False, bias=True, p=0.0)
    assert {"lora_shrink", "fused_linear", "fused_linear_dx", "outer_reduce"} <= set(calls)


@pytest.mark.parametrize("dora", [False, True])
def test_split_k_paths_match_single_pass(dora):
    # The GPU picks split-K for decode-sized M; force it here so the interpreter covers it.
    gen = torch.Generator().manual_seed(5)
    W = peft_ops.NF4Weight.quantize(torch.randn(48, 200, generator=gen).to(DEVICE))
    x = torch.randn(3, 200, generator=gen).to(DEVICE)
    A, B = torch.randn(5, 200, generator=gen).to(DEVICE), torch.randn(48, 5, generator=gen).to(DEVICE)
    mn = torch.rand(48, generator=gen).to(DEVICE) if dora else None
    xd = torch.where(x > 0, x, 0.0) if dora else None
    xa1 = klora.lora_shrink(x, A, split_k=1)
    xa3 = klora.lora_shrink(x, A, split_k=3)
    torch.testing.assert_close(xa3, xa1, rtol=1e-6, atol=1e-6)
    one = klora.fused_linear(x, W, xa1, B, 0.5, mn=mn, xd=xd, inv_keep=2.0, save_z=dora, split_k=1)
    three = klora.fused_linear(x, W, xa1, B, 0.5, mn=mn, xd=xd, inv_keep=2.0, save_z=dora, split_k=3)
    for a, c in zip(one if dora else [one], three if dora else [three]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    r1 = klora.outer_reduce(x, B[:3], split_m=1)
    r2 = klora.outer_reduce(torch.cat([x] * 30), torch.cat([B[:3]] * 30), split_m=4)
    torch.testing.assert_close(r2, 30 * r1, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not (_config.interpreting() or DEVICE.type == "cuda"), reason="Triton kernels")
@pytest.mark.parametrize("shape", [(1, 5), (2, 1), (3, 1025), (7, 3, 333), (32, 2, 17)])
def test_split_parts_are_summed_in_order(shape):
    # A split reduction's parts, added part 0 first: equal bit for bit to that order in torch;
    # one part comes back as itself.
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[-1])
    parts = (torch.randn(shape, generator=gen) * torch.logspace(-6, 6, shape[-1])).to(DEVICE)
    want = parts[0].clone()
    for p in parts[1:]:
        want += p
    got = klora.sum_parts(parts)
    assert got.shape == parts.shape[1:] and torch.equal(got, want)
    if shape[0] == 1:
        assert got.data_ptr() == parts.data_ptr()
    with pytest.raises(ValueError, match="contiguous fp32"):
        klora.sum_parts(torch.randn(3, 4, 6, device=DEVICE)[:, :, ::2])
    with pytest.raises(ValueError, match="contiguous fp32"):
        klora.sum_parts(parts.double())


@pytest.mark.skipif(not (_config.interpreting() or DEVICE.type == "cuda"), reason="Triton kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_rank_kernels_are_fp32_accurate_beside_16_bit_activations(dtype, p):
    # The shrink and the dA / dB reductions multiply a 16-bit activation by an fp32 operand on the
    # tensor cores (bf16x3 for bf16, tf32x3 for fp16). Each must be as accurate as an fp32
    # product: within a few fp32 ulps of Σ|a||b| per output, far below one bf16 split term's loss
    # (2^-17), so a dropped term fails. With a scale and a per-row factor, and dropout's mask.
    from peft_ops.kernels.dropout import dropout_scale_tensor

    gen = torch.Generator().manual_seed(1)
    c = torch.float64
    M, K, R = 67, 300, 5
    x = torch.randn(M, K, generator=gen).to(DEVICE, dtype)
    A = torch.randn(R, K, generator=gen).to(DEVICE)
    gb = torch.randn(M, R, generator=gen).to(DEVICE)
    keep = (dropout_scale_tensor(3, (M, K), p, DEVICE) > 0) if p else torch.ones(M, K, dtype=torch.bool, device=DEVICE)
    xk = x.to(c) * keep / (1 - p)

    def check(got, ref, bound, what):
        rel = ((got.to(c) - ref).abs() / bound.clamp_min(1e-30)).max().item()
        assert rel <= 1e-6, f"{what}: error {rel:.2e} of Σ|a||b|"

    check(klora.lora_shrink(x, A, dropout=p, seed=3), xk @ A.to(c).t(), xk.abs() @ A.to(c).abs().t(), "shrink")
    f = torch.rand(R, generator=gen).to(DEVICE) + 0.5
    got = klora.outer_reduce(gb, x, dropout=p, seed=3, scale=0.75, factor=f)         # dA-shaped: r x K
    ref = 0.75 * f.to(c)[:, None] * (gb.to(c).t() @ xk)
    check(got, ref, 0.75 * f.to(c)[:, None] * (gb.to(c).abs().t() @ xk.abs()), "outer_reduce(gb, x)")
    f = torch.rand(K, generator=gen).to(DEVICE) + 0.5
    got = klora.outer_reduce(x, gb, scale=1.5, factor=f)                              # dB-shaped: N x r
    ref = 1.5 * f.to(c)[:, None] * (x.to(c).t() @ gb.to(c))
    check(got, ref, 1.5 * f.to(c)[:, None] * (x.to(c).abs().t() @ gb.to(c).abs()), "outer_reduce(dy, xa)")


def test_saved_tensors_are_small():
    # Backward keeps x, xa (M×r) and, for DoRA with a trainable magnitude, z (M×N): never a
    # dropout mask, never a dense weight.
    gen = torch.Generator().manual_seed(0)
    M, N, K, r = 64, 48, 96, 4
    W = peft_ops.NF4Weight.quantize(torch.randn(N, K, generator=gen))
    x = torch.randn(M, K, generator=gen, requires_grad=True)
    A = torch.randn(r, K, generator=gen, requires_grad=True)
    B = torch.randn(N, r, generator=gen, requires_grad=True)
    m = torch.rand(N, generator=gen, requires_grad=True)
    for mag, expected in ((None, M * K * 4 + M * r * 4), (m, M * K * 4 + M * r * 4 + M * N * 4 + N * 4)):
        saved = {}

        def pack(t):
            frozen = [v for v in vars(W).values() if isinstance(v, torch.Tensor)]
            if t.data_ptr() not in {p.data_ptr() for p in [A, B, m] + frozen}:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            peft_ops.lora_linear(x, W, A, B, 1.0, magnitude=mag, dropout=0.1, training=True)
        assert sum(saved.values()) == expected, saved


@pytest.mark.parametrize("magnitude", ["zero_rows", "zero_m", "huge", "tiny"])
def test_dora_extreme_magnitudes_and_zero_norm_rows(backend, magnitude):
    N, K, r = 9, 32, 2
    gen = torch.Generator().manual_seed(3)
    m = torch.rand(N, generator=gen) + 0.5
    if magnitude == "zero_m":
        m[::2] = 0.0
    elif magnitude == "huge":
        m = m * 1e4
    elif magnitude == "tiny":
        m = m * 1e-6
    if magnitude == "zero_rows":
        # rows whose W + s·B A is exactly zero: PEFT divides 0 by 0 here
        w = torch.randn(N, K, generator=gen)
        w[2] = 0.0
        w[5] = 0.0
        x = torch.randn(4, K, generator=gen, requires_grad=True)
        A = torch.randn(r, K, generator=gen, requires_grad=True)
        B = torch.randn(N, r, generator=gen)
        B[2] = 0.0
        B[5] = 0.0
        B.requires_grad_()
        mm = m.clone().requires_grad_()
        y = peft_ops.lora_linear(x, w, A, B, 1.0, magnitude=mm)
        y.backward(torch.ones_like(y))
        assert torch.isfinite(y).all() and torch.isfinite(mm.grad).all() and torch.isfinite(x.grad).all()
        assert torch.equal(y[:, 2], torch.zeros(4)) and mm.grad[2] == 0
        return
    run_case(lead=(4,), N=N, K=K, r=r, dtype=torch.float32, adapter_dtype=torch.float32, nf4=True,
             dora=True, bias=True, p=0.0, magnitude=m)


def test_bad_inputs():
    x, W = torch.randn(4, 8), torch.randn(6, 8)
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match="x: last dimension"):
        peft_ops.lora_linear(torch.randn(4, 7), W, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        peft_ops.lora_linear(x, W, torch.randn(2, 7), B, 1.0)
    with pytest.raises(ValueError, match=r"lora_B: expected shape \[6, 2\]"):
        peft_ops.lora_linear(x, W, A, torch.randn(6, 3), 1.0)        # r mismatch
    with pytest.raises(ValueError, match="weight: expected a 2-D"):
        peft_ops.lora_linear(x, torch.randn(6, 8, 1), A, B, 1.0)
    with pytest.raises(TypeError, match="x: expected float32"):
        peft_ops.lora_linear(x.long(), W, A, B, 1.0)
    with pytest.raises(TypeError, match="weight: dense weight dtype"):
        peft_ops.lora_linear(x, W.double(), A, B, 1.0)
    with pytest.raises(TypeError, match="weight: expected a dense"):
        peft_ops.lora_linear(x, "W", A, B, 1.0)
    with pytest.raises(ValueError, match="magnitude"):
        peft_ops.lora_linear(x, W, A, B, 1.0, magnitude=torch.ones(5))
    with pytest.raises(ValueError, match="bias"):
        peft_ops.lora_linear(x, W, A, B, 1.0, bias=torch.ones(5))
    with pytest.raises(ValueError, match="dropout"):
        peft_ops.lora_linear(x, W, A, B, 1.0, dropout=1.0)
    with pytest.raises(TypeError, match="scaling: expected a Python number or a 0-d float tensor"):
        peft_ops.lora_linear(x, W, A, B, torch.tensor([1.0]))
    with pytest.raises(TypeError, match="scaling"):
        peft_ops.lora_linear(x, W, A, B, torch.tensor(1))
    with pytest.raises(ValueError, match="lora_A: on meta"):
        peft_ops.lora_linear(x, W, A.to("meta"), B, 1.0)
    with pytest.raises(ValueError, match=r"weight: expected in_features K >= 1, got shape \(6, 0\)"):
        peft_ops.lora_linear(torch.randn(4, 0), torch.randn(6, 0), torch.randn(2, 0), B, 1.0)
    with pytest.raises(TypeError, match="dropout: expected a probability"):
        peft_ops.lora_linear(x, W, A, B, 1.0, dropout="0.1", training=True)


@pytest.mark.parametrize("seed, error, match", [
    (2**64, ValueError, r"seed: expected an int64 value"),
    (-(2**63) - 1, ValueError, r"seed: expected an int64 value"),
    (1.7, TypeError, r"seed: expected an int or a 0-d integer tensor, got float"),
    (True, TypeError, r"seed: .* got bool"),
    (torch.tensor([1, 2]), TypeError, r"seed: .* tensor of shape \(2,\)"),
    (torch.tensor(3.0), TypeError, r"seed: .* torch.float32 tensor"),
])
def test_bad_seed_is_refused_before_anything_runs(seed, error, match):
    x, W = torch.randn(4, 8), torch.randn(6, 8)
    A, B = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    with pytest.raises(error, match=match):
        peft_ops.lora_linear(x, W, A, B, 1.0, dropout=0.5, training=True, seed=seed)
    assert A.grad is None and B.grad is None


def test_int64_seed_range_is_accepted():
    x, W = torch.randn(4, 8), torch.randn(6, 8)
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    for seed in (2**63 - 1, -(2**63), torch.tensor(5, dtype=torch.int32)):
        peft_ops.lora_linear(x, W, A, B, 1.0, dropout=0.5, training=True, seed=seed)


def test_nf4_quantize_refuses_a_meta_tensor():
    with pytest.raises(ValueError, match="weight is a meta tensor"):
        peft_ops.NF4Weight.quantize(torch.empty(4, 64, device="meta"))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_tensor_scaling_equals_float_scaling(backend, dora):
    # PEFT's prepare_model_for_compiled_hotswap keeps the scaling as a 0-d tensor: the result and
    # every gradient must be those of the same number given as a float (up to fp32 rounding: s is
    # folded into B instead of scaling the product).
    gen = torch.Generator().manual_seed(4)
    x, W = torch.randn(5, 32, generator=gen).to(DEVICE), torch.randn(12, 32, generator=gen).to(DEVICE)
    A, B = torch.randn(4, 32, generator=gen).to(DEVICE), torch.randn(12, 4, generator=gen).to(DEVICE)
    m = (torch.rand(12, generator=gen) + 0.5).to(DEVICE) if dora else None

    def run(scaling):
        leaves = [t.clone().requires_grad_() for t in (x, A, B) + ((m,) if dora else ())]
        y = peft_ops.lora_linear(leaves[0], W, leaves[1], leaves[2], scaling,
                                 magnitude=leaves[3] if dora else None)
        y.backward(torch.ones_like(y))
        return [y] + [t.grad for t in leaves]

    for got, expected in zip(run(torch.tensor(0.75)), run(0.75)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_empty_batch_stays_in_the_graph():
    # An expert that receives no tokens: output [0, ..., N], and backward gives zero gradients
    # (not None) to every adapter, so DDP sees no unused parameter.
    x = torch.randn(0, 3, 8, requires_grad=True)
    A, B, m = (torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True),
               torch.rand(6, requires_grad=True))
    y = peft_ops.lora_linear(x, torch.randn(6, 8), A, B, 1.0, bias=torch.ones(6), magnitude=m)
    assert y.shape == (0, 3, 6)
    y.sum().backward()
    for t in (x, A, B, m):
        assert t.grad is not None and not t.grad.any()


def test_strided_bias(backend):
    # A bias that is a strided view (every other element of a buffer) must be read by its strides.
    gen = torch.Generator().manual_seed(2)
    x, W = torch.randn(5, 16, generator=gen), torch.randn(9, 16, generator=gen)
    A, B = torch.randn(2, 16, generator=gen), torch.randn(9, 2, generator=gen)
    bias = torch.randn(18, generator=gen)[::2]
    y = peft_ops.lora_linear(x, W, A, B, 1.0, bias=bias)
    torch.testing.assert_close(y, peft_ops.lora_linear(x, W, A, B, 1.0, bias=bias.contiguous()))


def test_trainable_dense_weight_is_refused():
    W = torch.randn(6, 8, requires_grad=True)
    with pytest.raises(ValueError, match="weight: the base weight is frozen"):
        peft_ops.lora_linear(torch.randn(4, 8), W, torch.randn(2, 8), torch.randn(6, 2), 1.0)
    with torch.no_grad():   # inference with a trainable tensor is fine
        peft_ops.lora_linear(torch.randn(4, 8), W, torch.randn(2, 8), torch.randn(6, 2), 1.0)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("nf4", [False, True])
def test_lora_without_grad_runs_the_ops_directly_to_the_same_result(monkeypatch, nf4, dora):
    # Without grad or dropout, LoRA and DoRA skip the autograd Function and the op layer (their
    # per-call cost matters at decode sizes): bit for bit what the Function computes (its K not
    # split here), as fresh and as shaped.
    from peft_ops import functional

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 40, generator=gen).to(DEVICE, torch.bfloat16)
    weight = peft_ops.NF4Weight.quantize(w) if nf4 else w
    x = torch.randn(2, 3, 40, generator=gen).to(DEVICE, torch.bfloat16)
    A = torch.randn(4, 40, generator=gen).to(DEVICE)
    B = torch.randn(24, 4, generator=gen).to(DEVICE)
    bias = torch.randn(24, generator=gen).to(DEVICE, torch.bfloat16)
    m = (torch.rand(24, generator=gen) + 0.5).to(DEVICE) if dora else None
    with torch.no_grad():
        direct = peft_ops.lora_linear(x, weight, A, B, 0.5, bias=bias, magnitude=m)
    via = peft_ops.lora_linear(x, weight, A, B.clone().requires_grad_(), 0.5, bias=bias, magnitude=m)
    assert via.grad_fn is not None
    assert torch.equal(direct, via.detach())
    assert direct.shape == (2, 3, 24) and direct._base is None and direct.is_contiguous()
    calls = []
    name = "DoraLinearFunction" if dora else "LoraLinearFunction"
    monkeypatch.setattr(getattr(functional, name), "apply", lambda *a: calls.append(a))
    with torch.no_grad():
        peft_ops.lora_linear(x, weight, A, B, 0.5, bias=bias, magnitude=m)
        assert not calls
        peft_ops.lora_linear(x, weight, A, B, 0.5, bias=bias, magnitude=m, dropout=0.1, training=True, seed=1)
        assert len(calls) == 1   # dropout in training keeps the Function's path
