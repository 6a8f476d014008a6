"""The CPU path (the plain-PyTorch twins on CPU tensors): its Philox stream, its dropout masks, its
chunked NF4 decode, and its two GEMM precisions (`PEFT_OPS_CPU_PRECISION`), against Triton's
`tl.randint` in the interpreter and the fp64 reference.

The bf16 GEMMs are what `auto` picks on CPUs with AVX512-BF16 or AMX; on a CPU without them torch
emulates bf16 GEMMs (slowly, with the same arithmetic: exact products, fp32 sums, the result
rounded once to bf16), so forcing `bf16` checks their numerics on any CPU.
"""

import math

import pytest
import torch
import torch.nn as nn
import triton
import triton.language as tl
from torch.utils.checkpoint import checkpoint

import peft_ops
from peft_ops import _cpu_loops, nf4, ops, reference
from peft_ops.kernels import _config

# Normwise tolerances of the bf16 GEMMs (largest error over the largest reference magnitude). The
# fp32 path rounds y and dx once to bf16 (half an ulp, 2⁻⁹ relative); the bf16 GEMMs also round x Wᵀ
# and dy W to bf16 before the fp32 epilogue, and DoRA's g = dy·m/n before its GEMM: up to three
# half-ulps, within test_lora.py's 4-ulp bf16 tolerance, which these use. Adapter gradients do not
# go through the base GEMMs, so they keep the fp32 path's bound.
BF16_TOL = 1.6e-2
ADAPTER_TOL = 1.6e-2


@pytest.fixture
def twin(monkeypatch):
    """The twins on CPU tensors, as without TRITON_INTERPRET=1."""
    monkeypatch.setattr(ops, "use_triton", lambda t: False)


@pytest.fixture(params=["native", "torch"])
def loops(request, monkeypatch):
    """Each CPU loop both ways: the native build (`peft_ops._cpu_loops`) and the PyTorch passes."""
    if request.param == "native" and _cpu_loops.find_compiler() is None:
        pytest.skip("no C compiler ($CC, cc, gcc, clang) on this machine to build the native loops")
    # (`native` refuses to fall back: a compiler that fails to build them fails these tests)
    monkeypatch.setenv("PEFT_OPS_CPU_LOOPS", request.param)
    return request.param


# --- Philox and dropout masks --------------------------------------------------------------------

@triton.jit
def _randint4x_kernel(seed, counters_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    counters = tl.load(counters_ptr + i, mask=i < n, other=0)
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    tl.store(out_ptr + 4 * i, w0, mask=i < n)
    tl.store(out_ptr + 4 * i + 1, w1, mask=i < n)
    tl.store(out_ptr + 4 * i + 2, w2, mask=i < n)
    tl.store(out_ptr + 4 * i + 3, w3, mask=i < n)


def triton_randint4x(seed, counters):
    out = torch.empty((counters.numel(), 4), dtype=torch.int32)
    _randint4x_kernel[(triton.cdiv(counters.numel(), 256),)](seed, counters, out, counters.numel(), BLOCK=256)
    return out


@pytest.mark.skipif(not _config.interpreting(), reason="compares with tl.randint4x in Triton's interpreter")
@pytest.mark.parametrize("seed", [0, 2024, -7, 2**63 - 1, -(2**63), 0x1234_5678_9ABC])
def test_philox_words_equal_triton_randint4x(seed):
    # Counters past 2³² use the counter's second word; the seed's upper half is the key's second word.
    counters = torch.cat([torch.arange(1000), torch.tensor([2**31 - 1, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**62])])
    assert torch.equal(ops._philox4_words(seed, counters), triton_randint4x(seed, counters))


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.05, 0.3, 0.5, 0.999, 0.9999999, 1.0])
@pytest.mark.parametrize("shape", [(37, 1001), (3, 5, 12), (130, 2), (1, 1)])
def test_dropout_keep_is_the_word_compared_with_the_threshold(loops, monkeypatch, p, shape):
    # Element (m, k) is word k % 4 of randint4x at m · 2³² + k // 4 (the counter (k // 4, m, 0, 0)),
    # kept when word >> 8 is at least floor(fp32(p) · 2²⁴): drawn here element by element from the
    # words, against the twin's mask drawn over several chunks (a chunk boundary inside a row;
    # rows of K % 4 != 0).
    monkeypatch.setattr(ops, "_CHUNK", 4096)
    K = shape[-1]
    m, k = torch.meshgrid(torch.arange(math.prod(shape) // K), torch.arange(K), indexing="ij")
    threshold = math.floor(float(torch.tensor(p, dtype=torch.float32).double()) * 2**24)
    assert ops.keep_threshold(p) == threshold
    for seed in (3, -11):
        words = ops._philox4_words(seed, ((m << 32) + k // 4).reshape(-1))
        word = words.gather(1, (k % 4).reshape(-1, 1)).reshape(-1).to(torch.int64) & 0xFFFFFFFF
        keep = ops.dropout_keep(seed, shape, p)
        assert keep.dtype == torch.bool and keep.shape == shape
        assert torch.equal(keep.reshape(-1), (word >> 8) >= threshold)


def test_keep_threshold_edges():
    assert ops.keep_threshold(0.0) == 0                  # everything kept
    assert ops.keep_threshold(1.0) == 2**24              # the top 24 bits never reach 2²⁴: nothing kept
    assert ops.keep_threshold(0.5) == 2**23
    assert ops.keep_threshold(0.05) == 838860            # fp32(0.05) = 0.0500000007: floor(838860.8)
    assert not ops.dropout_keep(1, (4, 9), 1.0).any() and ops.dropout_keep(1, (4, 9), 0.0).all()


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("backend", ["twin", "triton"])
def test_checkpoint_recomputation_is_bitwise_identical(loops, monkeypatch, backend, dora):
    # Gradient checkpointing reruns the forward in backward: the dropout seed comes again from the
    # restored RNG state, so the recomputed masks (never stored) are the same bits.
    if backend == "twin":
        monkeypatch.setattr(ops, "use_triton", lambda t: False)
    elif not _config.interpreting():
        pytest.skip("the Triton kernels run here only in Triton's interpreter (TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 32))
    peft_ops.add_lora(model, ["0", "2"], r=4, lora_alpha=8, lora_dropout=0.3, use_dora=dora, quantize="nf4")
    with torch.no_grad():   # B = 0 would hide the mask from dA and the output
        for layer in model.modules():
            if isinstance(layer, peft_ops.LoraLinear):
                layer.lora_B.normal_()
    x = torch.randn(2, 9, 64)

    def grads(use_checkpoint):
        torch.manual_seed(123)
        model.zero_grad(set_to_none=True)
        y = checkpoint(model, x, use_reentrant=False) if use_checkpoint else model(x)
        y.square().sum().backward()
        return [y.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain, recomputed = grads(False), grads(True)
    assert len(plain) > 1
    for a, b in zip(plain, recomputed):
        assert torch.equal(a, b)


# --- the NF4 decode in row chunks ----------------------------------------------------------------

@pytest.mark.parametrize("N, K, blocksize", [(7, 63, 32), (33, 352, 64), (128, 320, 128), (5, 999, 64), (40, 96, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunked_decode_equals_one_pass(twin, loops, monkeypatch, N, K, blocksize, dtype):
    # Blocks straddle rows (K % blocksize != 0) and odd element counts end on a padded byte: a
    # piece boundary, and rows decoded on their own, must give the bytes of the whole decode.
    gen = torch.Generator().manual_seed(N * K)
    w = peft_ops.NF4Weight.quantize(torch.randn(N, K, generator=gen), blocksize=blocksize)
    whole = w.dequantize(dtype)
    assert torch.equal(whole, reference.nf4_dequantize(w, dtype=dtype))
    # pieces of one block, of a few blocks that end mid-row, and of more than the weight
    for piece in (1, 3 * blocksize + 1, N * K + 1):
        monkeypatch.setattr(nf4, "DECODE_PIECE", piece)
        assert torch.equal(w.dequantize(dtype), whole)
        for row0, row1 in ((N // 3, N // 3 + 2), (N - 1, N), (0, 1)):
            rows = nf4.decode_rows(w, row0, row1, dtype=dtype)
            assert rows.dtype == dtype and rows.is_contiguous()
            assert torch.equal(rows, whole[row0:row1])
            assert torch.equal(nf4.decode_rows(w, row0, row1).to(dtype), whole[row0:row1])


def _run(x, weight, A, B, m, bias, p, dy):
    leaves = [t for t in (x, A, B, m, bias) if t is not None]
    y = peft_ops.lora_linear(x, weight, A, B, 0.5, bias=bias, magnitude=m, dropout=p, training=True, seed=77)
    return [y] + list(torch.autograd.grad(y, leaves, dy))


def _inputs(nf4_weight, dora, bias, dtype=torch.bfloat16, M=37, N=70, K=96, r=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype)
    weight = peft_ops.NF4Weight.quantize(w, blocksize=32) if nf4_weight else w
    x = torch.randn(M, K, generator=gen).to(dtype).requires_grad_()
    A = (torch.randn(r, K, generator=gen) / K**0.5).requires_grad_()
    B = torch.randn(N, r, generator=gen).requires_grad_()
    m = (torch.rand(N, generator=gen) + 0.5).requires_grad_() if dora else None
    b = torch.randn(N, generator=gen).to(dtype).requires_grad_() if bias else None
    dy = torch.randn(M, N, generator=gen).to(dtype)
    return x, weight, A, B, m, b, dy


def _reference(x, weight, A, B, m, bias, p, dy):
    M, K = x.shape
    scale = ops.dropout_scale(77, (M, K), p, "cpu") if p else None
    leaves = [t for t in (x, A, B, m, bias) if t is not None]
    y = reference.lora_linear(x, weight, A, B, 0.5, bias=bias, magnitude=m, dropout_scale=scale)
    return [y] + list(torch.autograd.grad(y, leaves, dy))


def _assert_close(got, want, names, tol):
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        err = (a.double() - b.double()).abs().max().item()
        scale = b.double().abs().max().item()
        bound = (tol if name in ("y", "dx", "dbias") else ADAPTER_TOL) * max(scale, 1e-6)
        assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("nf4_weight", [False, True])
def test_bf16_gemms_match_the_reference(twin, monkeypatch, nf4_weight, dora, p):
    case = _inputs(nf4_weight, dora, bias=True)
    names = ["y", "dx", "dA", "dB"] + (["dm"] if dora else []) + ["dbias"]
    want = _reference(*case[:6], p, case[6])
    monkeypatch.setenv("PEFT_OPS_CPU_PRECISION", "bf16")
    got = _run(*case[:6], p, case[6])
    if dora:   # dm sums dy·z over rows: judged with test_lora.py's bound on the terms it adds
        dm, dm_ref = got.pop(4), want.pop(4)
        names.remove("dm")
        assert torch.allclose(dm, dm_ref, rtol=BF16_TOL, atol=BF16_TOL * dm_ref.abs().max().item())
    _assert_close(got, want, names, BF16_TOL)
    # the switch took effect: fp32 GEMMs give other bits
    monkeypatch.setenv("PEFT_OPS_CPU_PRECISION", "fp32")
    assert not torch.equal(_run(*case[:6], p, case[6])[0], got[0])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("dora", [False, True])
def test_weight_in_row_chunks_matches_one_chunk(twin, monkeypatch, precision, dora):
    # Large layers decode (or convert) the weight a few rows at a time for every GEMM and the DoRA
    # norm; a chunk boundary changes only fp32 summation orders (GEMMs of other sizes, dy W summed
    # over chunks), so results agree to fp32 rounding, then at most an ulp of bf16 after the cast.
    monkeypatch.setenv("PEFT_OPS_CPU_PRECISION", precision)
    case = _inputs(True, dora, bias=False, K=63, N=41)   # blocks straddle rows
    whole = _run(*case[:6], 0.1, case[6])
    monkeypatch.setattr(nf4, "DECODE_CHUNK", 5 * 63)
    monkeypatch.setattr(ops, "_chunk_rows", lambda weight, m: 5)
    chunked = _run(*case[:6], 0.1, case[6])
    for a, b in zip(chunked, whole):
        scale = b.abs().max().item()
        tol = 2.0**-8 if a.dtype == torch.bfloat16 else 1e-5
        assert (a.float() - b.float()).abs().max().item() <= tol * scale


def test_fp16_and_fp32_activations_keep_fp32_gemms(monkeypatch):
    monkeypatch.setenv("PEFT_OPS_CPU_PRECISION", "bf16")
    assert ops.cpu_gemm_dtype(torch.bfloat16, 16) == torch.bfloat16
    for rows in (1, 16):
        assert ops.cpu_gemm_dtype(torch.float16, rows) == ops.cpu_gemm_dtype(torch.float32, rows) == torch.float32


@pytest.mark.parametrize("units, expected", [((), torch.float32), (("avx512_bf16",), torch.bfloat16),
                                             (("avx512_bf16", "amx_bf16"), torch.bfloat16)])
def test_auto_picks_bf16_gemms_by_the_cpu(monkeypatch, units, expected):
    monkeypatch.delenv("PEFT_OPS_CPU_PRECISION", raising=False)
    monkeypatch.setattr(ops, "cpu_bf16_units", lambda: units)
    assert ops.cpu_gemm_dtype(torch.bfloat16, 256) == expected
    assert ops.cpu_gemm_dtype(torch.bfloat16, 1) == torch.bfloat16   # a matrix-vector product
    monkeypatch.setenv("PEFT_OPS_CPU_PRECISION", "fp32")
    assert ops.cpu_gemm_dtype(torch.bfloat16, 256) == ops.cpu_gemm_dtype(torch.bfloat16, 1) == torch.float32


def test_one_row_bf16_gemm_is_the_fp32_one_rounded(twin, monkeypatch):
    # auto gives a single row bf16 GEMMs on every CPU: torch's bf16 matrix-vector kernel sums the
    # exact products in fp32, so x Wᵀ is the fp32 path's sum rounded once to bf16 (bitwise), and
    # the layer stays within the bf16 GEMMs' tolerance of the reference, gradients included.
    case = _inputs(True, True, bias=True, M=1, N=300, K=256)
    x, weight = case[0], case[1]
    w = weight.dequantize(torch.bfloat16)
    assert torch.equal(x @ w.t(), (x.float() @ w.float().t()).to(torch.bfloat16))
    monkeypatch.delenv("PEFT_OPS_CPU_PRECISION", raising=False)
    assert ops.cpu_gemm_dtype(torch.bfloat16, 1) == torch.bfloat16
    got, want = _run(*case[:6], 0.1, case[6]), _reference(*case[:6], 0.1, case[6])
    dm, dm_ref = got.pop(4), want.pop(4)
    assert torch.allclose(dm, dm_ref, rtol=BF16_TOL, atol=BF16_TOL * dm_ref.abs().max().item())
    _assert_close(got, want, ["y", "dx", "dA", "dB", "dbias"], BF16_TOL)


def test_bad_precision_is_refused(twin, monkeypatch):
    monkeypatch.setenv("PEFT_OPS_CPU_PRECISION", "fp8")
    x, weight, A, B, *_ = _inputs(True, False, bias=False)
    with pytest.raises(ValueError, match="PEFT_OPS_CPU_PRECISION: expected one of"):
        peft_ops.lora_linear(x, weight, A, B, 0.5)


def test_cpu_bf16_units_reads_the_cpu():
    units = ops.cpu_bf16_units()
    assert set(units) <= {"avx512_bf16", "amx_bf16"}
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare with")
    if flags is not None:
        assert {u for u in ("avx512_bf16", "amx_bf16") if u in flags} <= set(units)


def test_bench_rows_and_summary_name_the_cpu():
    from bench.suite import COLUMNS, _env, cpu_facts

    facts = cpu_facts()
    assert {"cpu_model", "cpu_isa", "cpu_gemm", "cpu_loops"} <= set(COLUMNS)
    assert facts["cpu_loops"].split()[0] == ("native" if _cpu_loops.available() else "torch")
    assert facts["cpu_model"] and "avx512_bf16=" in facts["cpu_isa"] and "amx_bf16=" in facts["cpu_isa"]
    assert facts["cpu_gemm"].split()[0] in ("fp32", "bf16")
    env = _env("cpu")
    assert env["device"].startswith("cpu ") and env["cpu_isa"] == facts["cpu_isa"]
