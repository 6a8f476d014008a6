"""The strategies behind the base GEMM (`peft_ops.strategy`): the decode-once GEMMs against the
fp64 reference and against the fused kernels, their bounded buffers, the rule, the pin and its
warning. Kernels run in Triton's interpreter (TRITON_INTERPRET=1 from conftest)."""

import warnings
from unittest import mock

import pytest
import torch
import triton

import peft_ops
from peft_ops import strategy
from peft_ops.kernels import _config
from peft_ops.kernels import gemm as kgemm
from peft_ops.kernels import lora as klora

from test_lora import DEVICE, run_case

def _rows(n):
    """Output features for a direct decode-launcher test of `n` in the interpreter: a GPU's tiles
    are 128 rows (the interpreter's at most 64), so there the same tiling takes 8x as many."""
    return n if _config.interpreting() else 8 * n


pytestmark = pytest.mark.skipif(not (_config.interpreting() or DEVICE.type == "cuda"),
                                reason="the strategies run Triton kernels: in the interpreter (tests/conftest.py "
                                "sets TRITON_INTERPRET=1) or on a GPU (PEFT_OPS_TEST_DEVICE=cuda)")


@pytest.fixture(autouse=True)
def _rule_not_timing(monkeypatch):
    # on a GPU the strategy would be timed; these tests check the rule and the pins
    monkeypatch.setenv("PEFT_OPS_STRATEGY_TIMING", "0")


def _decisions(fn):
    before = strategy.counts()
    fn()
    return strategy.counts() - before


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "dense"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_decode_once_matches_reference(monkeypatch, nf4, dora, p):
    # 70 rows: two row tiles; N = 40 and K = 128: ragged N tiles
    monkeypatch.setenv("PEFT_OPS_STRATEGY", "dequant_gemm")
    made = _decisions(lambda: run_case(lead=(2, 35), N=40, K=128, r=6, dtype=torch.bfloat16,
                                       adapter_dtype=torch.float32, nf4=nf4, dora=dora, bias=True, p=p))
    assert made[("forward", "dequant_gemm", "pinned")] == 1, made
    assert made[("dx", "dequant_gemm", "pinned")] == 1, made
    # the rule decodes once for a dense weight (and an NF4 one the table lookup cannot take)
    monkeypatch.delenv("PEFT_OPS_STRATEGY")
    made = _decisions(lambda: run_case(lead=(70,), N=40, K=192, r=3, dtype=torch.bfloat16,
                                       adapter_dtype=torch.float32, nf4=nf4, dora=dora, bias=False, p=p))
    assert made[("forward", "dequant_gemm", "rule")] == 1, made
    assert made[("dx", "dequant_gemm", "rule")] == 1, made


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_table_lookup_gemm_matches_reference(monkeypatch, dora, p, dtype):
    # 70 rows (3-D): two row tiles, the second ragged; N = 40: ragged N tiles (a tile's rows past N
    # re-read the last one) in the forward and ragged reduction steps in dx; blocksize 32 and 256:
    # several scales a 128-wide tile row, and one scale for two tiles
    monkeypatch.delenv("PEFT_OPS_STRATEGY", raising=False)
    for blocksize in (32, 256):
        made = _decisions(lambda: run_case(lead=(2, 35), N=40, K=256, r=6, dtype=dtype, adapter_dtype=torch.float32,
                                           nf4=True, dora=dora, bias=True, p=p, blocksize=blocksize))
        assert made[("forward", "fused_lut", "rule")] == 1, made
        assert made[("dx", "fused_lut", "rule")] == 1, made


def test_table_lookup_gemm_is_the_decode_once_gemm():
    # the same decoded values (bitsandbytes', rounded once), in the same tensor-core GEMM with
    # the same epilogue: only the K order of the fp32 sums may differ
    gen = torch.Generator().manual_seed(11)
    M, N, K, R = 67, 48, 384, 5
    W = peft_ops.NF4Weight.quantize(torch.randn(N, K, generator=gen).to(DEVICE, torch.bfloat16), blocksize=64)
    x = torch.randn(M, K, generator=gen).to(DEVICE, torch.bfloat16)
    xa, B = torch.randn(M, R, generator=gen).to(DEVICE), torch.randn(N, R, generator=gen).to(DEVICE)
    mn = torch.rand(N, generator=gen).to(DEVICE) + 0.5
    xd = torch.where(torch.rand(M, K, generator=gen).to(DEVICE) > 0.3, x, torch.zeros((), dtype=x.dtype, device=DEVICE))
    for kw in (dict(bias=torch.randn(N, generator=gen).to(DEVICE, x.dtype)), dict(mn=mn, save_z=True),
               dict(mn=mn, xd=xd, inv_keep=1.5, save_z=True)):
        once = kgemm.gemm_forward(x, W, xa, B, 0.7, **kw)
        lut = kgemm.gemm_forward(x, W, xa, B, 0.7, backend="lut", **kw)
        again = kgemm.gemm_forward(x, W, xa, B, 0.7, backend="lut", **kw)
        for a, b, c in zip(*(t if isinstance(t, tuple) else (t,) for t in (once, lut, again))):
            assert torch.equal(b, c), f"{list(kw)}: not repeatable"
            torch.testing.assert_close(b.float(), a.float(), atol=4e-3 * a.abs().max().item(), rtol=0)
    dy = torch.randn(M, N, generator=gen).to(DEVICE, x.dtype)
    gb, A = torch.randn(M, R, generator=gen).to(DEVICE), torch.randn(R, K, generator=gen).to(DEVICE)
    for kw in (dict(), dict(dropout=0.3, seed=5), dict(col_scale=mn), dict(second_scale=mn - 1, dropout=0.2, seed=9)):
        once = kgemm.gemm_dx(dy, W, gb, A, 0.7, **kw)
        lut = kgemm.gemm_dx(dy, W, gb, A, 0.7, lut=True, **kw)
        assert torch.equal(lut, kgemm.gemm_dx(dy, W, gb, A, 0.7, lut=True, **kw)), f"dx {list(kw)}: not repeatable"
        torch.testing.assert_close(lut.float(), once.float(), atol=4e-3 * once.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_table_lookup_decode_matches_reference(monkeypatch, dora, dtype):
    # 21 rows (3-D input), N = 70: a ragged N tile; blocksize 32 and 256: several scales a
    # 128-wide tile row, and one scale for two tiles
    monkeypatch.delenv("PEFT_OPS_STRATEGY", raising=False)
    for blocksize in (32, 256):
        made = _decisions(lambda: run_case(lead=(3, 7), N=70, K=256, r=5, dtype=dtype, adapter_dtype=torch.float32,
                                           nf4=True, dora=dora, bias=True, p=0.0, blocksize=blocksize))
        assert made[("forward", "fused_lut", "rule")] == 1, made
        assert sum(n for (op, name, _), n in made.items() if op == "dx" and name == "fused") == 1, made


def test_split_k_table_lookup_equals_one_pass():
    from peft_ops.kernels import decode as kdecode

    gen = torch.Generator().manual_seed(3)
    N = _rows(48)
    W = peft_ops.NF4Weight.quantize(torch.randn(N, 512, generator=gen).to(DEVICE, torch.bfloat16), blocksize=64)
    x = torch.randn(5, 512, generator=gen).to(DEVICE, torch.bfloat16)
    xa, B = torch.randn(5, 4, generator=gen).to(DEVICE), torch.randn(N, 4, generator=gen).to(DEVICE)
    mn = torch.rand(N, generator=gen).to(DEVICE) + 0.5
    one = kdecode.decode_linear(x, W, xa, B, 0.5, mn=mn, save_z=True, split_k=1)
    three = kdecode.decode_linear(x, W, xa, B, 0.5, mn=mn, save_z=True, split_k=3)
    for a, b in zip(one, three):
        torch.testing.assert_close(b.float(), a.float(), atol=1e-2 * a.float().abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K,r,split_k,shrink_split_k", [
    (1, 48, 512, 16, 3, 4),     # both split: the epilogue sums the shrink's four parts
    (5, 70, 384, 5, 2, 3),      # ragged N tile, odd rank
    (17, 32, 512, 40, 4, 2),    # rank in two chunks (16 + 24 of 40), 17 rows
    (3, 32, 256, 1, 1, 2),      # GEMM not split: the shrink's parts are summed before it
])
def test_decode_forms_xa_from_lora_A(dtype, M, N, K, r, split_k, shrink_split_k):
    # Without grad the decode takes A instead of xa; split over K, its split-K epilogue sums the
    # shrink's parts itself (no launch before it does). Same result as given xa, to fp32 sums.
    from peft_ops.kernels import decode as kdecode

    gen = torch.Generator().manual_seed(M + N + r)
    N = _rows(N)
    W = peft_ops.NF4Weight.quantize(torch.randn(N, K, generator=gen).to(DEVICE, dtype), blocksize=64)
    x = torch.randn(M, K, generator=gen).to(DEVICE, dtype)
    A, B = torch.randn(r, K, generator=gen).to(DEVICE) / 8, torch.randn(N, r, generator=gen).to(DEVICE)
    bias = torch.randn(N, generator=gen).to(DEVICE, dtype)
    mn = torch.rand(N, generator=gen).to(DEVICE) + 0.5
    parts = klora.lora_shrink(x, A, split_k=shrink_split_k, sum_splits=False)
    assert parts.shape == (shrink_split_k, M, r)   # (each K / split here a whole number of the shrink's K steps)
    torch.testing.assert_close(parts.sum(0), klora.lora_shrink(x, A), atol=1e-5, rtol=1e-5)
    for kw in (dict(bias=bias), dict(mn=mn, save_z=True)):
        given = kdecode.decode_linear(x, W, klora.lora_shrink(x, A), B, 0.5, split_k=split_k, **kw)
        formed = kdecode.decode_linear(x, W, None, B, 0.5, split_k=split_k, lora_A=A, shrink_split_k=shrink_split_k,
                                       **kw)
        xa64 = x.double() @ A.double().t()
        base = x.double() @ W.dequantize(dtype).double().t()
        z64 = base + 0.5 * xa64 @ B.double().t()
        want = (z64 + bias.double(),) if "bias" in kw else (mn.double() * z64, z64)
        for got, ref, exact in zip(formed if isinstance(formed, tuple) else (formed,),
                                   given if isinstance(given, tuple) else (given,), want):
            assert got.dtype == dtype and got.shape == (M, N)
            scale = exact.abs().max().item()
            torch.testing.assert_close(got.double(), ref.double(), atol=1e-2 * scale, rtol=0)
            torch.testing.assert_close(got.double(), exact, atol=2e-2 * scale, rtol=0)
    with pytest.raises(ValueError, match="exactly one of xa and lora_A"):
        kdecode.decode_linear(x, W, klora.lora_shrink(x, A), B, 0.5, lora_A=A)
    small = peft_ops.NF4Weight.quantize(torch.randn(8, K, generator=gen).to(DEVICE, dtype), blocksize=64)
    with pytest.raises(ValueError, match="8 output features, fewer than a"):   # (not `eligible`)
        kdecode.decode_linear(x, small, klora.lora_shrink(x, A), B[:8], 0.5)


@pytest.mark.parametrize("M,N,K,r,split_k,dtype,a_layout", [
    (1, 48, 512, 3, 3, torch.bfloat16, "contiguous"),   # two tiles (three on a GPU): two ranks for tile 0's programs
    (5, 70, 384, 2, 2, torch.float16, "transposed"),    # a ragged N tile, a rank each; A a transposed view
    (17, 32, 512, 1, 4, torch.bfloat16, "bf16"),        # one tile, 17 rows; a bf16 A
    (3, 48, 256, 16, 2, torch.bfloat16, "contiguous"),  # eight ranks a tile: the shrink's own launch
])
def test_decode_forms_the_shrink_in_its_own_programs(monkeypatch, M, N, K, r, split_k, dtype, a_layout):
    # K split and few ranks a tile: the decode's programs form x Aᵀ from the x tiles they read, in
    # fp32, and the split-K epilogue sums its parts; same result as given xa, to fp32 sums.
    from peft_ops.kernels import decode as kdecode

    gen = torch.Generator().manual_seed(M * N + r)
    N = _rows(N)
    W = peft_ops.NF4Weight.quantize(torch.randn(N, K, generator=gen).to(DEVICE, dtype), blocksize=64)
    x = torch.randn(M, K, generator=gen).to(DEVICE, dtype)
    A, B = torch.randn(r, K, generator=gen).to(DEVICE) / 8, torch.randn(N, r, generator=gen).to(DEVICE)
    if a_layout == "transposed":
        A = A.t().contiguous().t()
        assert A.stride(1) != 1
    elif a_layout == "bf16":
        A = A.to(torch.bfloat16)
    mn = torch.rand(N, generator=gen).to(DEVICE) + 0.5
    shrink = mock.Mock(wraps=klora.lora_shrink)
    monkeypatch.setattr(klora, "lora_shrink", shrink)
    fused = triton.cdiv(r, triton.cdiv(N, kdecode._config(M, N)["BLOCK_N"])) <= kdecode.MAX_SHRINK_RANKS
    z64 = x.double() @ W.dequantize(dtype).double().t() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()
    for kw, want in ((dict(), (z64,)), (dict(mn=mn, save_z=True), (mn.double() * z64, z64))):
        outs = lambda y: y if isinstance(y, tuple) else (y,)
        formed = outs(kdecode.decode_linear(x, W, None, B, 0.5, split_k=split_k, lora_A=A, **kw))
        assert shrink.called != fused, (fused, shrink.call_count)
        again = outs(kdecode.decode_linear(x, W, None, B, 0.5, split_k=split_k, lora_A=A, **kw))
        assert all(torch.equal(a, b) for a, b in zip(formed, again)), "not repeatable"
        given = outs(kdecode.decode_linear(x, W, klora.lora_shrink(x, A), B, 0.5, split_k=split_k, **kw))
        shrink.reset_mock()
        for got, ref, exact in zip(formed, given, want):
            assert got.dtype == dtype and got.shape == (M, N)
            scale = exact.abs().max().item()
            torch.testing.assert_close(got.double(), ref.double(), atol=1e-2 * scale, rtol=0)
            torch.testing.assert_close(got.double(), exact, atol=2e-2 * scale, rtol=0)


def test_small_m_and_unaligned_k_stay_fused(monkeypatch):
    monkeypatch.delenv("PEFT_OPS_STRATEGY", raising=False)
    small = _decisions(lambda: run_case(lead=(5,), N=24, K=64, r=2, dtype=torch.bfloat16,
                                        adapter_dtype=torch.float32, nf4=True, dora=False, bias=False, p=0.0))
    assert small[("forward", "fused", "rule")] == 1 and small[("dx", "fused", "rule")] == 1, small
    odd = _decisions(lambda: run_case(lead=(80,), N=24, K=97, r=2, dtype=torch.bfloat16,
                                      adapter_dtype=torch.float32, nf4=True, dora=False, bias=False, p=0.0,
                                      blocksize=32))
    assert odd[("forward", "fused", "only eligible")] == 1, odd


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_buffers_equal_one_pass(dtype):
    # A buffer of a few rows forces several chunks; each must add up to the one-pass result.
    gen = torch.Generator().manual_seed(0)
    M, N, K, R = 70, 200, 128, 5
    W = peft_ops.NF4Weight.quantize(torch.randn(N, K, generator=gen).to(DEVICE, dtype), blocksize=64)
    x = torch.randn(M, K, generator=gen).to(DEVICE, dtype)
    xa, B = torch.randn(M, R, generator=gen).to(DEVICE), torch.randn(N, R, generator=gen).to(DEVICE)
    mn = torch.rand(N, generator=gen).to(DEVICE) + 0.5
    xd = torch.where(torch.rand(M, K, generator=gen).to(DEVICE) > 0.3, x, torch.zeros((), dtype=dtype, device=DEVICE))
    bias = torch.randn(N, generator=gen).to(DEVICE, dtype)
    for kw in (dict(bias=bias), dict(mn=mn, save_z=True), dict(mn=mn, xd=xd, inv_keep=1.5, save_z=True, bias=bias)):
        ref = klora.fused_linear(x, W, xa, B, 0.7, **kw)
        for backend in ("triton", "cublas"):
            one = kgemm.gemm_forward(x, W, xa, B, 0.7, backend=backend, **kw)
            chunked = kgemm.gemm_forward(x, W, xa, B, 0.7, buffer_bytes=60 * K * 2, backend=backend, **kw)
            for a, b, c in zip(*(t if isinstance(t, tuple) else (t,) for t in (ref, one, chunked))):
                assert torch.equal(b, c), f"{backend} {list(kw)}: chunks differ from one pass"
                torch.testing.assert_close(b.float(), a.float(), atol=3e-2 * a.abs().max().item(), rtol=0)
    dy = torch.randn(M, N, generator=gen).to(DEVICE, dtype)
    gb, A = torch.randn(M, R, generator=gen).to(DEVICE), torch.randn(R, K, generator=gen).to(DEVICE)
    for kw in (dict(), dict(dropout=0.3, seed=5), dict(col_scale=mn), dict(second_scale=mn - 1, dropout=0.2, seed=9)):
        ref = klora.fused_linear_dx(dy, W, gb, A, 0.7, **kw)
        one = kgemm.gemm_dx(dy, W, gb, A, 0.7, **kw)
        chunked = kgemm.gemm_dx(dy, W, gb, A, 0.7, buffer_bytes=64 * N * 2 * 2, **kw)
        assert torch.equal(one, chunked), f"dx {list(kw)}: chunks differ from one pass"
        torch.testing.assert_close(one.float(), ref.float(), atol=3e-2 * ref.abs().max().item(), rtol=0)


def test_pin_runs_the_pinned_candidate_and_warns_once_when_it_cannot(monkeypatch):
    monkeypatch.setenv("PEFT_OPS_STRATEGY", "forward=dequant_cublas,dx=fused")
    made = _decisions(lambda: run_case(lead=(6,), N=16, K=64, r=2, dtype=torch.bfloat16,
                                       adapter_dtype=torch.float32, nf4=True, dora=False, bias=False, p=0.0))
    assert made[("forward", "dequant_cublas", "pinned")] == 1 and made[("dx", "fused", "pinned")] == 1, made
    monkeypatch.setenv("PEFT_OPS_STRATEGY", "dequant_gemm")
    x, W = torch.randn(80, 32).to(DEVICE), torch.randn(8, 32).to(DEVICE)   # fp32: the decode-once GEMM is 16-bit only
    A, B = torch.randn(2, 32).to(DEVICE), torch.randn(8, 2).to(DEVICE)
    strategy._warned.clear()
    with pytest.warns(UserWarning, match="pins forward=dequant_gemm, but this call has torch.float32 activations"):
        made = _decisions(lambda: peft_ops.lora_linear(x, W, A, B, 1.0))
    assert made[("forward", "fused", "pinned, not eligible")] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # once per reason, not once per call
        peft_ops.lora_linear(x, W, A, B, 1.0)


def test_bad_pins_name_the_variable(monkeypatch):
    for value, match in (("fastest", "forward strategy must be one of"), ("backward=fused", "unknown op"),
                         ("dx=dequant_cublas", "dx strategy must be one of")):
        monkeypatch.setenv("PEFT_OPS_STRATEGY", value)
        with pytest.raises(ValueError, match="PEFT_OPS_STRATEGY: " + match):
            peft_ops.lora_linear(torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2), 1.0)
    monkeypatch.delenv("PEFT_OPS_STRATEGY")
    monkeypatch.setenv("PEFT_OPS_DEQUANT_BUFFER_MIB", "0")
    with pytest.raises(ValueError, match="PEFT_OPS_DEQUANT_BUFFER_MIB: expected a positive integer"):
        peft_ops.lora_linear(torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2), 1.0)


def test_rule_threshold():
    assert strategy.rule("forward", strategy.RULE_MIN_M - 1, "") == "fused"
    assert strategy.rule("forward", strategy.RULE_MIN_M, "") == "dequant_gemm"
    assert strategy.rule("dx", 4096, "fp32 activations") == "fused"
    for op in strategy.OPS:
        for M in (1, strategy.RULE_MIN_M - 1, strategy.RULE_MIN_M, 4096):
            assert strategy.rule(op, M, "", "") == "fused_lut"
            assert strategy.rule(op, M, "fp32 activations", "fp32 activations") == "fused"
