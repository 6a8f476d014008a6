"""The CPU path's native loops (`peft_ops._cpu_loops`, `csrc/cpu_loops.c`): the dropout keep mask
and the NF4 decode give the PyTorch passes' bits, vectorized and portable builds alike, on one
thread or several; where they cannot be built the passes run, with one warning naming why."""

import contextlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peft_ops
from peft_ops import _cpu_loops, nf4, ops

needs_cc = pytest.mark.skipif(_cpu_loops.find_compiler() is None,
                              reason="no C compiler ($CC, cc, gcc, clang) on this machine to build the loops")


def _torch_mask(seed, shape, p):
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PEFT_OPS_CPU_LOOPS", "torch")
        return ops.dropout_keep(seed, shape, p)


def _torch_rows(w, row0, row1, dtype, store):
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PEFT_OPS_CPU_LOOPS", "torch")
        return nf4.decode_rows(w, row0, row1, dtype=dtype, store=store)


def _same_bits(a, b):
    """Equal values, NaN where NaN (the decode's NaN is the quiet NaN torch's conversion writes,
    but only values are the contract)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and \
        torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))


@contextlib.contextmanager
def _threads(count, min_elements):
    """torch's thread count `count`, and the loops splitting work of `min_elements` a thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(_cpu_loops, "MIN_ELEMENTS_A_PIECE", min_elements)
            yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def portable(tmp_path, monkeypatch):
    """The loops built without -march=native: the plain C the vector paths fall back to."""
    monkeypatch.setenv("PEFT_OPS_CACHE_DIR", str(tmp_path))
    lib, description = _cpu_loops._build(archs=((),))
    monkeypatch.setattr(_cpu_loops, "_state", {"lib": lib, "description": description})
    return description


@needs_cc
def test_the_loops_build_here():
    assert _cpu_loops.available()
    assert _cpu_loops.describe().startswith("native (")


@needs_cc
@pytest.mark.parametrize("threads", [1, 3])
@given(M=st.integers(1, 70), K=st.integers(1, 700), p=st.sampled_from([0.0, 1e-9, 0.05, 0.3, 0.999, 1.0]),
       seed=st.integers(-(2**63), 2**63 - 1))
def test_keep_mask_equals_the_torch_stream(threads, M, K, p, seed):
    # K % 4 != 0 ends a row on a partial counter; K past 1024 spans several passes of the loop
    with _threads(threads, 64):
        keep = ops.dropout_keep(seed, (M, K), p)
    assert keep.dtype == torch.bool and keep.shape == (M, K)
    assert torch.equal(keep, _torch_mask(seed, (M, K), p))


@needs_cc
@pytest.mark.parametrize("shape", [(2, 3, 1030), (1, 1), (5000, 3)])
def test_keep_mask_of_long_rows_and_3d_inputs(monkeypatch, shape):
    keep = ops.dropout_keep(99, shape, 0.4)
    assert keep.shape == shape
    assert torch.equal(keep, _torch_mask(99, shape, 0.4))
    if keep.numel() > 1000:   # (about 0.6 kept: 5 sigma is under 0.05 at these sizes)
        assert abs(keep.float().mean().item() - 0.6) < 0.05


def _weight(N, K, blocksize, double_quant, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return peft_ops.NF4Weight.quantize(torch.randn(N, K, generator=gen) * scale, blocksize=blocksize,
                                       double_quant=double_quant)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@needs_cc
@pytest.mark.parametrize("threads", [1, 2])
@given(N=st.integers(1, 40), K=st.integers(1, 300), blocksize=st.sampled_from([32, 64, 128, 256]),
       double_quant=st.booleans(), dtype=st.sampled_from(DTYPES), store=st.sampled_from(DTYPES + [None]),
       rows=st.tuples(st.floats(0, 1), st.floats(0, 1)), seed=st.integers(0, 2**31))
def test_decode_equals_the_torch_passes(threads, N, K, blocksize, double_quant, dtype, store, rows, seed):
    # Blocks straddle rows, the last block is partial, odd element counts end on half a byte; the
    # vector loops take 32 elements at a time and leave the rest to the scalar tail.
    w = _weight(N, K, blocksize, double_quant, seed)
    row0 = min(N - 1, int(rows[0] * N))
    row1 = max(row0 + 1, min(N, int(rows[1] * N) + 1))
    with _threads(threads, 32):
        got = nf4.decode_rows(w, row0, row1, dtype=dtype, store=store)
    want = _torch_rows(w, row0, row1, dtype, store)
    assert got.dtype == (store or dtype) and got.is_contiguous()
    assert _same_bits(got, want)


@needs_cc
def test_decode_of_a_large_weight_and_bitsandbytes_agree(monkeypatch):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(5)
    dense = torch.randn(512, 1024, generator=gen).to(torch.bfloat16)
    packed, state = bnb_f.quantize_4bit(dense, blocksize=64, quant_type="nf4", compress_statistics=True)
    w = peft_ops.NF4Weight.from_bnb(packed, state)
    got = w.dequantize(torch.bfloat16)
    assert torch.equal(got, bnb_f.dequantize_4bit(packed, state))   # K % 64 == 0: no straddling block
    assert torch.equal(got, _torch_rows(w, 0, 512, torch.bfloat16, None))


@needs_cc
def test_decode_of_extreme_scales(monkeypatch):
    # absmax of huge, tiny (subnormal products), infinite and NaN blocks: bf16 rounding at the
    # edges (overflow to inf, NaN kept NaN) as torch's conversion rounds
    w = _weight(4, 128, 32, False, 0)
    w.absmax.copy_(torch.tensor([3e38, 1e-39, float("inf"), float("nan"), 1.0, 2.0**-130, 65504.0, 0.0,
                                 1e30, 7.0, -0.0, 1e-3, 5e37, 3.0, 9.0, 1e-45]))
    for dtype in DTYPES:
        for store in (None, torch.float32):
            got = nf4.decode_rows(w, 0, 4, dtype=dtype, store=store)
            assert _same_bits(got, _torch_rows(w, 0, 4, dtype, store))


@needs_cc
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])   # (one build serves every example)
@given(M=st.integers(1, 40), K=st.integers(1, 300), seed=st.integers(-(2**63), 2**63 - 1),
       N=st.integers(1, 20), blocksize=st.sampled_from([32, 64]), dtype=st.sampled_from(DTYPES))
def test_portable_build_gives_the_same_bits(portable, M, K, seed, N, blocksize, dtype):
    assert "-march" not in portable
    assert torch.equal(ops.dropout_keep(seed, (M, K), 0.3), _torch_mask(seed, (M, K), 0.3))
    w = _weight(N, K, blocksize, True, M)
    assert _same_bits(nf4.decode_rows(w, 0, N, dtype=dtype), _torch_rows(w, 0, N, dtype, None))


def test_without_a_compiler_the_torch_passes_run_and_say_why(monkeypatch, tmp_path):
    monkeypatch.setattr(_cpu_loops, "_state", {})
    monkeypatch.setattr(_cpu_loops, "_compiler", lambda: (_ for _ in ()).throw(
        _cpu_loops.BuildError("no C compiler found ($CC, cc, gcc, clang)")))
    with pytest.warns(UserWarning, match="native loops did not build.*no C compiler"):
        keep = ops.dropout_keep(3, (5, 9), 0.5)
    with monkeypatch.context() as m:   # warned once: no second warning
        m.setattr("warnings.warn", lambda *a, **k: pytest.fail("warned twice"))
        assert torch.equal(keep, ops.dropout_keep(3, (5, 9), 0.5))
    assert _cpu_loops.describe().startswith("torch (fallback: no C compiler")
    monkeypatch.setenv("PEFT_OPS_CPU_LOOPS", "native")
    with pytest.raises(RuntimeError, match="PEFT_OPS_CPU_LOOPS=native.*no C compiler"):
        ops.dropout_keep(3, (5, 9), 0.5)


def test_a_failing_compile_falls_back_with_its_error(monkeypatch, tmp_path):
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                   "echo 'fake: cannot compile' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setattr(_cpu_loops, "_state", {})
    monkeypatch.setenv("CC", str(bad))
    monkeypatch.setenv("PEFT_OPS_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="cannot compile"):
        assert not _cpu_loops.available()
    w = _weight(3, 70, 32, True, 1)
    assert torch.equal(w.dequantize(torch.bfloat16), _torch_rows(w, 0, 3, torch.bfloat16, None))


def test_switch_to_torch_and_bad_values(monkeypatch):
    monkeypatch.setenv("PEFT_OPS_CPU_LOOPS", "torch")
    assert not _cpu_loops.available()
    assert _cpu_loops.describe() == "torch (PEFT_OPS_CPU_LOOPS=torch)"
    monkeypatch.setenv("PEFT_OPS_CPU_LOOPS", "fast")
    with pytest.raises(ValueError, match="PEFT_OPS_CPU_LOOPS: expected one of .*'fast'"):
        ops.dropout_keep(1, (2, 2), 0.5)


@needs_cc
def test_decode_refuses_what_it_cannot_write():
    w = _weight(2, 64, 32, False, 0)
    code, absmax = nf4._nf4_code("cpu"), w.absmax
    with pytest.raises(ValueError, match="start on a block"):
        _cpu_loops.nf4_decode(w.packed, absmax, code, 32, 2, 128, torch.empty(126))
    with pytest.raises(ValueError, match="stop - start elements"):
        _cpu_loops.nf4_decode(w.packed, absmax, code, 32, 0, 128, torch.empty(127))
    with pytest.raises(ValueError, match="fp32"):
        _cpu_loops.nf4_decode(w.packed, absmax, code, 32, 0, 128, torch.empty(128, dtype=torch.float16))
    assert math.isfinite(_cpu_loops.nf4_decode(w.packed, absmax, code, 32, 0, 128, torch.empty(128)).sum().item())


@needs_cc
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork is POSIX-only")
def test_a_forked_child_runs_the_threaded_loops():
    # the parent's worker threads do not exist in a forked child: it must make its own, not hang
    import multiprocessing

    with _threads(2, 64):
        want = ops.dropout_keep(5, (64, 512), 0.2)   # the parent's pool exists now
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            got = pool.apply_async(_child_mask).get(timeout=120)
    assert torch.equal(got, want)


def _child_mask():
    torch.set_num_threads(2)
    _cpu_loops.MIN_ELEMENTS_A_PIECE = 64
    return ops.dropout_keep(5, (64, 512), 0.2)


@needs_cc
def test_an_unwritable_cache_folder_builds_in_the_temp_folder(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PEFT_OPS_CACHE_DIR", str(blocker / "cache"))   # cannot be made: a file is in the way
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    lib, _ = _cpu_loops._build()
    assert lib is not None and list((tmp_path / "tmp").glob("peft_ops-*/cpu_loops-*.so"))
