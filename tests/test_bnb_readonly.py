"""Reading a bitsandbytes 4-bit weight never changes the module it belongs to.

bitsandbytes 0.50 repacks a `Linear4bit`'s `weight.data` and rewrites its `quant_state` in place
on the first eval + no-grad forward on a CPU with AVX512-BF16 (`_convert_weight_packed_for_cpu`).
Reading that weight once undid the flag on the live `quant_state` while the bytes stayed
repacked, so every later forward (ours and bitsandbytes' own) ran on garbage. These tests repack
with the very function bitsandbytes' forward calls, so they run on any CPU; the last one lets
bitsandbytes' own forward do it, where the CPU has the instructions.
"""

import pytest
import torch
from torch import nn

import peft_ops
from peft_ops import NF4Weight
from peft_ops.modules import LoraLinear
from peft_ops.nf4 import _decode_absmax

bnb = pytest.importorskip("bitsandbytes", reason="the weights under test are bitsandbytes Linear4bit")
from bitsandbytes.functional import _convert_weight_packed_for_cpu, has_avx512bf16  # noqa: E402

N, K = 256, 128


def _linear4bit(double_quant=True, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    dense = torch.randn(N, K, dtype=dtype)
    lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type="nf4",
                            compress_statistics=double_quant)
    lin.weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4",
                                   compress_statistics=double_quant, blocksize=64)
    return lin.to("cpu")  # quantizes


def _repack(lin):
    """What `Linear4bit.forward` does on an AVX512-BF16 CPU in eval + no grad."""
    lin.weight.data, lin.weight.quant_state = _convert_weight_packed_for_cpu(lin.weight.data, lin.weight.quant_state)


def _snapshot(lin):
    """Everything bitsandbytes keeps for the weight: bytes, storage, and the quant_state's fields."""
    state = lin.weight.quant_state
    fields = {}
    for k, v in vars(state).items():
        fields[k] = (v.data_ptr(), v.clone()) if isinstance(v, torch.Tensor) else v
    return lin.weight.data.data_ptr(), lin.weight.data.clone(), id(state), fields


def _assert_unchanged(lin, snap):
    ptr, data, state_id, fields = snap
    assert lin.weight.data.data_ptr() == ptr
    assert torch.equal(lin.weight.data, data)
    state = lin.weight.quant_state
    assert id(state) == state_id
    assert set(vars(state)) == set(fields), "quant_state gained or lost fields"
    for k, v in fields.items():
        now = getattr(state, k)
        if isinstance(now, torch.Tensor):
            assert now.data_ptr() == v[0] and torch.equal(now, v[1]), k
        elif k != "state2" or v is None:   # a nested QuantState is compared by its tensors below
            assert now == v, k
    if fields.get("state2") is not None:
        assert torch.equal(state.state2.absmax, fields["state2"].absmax)


def _expected_after_repack(original: NF4Weight):
    """The weight a repacked module computes with: the same codes, scales rounded to bf16 (the
    repack decodes the nested absmax and keeps bf16), no double quantization."""
    scales = _decode_absmax(original).to(torch.bfloat16).float()
    return NF4Weight(original.packed.clone(), scales, original.shape, original.dtype, original.blocksize)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_from_bnb_reads_a_cpu_repacked_weight_without_changing_it(double_quant, dtype):
    lin = _linear4bit(double_quant, dtype)
    original = NF4Weight.from_bnb(lin.weight)
    original = NF4Weight(original.packed.clone(), original.absmax.clone(), original.shape, original.dtype,
                         original.blocksize, nested_absmax=original.nested_absmax, nested_code=original.nested_code,
                         offset=original.offset)
    _repack(lin)
    snap = _snapshot(lin)
    read = NF4Weight.from_bnb(lin.weight)
    _assert_unchanged(lin, snap)
    assert lin.weight.quant_state.packing_format_for_cpu
    # The codes come back in bitsandbytes' flat order, bit for bit; the scales are the repack's.
    expected = _expected_after_repack(original)
    assert read.dtype == dtype and tuple(read.shape) == (N, K) and not read.double_quant
    assert torch.equal(read.packed, original.packed)
    assert torch.equal(read.dequantize(torch.float32), expected.dequantize(torch.float32))
    # and it is the weight bitsandbytes had, up to that bf16 rounding of the scales (2^-9 relative)
    torch.testing.assert_close(read.dequantize(torch.float32), original.dequantize(torch.float32),
                               rtol=2 ** -8, atol=0)
    # reading twice changes nothing either
    NF4Weight.from_bnb(lin.weight)
    _assert_unchanged(lin, snap)


def test_from_bnb_of_a_repacked_weight_with_an_explicit_quant_state():
    lin = _linear4bit()
    _repack(lin)
    snap = _snapshot(lin)
    a = NF4Weight.from_bnb(lin.weight)
    b = NF4Weight.from_bnb(lin.weight.data, lin.weight.quant_state)
    _assert_unchanged(lin, snap)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_linear_over_a_repacked_linear4bit_trains_and_leaves_it(use_dora):
    lin = _linear4bit()
    original = NF4Weight.from_bnb(lin.weight)
    expected = _expected_after_repack(original)
    _repack(lin)
    snap = _snapshot(lin)
    layer = LoraLinear(lin, r=4, lora_alpha=8, use_dora=use_dora, init_lora_weights=False)
    x = torch.randn(3, K, dtype=torch.bfloat16, requires_grad=True)
    layer.train()
    y = layer(x)
    y.float().square().sum().backward()
    assert torch.isfinite(layer.lora_A.grad).all() and torch.isfinite(x.grad).all()
    _assert_unchanged(lin, snap)
    # it computes with the module's weight, not garbage: the fp64 reference on that weight
    magnitude = layer.lora_magnitude_vector if use_dora else None
    ref = peft_ops.reference.lora_linear(x.detach(), expected, layer.lora_A, layer.lora_B, layer.scaling,
                                         magnitude=magnitude)
    torch.testing.assert_close(y.float(), ref.float(), atol=0.05, rtol=0.02)
    # merging replaces the Params4bit (as PEFT does) with the layer's own settings; unmerging gives
    # back the very parameter object, still repacked and untouched
    old = lin.weight
    layer.merge()
    assert lin.weight is not old and lin.weight.quant_state.nested  # compress_statistics kept
    layer.unmerge()
    assert lin.weight is old
    _assert_unchanged(lin, snap)


def test_from_peft_over_a_repacked_model_changes_no_base():
    peft = pytest.importorskip("peft", reason="from_peft converts PEFT models")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = _linear4bit()

        def forward(self, x):
            return self.proj(x)

    model = Tiny()
    model.is_loaded_in_4bit = True
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                            init_lora_weights=False))
    base = peft_model.base_model.model.proj.base_layer
    _repack(base)
    snap = _snapshot(base)
    peft_ops.from_peft(peft_model)
    x = torch.randn(2, 5, K, dtype=torch.bfloat16)
    peft_model.train()
    peft_model(x).float().sum().backward()
    peft_model.eval()
    with torch.no_grad():
        peft_model(x)
    _assert_unchanged(base, snap)


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes repacks on its own only on CPUs with AVX512-BF16; "
                    "the tests above repack with the same bitsandbytes function on any CPU")
def test_bitsandbytes_own_eval_forward_then_from_bnb_keeps_its_outputs():
    # The report's repro: one eval + no-grad forward repacks, then reading the weight must leave
    # bitsandbytes' next forward exactly as it was.
    lin = _linear4bit()
    x = torch.randn(4, K, dtype=torch.bfloat16)
    lin.eval()
    with torch.no_grad():
        y0 = lin(x)
    assert lin.weight.quant_state.packing_format_for_cpu
    snap = _snapshot(lin)
    read = NF4Weight.from_bnb(lin.weight)
    _assert_unchanged(lin, snap)
    with torch.no_grad():
        y1 = lin(x)
    assert torch.equal(y0, y1)
    ref = x.float() @ read.dequantize(torch.float32).t()
    assert (y1.float() - ref).abs().max() <= 0.02 * ref.abs().max()
