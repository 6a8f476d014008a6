"""LoraLinear / NF4Linear, add_lora, merge / unmerge and our adapter checkpoints, against the fp64
reference (SPEC §3). Shapes are tiny: every fused call runs in Triton's interpreter in CI."""

import json
import os

import pytest
import torch
from torch import nn

import peft_ops
from peft_ops import reference
from peft_ops.modules import LoraLinear, NF4Linear

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes provides the Linear4bit bases under test")
Conv1D = pytest.importorskip("transformers.pytorch_utils", reason="transformers provides Conv1D").Conv1D

M, K, N, R = 6, 64, 48, 4

# fp32 activations and adapters against an fp64 reference: the fused op accumulates in fp32 over
# K = 64 terms of size ~1, so errors are ~1e-6; 1e-4 leaves margin without hiding a wrong term
# (a missing scaling or bias is O(0.1) here).
FP32_TOL = dict(atol=1e-4, rtol=1e-4)


def _bnb_linear4bit(linear, blocksize=64):
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, blocksize=blocksize)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


def _base(kind):
    torch.manual_seed(0)
    linear = nn.Linear(K, N)
    if kind == "linear":
        return linear
    if kind == "conv1d":
        conv = Conv1D(N, K)
        conv.weight.data = linear.weight.data.t().contiguous()
        conv.bias.data = linear.bias.data.clone()
        return conv
    if kind == "nf4":
        return NF4Linear.from_linear(linear)
    return _bnb_linear4bit(linear)


def _dense_nk(base):
    if isinstance(base, NF4Linear):
        return base.weight.dequantize(torch.float32)
    if isinstance(base, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    if isinstance(base, Conv1D):
        return base.weight.t()
    return base.weight


@pytest.mark.parametrize("kind", ["linear", "conv1d", "nf4", "bnb"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_linear_matches_reference(kind, use_dora):
    base = _base(kind)
    layer = LoraLinear(base, r=R, lora_alpha=8, use_dora=use_dora, init_lora_weights=False)
    if use_dora:
        with torch.no_grad():
            layer.lora_magnitude_vector.mul_(1.5)  # away from the init so m/n != 1
    x = torch.randn(2, M // 2, K, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    w = _dense_nk(base).detach().double()
    params = [layer.lora_A, layer.lora_B] + ([layer.lora_magnitude_vector] if use_dora else [])
    ref_in = [p.detach().double().requires_grad_() for p in [x] + params]
    bias = base.bias.detach().double()
    y_ref = reference.lora_linear(ref_in[0], w, ref_in[1], ref_in[2], layer.scaling, bias=bias,
                                  magnitude=ref_in[3] if use_dora else None)
    y_ref.backward(dy.double())
    torch.testing.assert_close(y.double(), y_ref, **FP32_TOL)
    for got, ref in zip([x] + params, ref_in):
        torch.testing.assert_close(got.grad.double(), ref.grad, **FP32_TOL)


@pytest.mark.parametrize("kind", ["linear", "nf4"])
def test_init_is_identity_and_dora_magnitude_is_row_norm(kind):
    base = _base(kind)
    layer = LoraLinear(base, r=R, lora_alpha=16, use_dora=True)
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.lora_magnitude_vector.dtype == torch.float32
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    w = _dense_nk(base).detach().float()
    # fp32 norm over 64 terms: relative error ~1e-7
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), torch.linalg.vector_norm(w, dim=1),
                               rtol=1e-5, atol=1e-6)
    x = torch.randn(M, K)
    torch.testing.assert_close(layer(x), base(x), **FP32_TOL)
    assert layer.scaling == 16 / R
    assert LoraLinear(_base(kind), r=4, lora_alpha=16, use_rslora=True).scaling == 16 / 2


def test_fp32_adapters_with_bf16_activations():
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(K, N).to(torch.bfloat16))
    layer = LoraLinear(base, r=R, lora_alpha=8, use_dora=True, init_lora_weights=False)
    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == layer.lora_magnitude_vector.grad.dtype == torch.float32
    w = base.weight.dequantize(torch.float32).double()
    y_ref = reference.lora_linear(x.detach().double(), w, layer.lora_A.double(), layer.lora_B.double(), layer.scaling,
                                  bias=base.bias.double(), magnitude=layer.lora_magnitude_vector.double())
    # bf16 output: one rounding of values ~|2| gives 2^-8 relative; allow 2 ulps.
    torch.testing.assert_close(y.double(), y_ref, rtol=2 * 2**-8, atol=2 * 2**-8)


def test_constructor_validation():
    with pytest.raises(ValueError, match="r must"):
        LoraLinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraLinear(nn.Linear(4, 4), lora_dropout=1.0)
    with pytest.raises(TypeError, match="base_layer"):
        LoraLinear(nn.Embedding(4, 4))
    with pytest.raises(TypeError, match="lora_alpha"):
        LoraLinear(nn.Linear(4, 4), lora_alpha="8")
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        LoraLinear(nn.Linear(4, 4), use_dora="no")
    with pytest.raises(TypeError, match="lora_dropout must be a number"):
        LoraLinear(nn.Linear(4, 4), lora_dropout=True)
    with pytest.raises(ValueError, match="in_features"):
        NF4Linear(0, 4)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(K, N), r=R, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(M, K)
    no_drop = LoraLinear(layer.base_layer, r=R)
    no_drop.load_state_dict(layer.state_dict())
    layer.eval()
    torch.testing.assert_close(layer(x), no_drop(x))
    layer.train()
    assert not torch.allclose(layer(x), no_drop(x))


# --- NF4Linear -----------------------------------------------------------------------------------

def test_nf4linear_state_dict_is_bitsandbytes():
    torch.manual_seed(0)
    linear = nn.Linear(K, N)
    q = _bnb_linear4bit(linear)
    ours = NF4Linear.from_linear(linear)
    assert set(ours.state_dict()) == set(q.state_dict())
    # Load bitsandbytes' state dict into a fresh NF4Linear: same outputs as bitsandbytes.
    fresh = NF4Linear(K, N)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(M, K)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), q(x), atol=1e-5, rtol=1e-5)  # same bits, fp32 GEMMs
        torch.testing.assert_close(fresh(x), ours(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="NF4 weight of shape"):
        NF4Linear(K, N + 1).load_state_dict(q.state_dict())


def test_nf4linear_bias_follows_dtype_weight_keeps_bytes():
    layer = NF4Linear.from_linear(nn.Linear(K, N))
    packed = layer.weight.packed.clone()
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.weight.packed, packed)
    assert layer(torch.randn(M, K, dtype=torch.bfloat16)).dtype == torch.bfloat16


# --- add_lora / merge ----------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, K)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(K, N), "up": nn.Linear(N, K)})
                                    for _ in range(2))
        self.head = nn.Linear(K, 10)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b["up"](torch.tanh(b["q_proj"](h)))
        return self.head(h)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def test_add_lora_targets_freezes_and_patterns():
    model = peft_ops.add_lora(_tiny(), ["q_proj", "up"], r=4, lora_alpha=8, rank_pattern={"blocks.1.up": 2},
                              alpha_pattern={"up": 4})
    names = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert names == {"blocks.0.q_proj", "blocks.0.up", "blocks.1.q_proj", "blocks.1.up"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in names for p in ("lora_A", "lora_B")}
    assert model.blocks[1]["up"].r == 2 and model.blocks[0]["up"].r == 4
    assert model.blocks[0]["up"].scaling == 4 / 4 and model.blocks[0]["q_proj"].scaling == 8 / 4
    assert "blocks.0.q_proj.base_layer.weight" in dict(model.named_parameters())

    regex = peft_ops.add_lora(_tiny(), r"blocks\.0\..*", quantize="nf4", use_dora=True)
    assert isinstance(regex.blocks[0]["up"].base_layer, NF4Linear)
    assert not isinstance(regex.blocks[1]["up"], LoraLinear)
    assert regex.blocks[0]["up"].lora_magnitude_vector.requires_grad


def test_add_lora_errors():
    with pytest.raises(ValueError, match="matches no module"):
        peft_ops.add_lora(_tiny(), ["nope"])
    with pytest.raises(ValueError, match="quantize"):
        peft_ops.add_lora(_tiny(), ["up"], quantize="int8")
    with pytest.raises(ValueError, match="'embed'"):
        peft_ops.add_lora(_tiny(), ["embed"])
    with pytest.raises(TypeError, match="target_modules"):
        peft_ops.add_lora(_tiny(), 3)
    int8 = _tiny()
    int8.blocks[1]["up"] = bnb.nn.Linear8bitLt(N, K)
    with pytest.raises(ValueError, match=r"'blocks\.1\.up', a bitsandbytes Linear8bitLt"):
        peft_ops.add_lora(int8, ["q_proj", "up"])
    assert not any(isinstance(m, LoraLinear) for m in int8.modules())  # checked before any change
    model = peft_ops.add_lora(_tiny(), ["up"])
    with pytest.raises(ValueError, match="already has an adapter"):
        peft_ops.add_lora(model, ["up"])


def _snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()})


def _assert_unchanged(model, snapshot):
    modules, params = _snapshot(model)
    assert modules == snapshot[0]
    assert params.keys() == snapshot[1].keys()
    for n, (p, flag) in params.items():
        assert torch.equal(p, snapshot[1][n][0]) and flag == snapshot[1][n][1], n


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(alpha_pattern={"up": "x"}), TypeError, r"alpha_pattern\['up'\] must be a number"),
    (dict(alpha_pattern={"nowhere": "x"}), TypeError, r"alpha_pattern\['nowhere'\]"),   # even unmatched
    (dict(rank_pattern={"up": 0}), ValueError, r"rank_pattern\['up'\] must be a positive int"),
    (dict(rank_pattern={"(": 2}), ValueError, r"rank_pattern key '\(' is not a valid regular expression"),
    (dict(lora_alpha=[1]), TypeError, r"lora_alpha must be a number, got list"),
    (dict(lora_alpha=float("nan")), ValueError, r"lora_alpha must be finite"),
    (dict(r="4"), TypeError, r"r must be a positive int, got str"),
    (dict(use_dora="no"), TypeError, r"use_dora must be a bool, got str"),
    (dict(use_rslora="x"), TypeError, r"use_rslora must be a bool, got str"),
    (dict(lora_dropout="0.1"), TypeError, r"lora_dropout must be a number"),
    (dict(lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0, 1\)"),
])
def test_add_lora_validates_everything_before_changing_the_model(kwargs, error, match):
    model = _tiny()
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        peft_ops.add_lora(model, ["q_proj", "up"], **kwargs)
    _assert_unchanged(model, before)


def test_add_lora_failing_construction_leaves_the_model_unchanged():
    # The arguments are fine, but one base cannot be quantized (NaN weights): the layers built
    # before it must not be in the model, and no flag may have moved.
    model = _tiny()
    with torch.no_grad():
        model.blocks[1]["up"].weight[0, 0] = float("nan")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="NaN"):
        peft_ops.add_lora(model, ["q_proj", "up"], quantize="nf4")
    modules, params = _snapshot(model)
    assert modules == before[0]
    assert {n: f for n, (_, f) in params.items()} == {n: f for n, (_, f) in before[1].items()}


def _randomize(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
            elif "lora_magnitude" in n:
                p.mul_(1.2)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_unmerge_keeps_outputs(use_dora, quantize):
    model = peft_ops.add_lora(_tiny(), ["q_proj", "up"], r=4, use_dora=use_dora, quantize=quantize)
    _randomize(model)
    ids = torch.randint(0, 10, (2, 3))
    with torch.no_grad():
        y0 = model(ids)
        before = {n: m.base_layer.weight for n, m in model.named_modules() if isinstance(m, LoraLinear)}
        packed = {n: (w.packed.clone() if quantize else w.clone()) for n, w in before.items()}
        errors = peft_ops.merge_adapters(model)
        y1 = model(ids)
        if quantize:
            # NF4's relative weight error is ~10 %; more would mean the wrong settings were used.
            assert set(errors) == set(before) and all(0 < e < 0.2 for e in errors.values())
            # Outputs move by that error through two residual blocks whose branch is ~0.3 of the
            # signal: a few percent of logits ~0.5 (bound checked per layer in test_merge_into_bnb_base).
            torch.testing.assert_close(y1, y0, atol=0.1, rtol=0.1)
            assert not torch.equal(y1, y0)
        else:
            assert errors == {}
            torch.testing.assert_close(y1, y0, **FP32_TOL)  # fp32 merge: rounding only
        with pytest.raises(ValueError, match="already merged"):
            peft_ops.merge_adapters(model)
        peft_ops.unmerge_adapters(model)
        torch.testing.assert_close(model(ids), y0, **FP32_TOL)
    for n, m in model.named_modules():
        if isinstance(m, LoraLinear):
            if quantize:  # NF4: the pre-merge bytes come back exactly
                assert torch.equal(m.base_layer.weight.packed, packed[n])
            else:  # fp32 add-then-subtract (DoRA: scale, divide) rounds by ~1 ulp
                torch.testing.assert_close(m.base_layer.weight, packed[n], atol=1e-6, rtol=1e-5)


def test_merge_into_bnb_base():
    base = _base("bnb")
    layer = LoraLinear(base, r=R, init_lora_weights=False)
    x = torch.randn(M, K)
    with torch.no_grad():
        y0 = layer(x)
        exact = _dense_nk(base).float() + layer._delta_weight()
        error = layer.merge()
        assert isinstance(base.weight, bnb.nn.Params4bit) and 0 < error < 0.2
        y1 = base(x)  # bitsandbytes itself computes with the requantized weight
        # y1 - y0 = x (Q(W') - W')ᵀ, so ‖y1 - y0‖ ≤ ‖x‖·‖Q(W') - W'‖ = ‖x‖·error·‖W'‖ (Frobenius
        # norms bound the operator norm): the reported error must account for the output change.
        bound = torch.linalg.vector_norm(x) * error * torch.linalg.vector_norm(exact)
        assert 0 < torch.linalg.vector_norm(y1 - y0) <= bound * 1.001 + 1e-4
        layer.unmerge()
        torch.testing.assert_close(layer(x), y0, **FP32_TOL)


# --- our checkpoints -----------------------------------------------------------------------------

@pytest.mark.parametrize("use_dora", [False, True])
def test_save_load_round_trip(tmp_path, use_dora):
    model = peft_ops.add_lora(_tiny(), ["q_proj", "up"], r=4, lora_alpha=8, use_dora=use_dora,
                              rank_pattern={"blocks.1.up": 2})
    _randomize(model)
    peft_ops.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is use_dora
    assert config["rank_pattern"] == {"blocks.1.up": 2}
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "adapter_model.safetensors")
    assert sd["base_model.model.blocks.0.q_proj.lora_A.weight"].dtype == torch.float32
    assert ("base_model.model.blocks.0.up.lora_magnitude_vector" in sd) is use_dora

    fresh = peft_ops.load_adapter(_tiny(), tmp_path)  # creates the layers from the config
    ids = torch.randint(0, 10, (2, 3))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), **FP32_TOL)
    # ... and into a model that already has the layers.
    again = peft_ops.add_lora(_tiny(), ["q_proj", "up"], r=4, lora_alpha=8, use_dora=use_dora,
                              rank_pattern={"blocks.1.up": 2})
    peft_ops.load_adapter(again, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), **FP32_TOL)


def _checkpoint(tmp_path):
    model = peft_ops.add_lora(_tiny(), ["q_proj", "up"], r=4)
    peft_ops.save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    return load_file(tmp_path / "adapter_model.safetensors")


def _rewrite(tmp_path, sd):
    from safetensors.torch import save_file

    save_file(sd, tmp_path / "adapter_model.safetensors")


def _assert_untouched_load_fails(tmp_path, match, error=ValueError):
    target = peft_ops.add_lora(_tiny(seed=3), ["q_proj", "up"], r=4)
    before = {n: p.clone() for n, p in target.state_dict().items()}
    with pytest.raises(error, match=match):
        peft_ops.load_adapter(target, tmp_path)
    for n, p in target.state_dict().items():  # validated before anything was copied
        assert torch.equal(p, before[n]), n
    # A model without layers is left without layers.
    plain = _tiny()
    with pytest.raises(error, match=match):
        peft_ops.load_adapter(plain, tmp_path)
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())


@pytest.mark.parametrize("value, what", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_load_rejects_non_finite_tensors(tmp_path, value, what):
    sd = _checkpoint(tmp_path)
    sd["base_model.model.blocks.1.up.lora_B.weight"][2, 1] = value
    _rewrite(tmp_path, sd)
    _assert_untouched_load_fails(tmp_path, r"adapter_model\.safetensors: .*blocks\.1\.up\.lora_B\.weight holds "
                                           "NaN or Inf")


def test_load_rejects_integer_tensors(tmp_path):
    sd = _checkpoint(tmp_path)
    key = "base_model.model.blocks.0.q_proj.lora_A.weight"
    sd[key] = sd[key].round().to(torch.int32)
    _rewrite(tmp_path, sd)
    _assert_untouched_load_fails(tmp_path, r"blocks\.0\.q_proj\.lora_A\.weight holds torch\.int32 values")


def _edit_config(tmp_path, edit):
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("edit, error, match", [
    (lambda c: c.pop("r"), ValueError, r"adapter_config\.json: no 'r' key"),
    (lambda c: c.pop("lora_alpha"), ValueError, r"adapter_config\.json: no 'lora_alpha' key"),
    (lambda c: c.update(r="4"), TypeError, r"adapter_config\.json: r must be a positive int, got str '4'"),
    (lambda c: c.update(lora_dropout=1.5), ValueError, r"adapter_config\.json: lora_dropout must be in \[0, 1\)"),
    (lambda c: c.update(use_dora="yes"), TypeError, r"adapter_config\.json: use_dora must be a bool"),
    (lambda c: c.update(alpha_pattern={"up": "x"}), TypeError, r"alpha_pattern\['up'\] must be a number"),
])
def test_load_rejects_bad_config_values(tmp_path, edit, error, match):
    _checkpoint(tmp_path)
    _edit_config(tmp_path, edit)
    _assert_untouched_load_fails(tmp_path, match, error)


def test_load_rejects_invalid_json_naming_the_file(tmp_path):
    _checkpoint(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": 4,')
    _assert_untouched_load_fails(tmp_path, r"adapter_config\.json: not valid JSON")


def test_load_rejects_missing_key(tmp_path):
    sd = _checkpoint(tmp_path)
    del sd["base_model.model.blocks.1.up.lora_B.weight"]
    _rewrite(tmp_path, sd)
    _assert_untouched_load_fails(tmp_path, r"missing key.*blocks\.1\.up\.lora_B\.weight")


def test_load_rejects_wrong_shape(tmp_path):
    sd = _checkpoint(tmp_path)
    sd["base_model.model.blocks.0.up.lora_B.weight"] = torch.zeros(K + 1, 4)
    _rewrite(tmp_path, sd)
    _assert_untouched_load_fails(tmp_path, r"module blocks\.0\.up: lora_B has shape \(65, 4\)")


def test_load_rejects_wrong_rank(tmp_path):
    sd = _checkpoint(tmp_path)
    key = "base_model.model.blocks.0.q_proj"
    sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = torch.zeros(8, K), torch.zeros(N, 8)
    _rewrite(tmp_path, sd)
    _assert_untouched_load_fails(tmp_path, r"module blocks\.0\.q_proj: lora_A has shape \(8, 64\).*r=4")


def test_load_rejects_unknown_module_and_bin(tmp_path):
    sd = _checkpoint(tmp_path)
    sd["base_model.model.blocks.0.nope.lora_A.weight"] = torch.zeros(4, K)
    _rewrite(tmp_path, sd)
    _assert_untouched_load_fails(tmp_path, r"blocks\.0\.nope")
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save({}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="only safetensors"):
        peft_ops.load_adapter(_tiny(), tmp_path)


def test_load_rejects_scaling_mismatch(tmp_path):
    _checkpoint(tmp_path)
    target = peft_ops.add_lora(_tiny(), ["q_proj", "up"], r=4, lora_alpha=16)
    with pytest.raises(ValueError, match=r"module blocks\.0\.q_proj: .*lora_alpha=8"):
        peft_ops.load_adapter(target, tmp_path)


def test_from_peft_and_merge_argument_errors():
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        peft_ops.from_peft(_tiny())
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        peft_ops.from_peft("model")
    with pytest.raises(ValueError, match="no peft_ops LoraLinear"):
        peft_ops.merge_adapters(_tiny())
    with pytest.raises(ValueError, match="no peft_ops LoraLinear"):
        peft_ops.save_adapter(_tiny(), "unused")
