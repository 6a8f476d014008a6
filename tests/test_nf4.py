"""NF4 storage (`peft_ops.NF4Weight`) against the plain reference and against bitsandbytes.

Both CPU backends run: the Triton kernels in the interpreter (TRITON_INTERPRET=1 from conftest;
a spy on the launcher proves they ran) and the PyTorch twins. The claims, all bit-exact:
- Triton kernels == PyTorch twins == `peft_ops.reference` (packed bytes, absmax, nested
  statistics, dequantized values);
- dequantization agrees with `bitsandbytes.functional.dequantize_4bit` both ways (it reads our
  bytes, we read its bytes) for fp32/fp16/bf16, blocksizes 32..4096, with and without double quant;
- our packed bytes, absmax, offset and nested absmax equal bitsandbytes'. The nested 8-bit codes
  equal its codes except where its CPU lookup table picks a code farther from the value than
  ours (near a midpoint, near 0, or 0/0 for an all-equal absmax block); there ours is the nearest
  and its is not, which the test checks for every differing code.

bitsandbytes' CPU dequantize of odd widths (and of blocksize >= 2048 on AVX512 machines) goes
through a `torch.compile`d function that takes seconds to compile per shape; the tests call it
with dynamo disabled, which runs the same Python function eagerly.
"""

import json
import math
import re
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peft_ops
from peft_ops import NF4Weight
from peft_ops import nf4 as nf4_mod
from peft_ops import reference
from peft_ops.kernels import _config
from peft_ops.kernels import nf4 as knf4

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (a test extra) is not installed")
bnbF = bnb.functional
from bitsandbytes.backends.default import ops as bnb_default_ops  # noqa: E402

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NF4 = torch.tensor(knf4.NF4_CODE, dtype=torch.float32)
# The `backend` fixture patches module attributes once per test; every example reuses it.
reuses_fixture = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                 HealthCheck.too_slow, HealthCheck.data_too_large])


# --- helpers ------------------------------------------------------------------------------------

@pytest.fixture(params=["triton", "twin"])
def backend(request, monkeypatch):
    """Run on the Triton kernels (interpreter, spied to prove they ran) or on the PyTorch twins
    (the kernels patched to fail if called)."""
    if request.param == "twin":
        monkeypatch.setattr(nf4_mod, "interpreting", lambda: False)
        for name in ("nf4_quantize", "nf4_dequantize"):
            monkeypatch.setattr(knf4, name, mock.Mock(side_effect=AssertionError(f"{name} ran on the twin path")))
        return "twin", None
    assert _config.interpreting(), "tests/conftest.py sets TRITON_INTERPRET=1"
    spies = {}
    for name in ("nf4_quantize", "nf4_dequantize"):
        spies[name] = mock.Mock(wraps=getattr(knf4, name))
        monkeypatch.setattr(knf4, name, spies[name])
    for name in ("_quantize_torch", "_dequantize_torch"):
        monkeypatch.setattr(nf4_mod, name, mock.Mock(side_effect=AssertionError(f"twin {name} ran under the interpreter")))
    return "triton", spies


def bnb_dequantize(packed, quant_state, dtype):
    """bitsandbytes' NF4 decode to `dtype`: its portable op (the one its default backend runs,
    and the arithmetic of its CUDA kernel), checked against the native CPU kernel it dispatches
    to here. That native kernel (seen on an AVX512 machine) mis-scales some elements when blocks
    straddle rows (one absmax for a vector chunk that crosses a block boundary; its error is far
    beyond the quantization error), so a disagreement is accepted only for such shapes, and the
    portable op is what we must equal."""
    saved, quant_state.dtype = quant_state.dtype, dtype
    try:
        with torch._dynamo.config.patch(disable=True):   # see the module docstring
            native = bnbF.dequantize_4bit(packed, quant_state, quant_type="nf4")
            absmax = quant_state.absmax
            if quant_state.nested:
                absmax = bnbF.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
            portable = bnb_default_ops._dequantize_4bit_compute(
                packed.reshape(-1), absmax, bnbF.get_4bit_type("nf4", device="cpu"),
                quant_state.blocksize, quant_state.shape, dtype)
    finally:
        quant_state.dtype = saved
    if not torch.equal(native, portable):
        assert quant_state.shape[1] % quant_state.blocksize != 0, \
            "bitsandbytes' native CPU decode disagrees with its portable op on a shape whose " \
            "blocks do not straddle rows"
    return portable


def bnb_quantize(weight, blocksize, double_quant):
    return bnbF.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                              quant_type="nf4")


def random_weight(shape, dtype, seed, scale_exp=0, zero_rows=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 10.0 ** scale_exp
    if zero_rows:
        w[:zero_rows] = 0
    return w.to(dtype)


@st.composite
def cases(draw, max_blocks=3):
    """(shape, dtype, blocksize, double_quant, seed, scale exponent, zero rows): a few blocks,
    odd and even element counts, blocks straddling rows."""
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    rows = draw(st.integers(1, 5))
    cols = draw(st.integers(1, max(1, max_blocks * blocksize // rows)))
    return dict(shape=(rows, cols), dtype=draw(st.sampled_from(DTYPES)), blocksize=blocksize,
                double_quant=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
                scale_exp=draw(st.integers(-4, 3)), zero_rows=draw(st.sampled_from([0, 0, 1])))


def assert_same_storage(ours, ref):
    assert torch.equal(ours.packed, ref.packed), "packed bytes differ"
    assert torch.equal(ours.absmax, ref.absmax), "absmax differs"
    assert ours.double_quant == ref.double_quant
    if ours.double_quant:
        assert torch.equal(ours.nested_absmax, ref.nested_absmax), "nested absmax differs"
        assert torch.equal(ours.nested_code, ref.nested_code), "nested code table differs"
        assert ours.offset == ref.offset, f"offset {ours.offset!r} != {ref.offset!r}"


def assert_nested_codes_agree(ours, quant_state, absmax):
    """Our nested codes equal bitsandbytes' except where its lookup picked a code farther from
    the value than ours; `absmax` is the fp32 absmax both sides quantized."""
    theirs = quant_state.absmax
    code8 = ours.nested_code
    centred = absmax - torch.tensor(ours.offset, dtype=torch.float32)
    nested = ours.nested_absmax.repeat_interleave(ours.nested_blocksize)[: centred.numel()]
    scaled = (centred * nested.clamp(min=1e-38).reciprocal()).clamp(-1, 1)
    d_ours = (scaled - code8[ours.absmax.long()]).abs()
    d_theirs = (scaled - code8[theirs.long()]).abs()
    nearer = (d_ours < d_theirs) | ((d_ours == d_theirs) & (ours.absmax < theirs))
    bad = (ours.absmax != theirs) & ~nearer
    assert not bad.any(), (f"nested codes differ where ours is not the nearer: ours "
                           f"{ours.absmax[bad][:5].tolist()}, bitsandbytes {theirs[bad][:5].tolist()}, "
                           f"values {scaled[bad][:5].tolist()}")


def fp32_absmax(weight, blocksize):
    return reference.nf4_quantize(weight, blocksize, double_quant=False).absmax


# --- the Triton kernels and the twins against the reference -------------------------------------

@reuses_fixture
@given(case=cases())
def test_quantize_matches_reference(backend, case):
    kind, spies = backend
    if spies:
        spies["nf4_quantize"].reset_mock()
    weight = random_weight(case["shape"], case["dtype"], case["seed"], case["scale_exp"], case["zero_rows"])
    ours = NF4Weight.quantize(weight, case["blocksize"], case["double_quant"])
    ref = reference.nf4_quantize(weight, case["blocksize"], case["double_quant"])
    assert_same_storage(ours, ref)
    if kind == "triton":
        assert spies["nf4_quantize"].called, "the Triton quantize kernel did not run"


@reuses_fixture
@given(case=cases())
def test_dequantize_matches_reference(backend, case):
    kind, spies = backend
    if spies:
        spies["nf4_dequantize"].reset_mock()
    weight = random_weight(case["shape"], case["dtype"], case["seed"], case["scale_exp"], case["zero_rows"])
    ref = reference.nf4_quantize(weight, case["blocksize"], case["double_quant"])
    # Build ours from the reference's bytes, so this checks decoding alone.
    w = NF4Weight(ref.packed, ref.absmax, ref.shape, ref.dtype, ref.blocksize,
                  nested_absmax=ref.nested_absmax, nested_code=ref.nested_code, offset=ref.offset)
    for dtype in DTYPES:
        out = w.dequantize(dtype)
        assert out.dtype == dtype and out.shape == weight.shape
        assert torch.equal(out, reference.nf4_dequantize(ref, dtype)), f"dequantize to {dtype} differs"
    assert w.dequantize().dtype == weight.dtype
    if kind == "triton":
        assert spies["nf4_dequantize"].call_count == len(DTYPES) + 1


@pytest.mark.parametrize("double_quant", [False, True])
def test_ties_and_zero_blocks(backend, double_quant):
    """Values exactly on an fp32 midpoint take the lower code, in full blocks (scaled by the
    reciprocal) and in the partial last block (scaled by division); all-zero blocks store absmax
    0 and codes 7; an odd count pads the last byte's low nibble with 7."""
    mid = (NF4[:-1] + NF4[1:]) / 2
    block = torch.cat([torch.tensor([1.0]), mid, -mid, torch.zeros(1)])        # 32 values, absmax 1
    weight = torch.cat([block, torch.zeros(32), block[:31]]).view(1, 95)       # full, zero, partial
    w = NF4Weight.quantize(weight, 32, double_quant)
    ref = reference.nf4_quantize(weight, 32, double_quant)
    assert_same_storage(w, ref)
    codes = torch.stack([w.packed >> 4, w.packed & 0xF], 1).view(-1)[:95].long()
    expected = torch.bucketize(weight.view(-1), mid)   # absmax is 1 (or 0) in every block
    assert torch.equal(codes, expected)
    assert torch.equal(codes[1:16], torch.arange(15)), "a midpoint must take the lower code"
    assert (codes[32:64] == 7).all() and (w.packed[-1] & 0xF) == 7
    packed_bnb, qs = bnb_quantize(weight, 32, double_quant)
    assert torch.equal(w.packed, packed_bnb.view(-1))
    if not double_quant:
        assert w.absmax[1] == 0 and torch.equal(w.absmax, qs.absmax)


def test_roundtrip_error_is_half_the_local_code_gap():
    """|w - deq(q(w))| <= absmax * (half the gap between the two NF4 values around w/absmax),
    plus one fp32 rounding of the product."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(7, 301, generator=gen) * torch.logspace(-3, 2, 7)[:, None]
    for blocksize in (32, 256):
        w = NF4Weight.quantize(weight, blocksize, double_quant=False)
        flat = weight.view(-1)
        absmax = w.absmax.repeat_interleave(blocksize)[: flat.numel()]
        scaled = (flat / absmax).clamp(-1, 1)
        upper = torch.searchsorted(NF4, scaled).clamp(1, 15)
        half_gap = (NF4[upper] - NF4[upper - 1]) / 2
        err = (w.dequantize().view(-1) - flat).abs()
        bound = absmax * half_gap * (1 + 2**-20) + flat.abs() * 2**-23
        assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"
    # With double quantization the block scale itself is off by the 8-bit nested error.
    w = NF4Weight.quantize(weight, 64, double_quant=True)
    rel = (w.dequantize() - weight).norm() / weight.norm()
    assert rel < 0.12, f"relative error {rel:.3f}"


# --- bitsandbytes, both ways --------------------------------------------------------------------

@reuses_fixture
@given(case=cases())
def test_bytes_and_dequantize_match_bitsandbytes(backend, case):
    weight = random_weight(case["shape"], case["dtype"], case["seed"], case["scale_exp"], case["zero_rows"])
    bs, dq = case["blocksize"], case["double_quant"]
    ours = NF4Weight.quantize(weight, bs, dq)
    packed_bnb, qs = bnb_quantize(weight, bs, dq)

    # Bytes: packed and statistics exactly; nested codes as described in the module docstring.
    assert torch.equal(ours.packed, packed_bnb.view(-1)), "packed bytes differ from bitsandbytes"
    if dq:
        assert ours.offset == qs.offset.item()
        assert torch.equal(ours.nested_absmax, qs.state2.absmax)
        assert torch.equal(ours.nested_code, qs.state2.code)
        assert ours.nested_blocksize == qs.state2.blocksize
        assert_nested_codes_agree(ours, qs, fp32_absmax(weight, bs))
    else:
        assert torch.equal(ours.absmax, qs.absmax)

    theirs = NF4Weight.from_bnb(packed_bnb, qs)
    ours_packed, ours_qs = ours.to_bnb()
    for dtype in DTYPES:
        # We read its bytes ...
        assert torch.equal(theirs.dequantize(dtype), bnb_dequantize(packed_bnb, qs, dtype)), \
            f"our decode of bitsandbytes bytes differs ({dtype})"
        # ... and it reads ours.
        assert torch.equal(bnb_dequantize(ours_packed, ours_qs, dtype), ours.dequantize(dtype)), \
            f"bitsandbytes' decode of our bytes differs ({dtype})"


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_every_blocksize_matches_bitsandbytes(blocksize, double_quant):
    """Each blocksize once, deterministic: several blocks, an odd width (blocks straddle rows,
    odd element count) and a partial last block."""
    weight = random_weight((3, blocksize + 17), torch.float32, seed=blocksize)
    ours = NF4Weight.quantize(weight.to(torch.bfloat16), blocksize, double_quant)
    packed_bnb, qs = bnb_quantize(weight.to(torch.bfloat16), blocksize, double_quant)
    assert torch.equal(ours.packed, packed_bnb.view(-1))
    ours_packed, ours_qs = ours.to_bnb()
    theirs = NF4Weight.from_bnb(packed_bnb, qs)
    for dtype in DTYPES:
        assert torch.equal(bnb_dequantize(ours_packed, ours_qs, dtype), ours.dequantize(dtype))
        assert torch.equal(theirs.dequantize(dtype), bnb_dequantize(packed_bnb, qs, dtype))


def test_nested_lookup_differences_are_bitsandbytes_misses():
    """Many blocks (so many nested codes): the differing codes are few and each is a bitsandbytes
    lookup miss (checked in assert_nested_codes_agree); everything else is equal."""
    weight = random_weight((64, 1000), torch.float32, seed=11)
    ours = NF4Weight.quantize(weight, 32, True)
    packed_bnb, qs = bnb_quantize(weight, 32, True)
    assert torch.equal(ours.packed, packed_bnb.view(-1))
    assert_nested_codes_agree(ours, qs, fp32_absmax(weight, 32))
    differ = (ours.absmax != qs.absmax).float().mean().item()
    assert differ < 0.01, f"{differ:.2%} of nested codes differ from bitsandbytes"


def test_from_params4bit_alone():
    weight = random_weight((8, 96), torch.bfloat16, seed=5)
    param = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=32, compress_statistics=True,
                              quant_type="nf4").to("cpu")
    w = NF4Weight.from_bnb(param)
    assert type(w.packed) is torch.Tensor and w.shape == weight.shape and w.blocksize == 32
    assert torch.equal(w.dequantize(), bnb_dequantize(param.data, param.quant_state, torch.bfloat16))


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(nf4_mod.dynamic_map(), bnbF.create_dynamic_map())
    assert torch.equal(NF4, bnbF.get_4bit_type("nf4", device="cpu"))


# --- state dicts (bitsandbytes Linear4bit keys) -------------------------------------------------

def _linear4bit(in_features, out_features, blocksize, double_quant, seed):
    torch.manual_seed(seed)
    lin = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.float32,
                            compress_statistics=double_quant, quant_type="nf4")
    lin.weight.blocksize = blocksize
    return lin.to("cpu")   # quantizes


def _load_into_linear4bit(state_dict, prefix, in_features, out_features):
    """What transformers does to load a prequantized 4-bit checkpoint into a Linear4bit."""
    lin = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.float32,
                            quant_type="nf4")
    stats = {k[len(prefix + "weight."):]: v for k, v in state_dict.items() if k.startswith(prefix + "weight.")}
    lin.weight = bnb.nn.Params4bit.from_prequantized(state_dict[prefix + "weight"], stats,
                                                     device="cpu", module=lin)
    lin.bias.data.copy_(state_dict[prefix + "bias"])
    return lin


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip_with_linear4bit(double_quant):
    prefix = "model.layers.0.q_proj."
    # in_features a multiple of both blocksizes: Linear4bit's forward uses bitsandbytes' native
    # CPU decode, which mis-scales straddling blocks on AVX512 (see bnb_dequantize).
    x = torch.randn(5, 128)
    with torch._dynamo.config.patch(disable=True):
        # Theirs into ours: same keys and bytes back out, same outputs.
        lin = _linear4bit(128, 24, 64, double_quant, seed=0)
        sd = lin.state_dict(prefix=prefix)
        w = NF4Weight.from_state_dict(sd, prefix)
        ours_sd = w.state_dict(prefix)
        assert list(ours_sd) == [k for k in sd if k != prefix + "bias"]
        for key, value in ours_sd.items():
            assert value.dtype == sd[key].dtype and torch.equal(value, sd[key]), key
        expected = lin(x)
        assert torch.equal(torch.nn.functional.linear(x, w.dequantize(torch.float32), lin.bias), expected)

        # Ours into theirs.
        weight = random_weight((24, 128), torch.float16, seed=1)
        w = NF4Weight.quantize(weight, 128, double_quant)
        sd = {**w.state_dict(prefix), prefix + "bias": torch.randn(24)}
        lin = _load_into_linear4bit(sd, prefix, 128, 24)
        assert torch.equal(lin(x), torch.nn.functional.linear(x, w.dequantize(torch.float32), sd[prefix + "bias"]))
    meta = json.loads(bytes(sd[prefix + "weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["dtype"] == "float16" and meta["shape"] == [24, 128] and meta["blocksize"] == 128
    assert (meta.get("nested_offset") == w.offset) if double_quant else "nested_offset" not in meta


def test_state_dict_survives_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    w = NF4Weight.quantize(random_weight((6, 50), torch.bfloat16, seed=2), 32, True)
    path = tmp_path / "w.safetensors"
    safetensors.save_file(w.state_dict("lin."), str(path))
    back = NF4Weight.from_state_dict(safetensors.load_file(str(path)), "lin.")
    assert_same_storage(back, w)
    assert torch.equal(back.dequantize(), w.dequantize())


# --- the rest of the public surface -------------------------------------------------------------

def test_attributes_and_repr():
    weight = random_weight((10, 33), torch.float16, seed=4)
    w = NF4Weight.quantize(weight, blocksize=32)
    assert (w.shape, w.dtype, w.blocksize, w.double_quant, w.device) == \
        (torch.Size([10, 33]), torch.float16, 32, True, torch.device("cpu"))
    n_blocks = math.ceil(330 / 32)
    assert w.packed.shape == (165,) and w.absmax.shape == (n_blocks,) and w.absmax.dtype == torch.uint8
    assert w.nested_absmax.shape == (1,) and w.nested_code.shape == (256,) and w.code.shape == (16,)
    assert isinstance(w.offset, float) and w.offset_tensor.item() == w.offset
    assert w.nbytes == 165 + n_blocks + 4 + 1024 + 64
    assert w.to("cpu") is w and torch.equal(w.to(torch.device("cpu")).packed, w.packed)
    assert repr(w).startswith("NF4Weight(shape=(10, 33), dtype=torch.float16, blocksize=32, double_quant=True")
    assert peft_ops.NF4Weight is NF4Weight
    plain = NF4Weight.quantize(weight, blocksize=32, double_quant=False)
    assert plain.absmax.dtype == torch.float32 and plain.nested_absmax is None and plain.offset is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: .to('cuda') needs one")
def test_to_cuda_and_back():
    w = NF4Weight.quantize(random_weight((4, 100), torch.bfloat16, seed=0), 64)
    g = w.to("cuda")
    assert g.device.type == "cuda" and g.code.device.type == "cuda"
    assert torch.equal(g.dequantize().cpu(), w.dequantize())
    assert torch.equal(g.to("cpu").packed, w.packed)


def _bad_state_dict(**changes):
    sd = NF4Weight.quantize(random_weight((4, 64), torch.float32, seed=0), 64).state_dict("l.")
    meta = json.loads(bytes(sd["l.weight.quant_state.bitsandbytes__nf4"].tolist()))
    meta.update(changes)
    sd["l.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return sd


_W = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
_NAN, _INF = _W.clone(), _W.clone()
_NAN[2, 5], _INF[3, 63] = float("nan"), float("-inf")
_OK = NF4Weight.quantize(_W, 32, double_quant=False)
BAD_INPUTS = [
    (lambda: NF4Weight.quantize(_W.numpy(), 64), TypeError, "weight must be a torch.Tensor"),
    (lambda: NF4Weight.quantize(_W[0], 64), ValueError, "2-D"),
    (lambda: NF4Weight.quantize(_W.view(2, 2, 64), 64), ValueError, "2-D"),
    (lambda: NF4Weight.quantize(_W.to(torch.int32), 64), TypeError, "weight.dtype must be"),
    (lambda: NF4Weight.quantize(_W.double(), 64), TypeError, "weight.dtype must be"),
    (lambda: NF4Weight.quantize(torch.empty(0, 64), 64), ValueError, "must have elements"),
    (lambda: NF4Weight.quantize(_NAN, 64), ValueError, "NaN or Inf"),
    (lambda: NF4Weight.quantize(_INF.half(), 64), ValueError, "NaN or Inf"),
    (lambda: NF4Weight.quantize(_W, 48), ValueError, "blocksize must be one of"),
    (lambda: NF4Weight.quantize(_W, 8192), ValueError, "blocksize must be one of"),
    (lambda: NF4Weight.quantize(_W, 64.0), TypeError, "blocksize must be an int"),
    (lambda: NF4Weight.quantize(_W, 64, double_quant="yes"), TypeError, "double_quant must be a bool"),
    (lambda: _OK.dequantize(torch.int8), TypeError, "dtype must be"),
    (lambda: NF4Weight(_OK.packed[:-1], _OK.absmax, (4, 64), torch.float32, 32), ValueError,
     "packed must have 128 elements"),
    (lambda: NF4Weight(_OK.packed, _OK.absmax[:-1], (4, 64), torch.float32, 32), ValueError,
     "absmax must have 8 elements"),
    (lambda: NF4Weight(_OK.packed, _OK.absmax, (4, 64), torch.float32, 64), ValueError,
     "absmax must have 4 elements"),
    (lambda: NF4Weight(_OK.packed, _OK.absmax, (4, 64, 1), torch.float32, 32), ValueError, "shape must be two"),
    (lambda: NF4Weight(_OK.packed.int(), _OK.absmax, (4, 64), torch.float32, 32), TypeError, "packed must have dtype uint8"),
    (lambda: NF4Weight(_OK.packed, _OK.absmax.to(torch.uint8), (4, 64), torch.float32, 32), TypeError,
     "absmax must have dtype float32"),
    (lambda: NF4Weight(_OK.packed, _OK.absmax, (4, 64), torch.float32, 32, offset=0.5), ValueError,
     "need nested_absmax"),
    (lambda: NF4Weight.from_bnb(_W), TypeError, "Params4bit"),
    (lambda: NF4Weight.from_bnb(*bnbF.quantize_4bit(_W, blocksize=64, quant_type="fp4")), ValueError,
     "quant_type must be 'nf4'"),
    (lambda: NF4Weight.from_bnb(_OK.packed, object()), TypeError, "quant_state must be a bitsandbytes QuantState"),
    (lambda: NF4Weight.from_state_dict({}, "l."), ValueError, "bitsandbytes__"),
    (lambda: NF4Weight.from_state_dict(_bad_state_dict(quant_type="fp4"), "l."), ValueError, "quant_type must be 'nf4'"),
    (lambda: NF4Weight.from_state_dict(_bad_state_dict(blocksize=100), "l."), ValueError, "blocksize must be one of"),
    (lambda: NF4Weight.from_state_dict(_bad_state_dict(dtype="int8"), "l."), TypeError, "dtype must be one of"),
    (lambda: NF4Weight.from_state_dict(_bad_state_dict(shape=[4, 65]), "l."), ValueError, "packed must have"),
    (lambda: NF4Weight.from_state_dict({k: v for k, v in _bad_state_dict().items() if k != "l.weight.nested_absmax"},
                                       "l."), ValueError, "no 'l.weight.nested_absmax'"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_inputs_raise_with_a_message(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()
