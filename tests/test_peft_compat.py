"""PEFT compatibility: `from_peft` on real (tiny) transformers models gives PEFT's numbers, and our
adapter checkpoints and PEFT's are interchangeable.

Models are built from a config (no downloads) and kept tiny: each fused call runs in Triton's
interpreter in CI. Reference numbers always come from an identical PEFT model built from the same
seed, never from the converted one.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import peft_ops
import peft_ops.modules
from peft_ops.convert import FusedLoraForward

peft = pytest.importorskip("peft", reason="PEFT is the library under comparison")
transformers = pytest.importorskip("transformers", reason="the tiny models are transformers models")
bnb = pytest.importorskip("bitsandbytes", reason="QLoRA bases are bitsandbytes Linear4bit")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB, BATCH, SEQ = 128, 2, 8
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# fp32 everywhere: the fused op and PEFT sum the same products in a different order (one fused
# GEMM with an epilogue vs separate matmuls), ~1e-7 relative per layer, amplified a little through
# two decoder layers and the softmax; 1e-4 is far below any real discrepancy (a wrong scaling or a
# missing DoRA factor moves logits by >1e-2 with these random adapters).
FP32_TOL = dict(atol=1e-4, rtol=1e-4)


def llama(seed=0, dtype=torch.float32, quantize=False, layers=2):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(dtype)
    if quantize:
        _to_bnb_nf4(model, dtype)
    return model


def _to_bnb_nf4(model, dtype):
    """Swap every decoder linear for a bitsandbytes NF4 Linear4bit, as `load_in_4bit` would."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in LINEARS:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
            q.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to("cpu"))
    # PEFT only picks its bitsandbytes LoRA layer when the model says it was loaded in 4 bit.
    model.is_loaded_in_4bit = True


def peft_llama(use_dora, seed=0, quantize=False, dtype=torch.float32, layers=2, **config):
    """A PEFT model with random (non-zero) A and B, so every adapter gradient is non-trivial."""
    config = dict(dict(r=4, lora_alpha=8, target_modules=LINEARS, use_dora=use_dora, init_lora_weights=False),
                  **config)
    model = get_peft_model(llama(seed, dtype, quantize, layers), LoraConfig(**config))
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand_like(p))  # m != n, so the DoRA factor matters
    return model


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return ids, torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids)
    loss = nn.functional.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), loss.detach(), grads


def assert_same_numbers(ours, theirs, tol=FP32_TOL, seed=0):
    ids, labels = batch(seed)
    logits, loss, grads = loss_and_grads(ours, ids, labels)
    ref_logits, ref_loss, ref_grads = loss_and_grads(theirs, ids, labels)
    torch.testing.assert_close(logits, ref_logits, **tol)
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=lambda m: f"{name}: {m}")
    return grads


def fused_layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, FusedLoraForward)]


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "bnb4bit"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_from_peft_same_logits_and_adapter_grads(use_dora, quantize, monkeypatch):
    theirs = peft_llama(use_dora, quantize=quantize)
    ours = peft_llama(use_dora, quantize=quantize)
    params_before = dict(ours.named_parameters())
    flags_before = {n: p.requires_grad for n, p in params_before.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything converts: no warning at all
        assert peft_ops.from_peft(ours) is ours
    assert len(fused_layers(ours)) == 2 * len(LINEARS)
    params_after = dict(ours.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[n] is p for n, p in params_before.items())  # same Parameter objects
    assert {n: p.requires_grad for n, p in params_after.items()} == flags_before
    calls = []
    real = peft_ops.modules.lora_linear
    monkeypatch.setattr(peft_ops.modules, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    grads = assert_same_numbers(ours, theirs)
    assert len(calls) == 2 * len(LINEARS)  # every layer ran the fused op, none fell back
    kinds = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if use_dora else set())
    assert {n.split(".")[-3] for n in grads} == kinds
    assert all(g.abs().max() > 0 for g in grads.values())


@pytest.mark.parametrize("quantize,use_dora", [(False, False), (True, True)], ids=["lora-dense", "dora-bnb4bit"])
def test_training_loss_curve_matches_peft(quantize, use_dora):
    # One decoder layer, adapters on two projections: 20 steps of every layer in the interpreter
    # would take minutes; the per-layer equality of logits and gradients is covered above.
    setup = dict(quantize=quantize, layers=1, target_modules=["q_proj", "v_proj"])
    theirs, ours = peft_llama(use_dora, **setup), peft_llama(use_dora, **setup)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    peft_ops.from_peft(ours)  # after the optimizer was built: it must keep training the same tensors
    curves = {"ours": [], "theirs": []}
    ids, labels = batch()  # one synthetic batch, memorised: the loss falls steadily
    for _ in range(20):
        for key, model, opt in (("ours", ours, opt_ours), ("theirs", theirs, opt_theirs)):
            _, loss, _ = loss_and_grads(model, ids, labels)
            opt.step()
            curves[key].append(loss.item())
    # The loss must actually move (lr 1e-2 on random adapters), or equal curves would prove nothing.
    assert curves["theirs"][0] - curves["theirs"][-1] > 0.05
    # Adam normalises each step, so per-step differences of ~1e-6 (see FP32_TOL) can grow over 20
    # steps; 1e-3 absolute on a loss of ~4.8 is still far below one step's change (~0.02).
    torch.testing.assert_close(torch.tensor(curves["ours"]), torch.tensor(curves["theirs"]), atol=1e-3, rtol=0)


def test_save_pretrained_round_trip(tmp_path):
    ours = peft_ops.from_peft(peft_llama(use_dora=True))
    ids, labels = batch()
    loss_and_grads(ours, ids, labels)
    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1).step()
    ours.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(llama(), tmp_path)
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, **FP32_TOL)
        peft_ops.from_peft(loaded)
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, **FP32_TOL)
        # The same checkpoint (short target names, DoRA) loads into a plain model without PEFT.
        plain = peft_ops.load_adapter(llama(), tmp_path)
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, **FP32_TOL)


def test_adapters_switch_disable_and_merge():
    def build():
        model = peft_llama(use_dora=False)
        torch.manual_seed(7)
        model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                              use_dora=True, init_lora_weights=False))
        return model

    theirs, ours = build(), build()
    peft_ops.from_peft(ours)
    ids, labels = batch()

    def same():
        with torch.no_grad():
            a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        torch.testing.assert_close(a, b, **FP32_TOL)
        return a

    default = same()
    for model in (ours, theirs):
        model.set_adapter("other")
    other = same()
    assert not torch.allclose(default, other)
    # set_adapter also moved requires_grad: the inactive adapter is frozen in both.
    assert ({n for n, p in ours.named_parameters() if p.requires_grad}
            == {n for n, p in theirs.named_parameters() if p.requires_grad})
    assert_same_numbers(ours, theirs)
    with ours.disable_adapter(), theirs.disable_adapter():
        base = same()
    with torch.no_grad():
        torch.testing.assert_close(base, llama()(input_ids=ids).logits, **FP32_TOL)
    for model in (ours, theirs):
        model.merge_adapter()
    torch.testing.assert_close(same(), other, **FP32_TOL)  # fp32 merge: rounding only
    for model in (ours, theirs):
        model.unmerge_adapter()
    torch.testing.assert_close(same(), other, **FP32_TOL)


def test_unconvertible_modules_listed_in_one_warning():
    config = dict(target_modules=["q_proj", "v_proj", "embed_tokens"])
    theirs = peft_llama(use_dora=False, **config)
    ours = peft_llama(use_dora=False, **config)
    with pytest.warns(UserWarning) as record:
        peft_ops.from_peft(ours)
    messages = [str(w.message) for w in record if "peft_ops" in str(w.message)]
    assert len(messages) == 1
    assert "model.embed_tokens" in messages[0] and "Embedding" in messages[0]
    assert len(fused_layers(ours)) == 4
    assert_same_numbers(ours, theirs)


def test_mixed_batch_adapter_names_runs_fused():
    # (tests/test_serving.py covers mixed batches in depth: several adapters, DoRA, grads, generate)
    theirs = peft_llama(use_dora=False, target_modules=["q_proj"])
    ours = peft_ops.from_peft(peft_llama(use_dora=False, target_modules=["q_proj"]))
    ours.eval(), theirs.eval()  # PEFT refuses adapter_names in training mode
    ids, _ = batch()
    names = ["default", "__base__"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no fallback
        with torch.no_grad():
            got = ours(input_ids=ids, adapter_names=names).logits
    with torch.no_grad():
        torch.testing.assert_close(got, theirs(input_ids=ids, adapter_names=names).logits, **FP32_TOL)


def test_gpt2_conv1d_fan_in_fan_out():
    def build():
        torch.manual_seed(0)
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return get_peft_model(GPT2LMHeadModel(config),
                              LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                         fan_in_fan_out=True, init_lora_weights=False))

    theirs, ours = build(), build()
    peft_ops.from_peft(ours)
    assert len(fused_layers(ours)) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert_same_numbers(ours, theirs)


def test_bf16_activations_fp32_adapters():
    theirs = peft_llama(use_dora=True, dtype=torch.bfloat16)
    ours = peft_ops.from_peft(peft_llama(use_dora=True, dtype=torch.bfloat16))
    adapter = [p for p in ours.parameters() if p.requires_grad]
    assert adapter and all(p.dtype == torch.float32 for p in adapter)  # PEFT upcasts adapters
    ids, labels = batch()
    logits, _, grads = loss_and_grads(ours, ids, labels)
    ref_logits, _, ref_grads = loss_and_grads(theirs, ids, labels)
    assert logits.dtype == torch.bfloat16
    # PEFT rounds the base GEMM output to bf16 before adding the fp32 adapter path and again after;
    # the fused op rounds once. Logits are O(1), so a few bf16 ulps (2^-8 relative) through two
    # layers: 3e-2 absolute.
    torch.testing.assert_close(logits.float(), ref_logits.float(), atol=3e-2, rtol=3e-2)
    for name, g in ref_grads.items():
        assert grads[name].dtype == torch.float32
        # Gradients inherit the bf16 rounding of the activations they are built from: compare
        # directions (cosine) rather than elements; a wrong term would drop the cosine far below.
        cos = nn.functional.cosine_similarity(grads[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, f"{name}: cosine {cos:.4f}"


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_add_lora_checkpoint_loads_in_peft_and_back(tmp_path, use_dora):
    ours = peft_ops.add_lora(llama(), "all-linear", r=4, lora_alpha=8, use_dora=use_dora,
                             rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 16})
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids, _ = batch()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
    peft_ops.save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(llama(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, **FP32_TOL)
    layer = theirs.base_model.model.model.layers[0]
    assert layer.mlp.down_proj.r["default"] == 2 and layer.self_attn.q_proj.scaling["default"] == 16 / 4
    # ... and back: PEFT saves, we load into a plain model.
    theirs.save_pretrained(tmp_path / "theirs")
    back = peft_ops.load_adapter(llama(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, expected, **FP32_TOL)


def test_qlora_add_lora_matches_peft_on_bnb():
    """add_lora over bitsandbytes bases computes what PEFT computes over the same bases."""
    ours = peft_ops.add_lora(llama(quantize=True), LINEARS, r=4, lora_alpha=8, use_dora=True)
    assert isinstance(ours.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    theirs = get_peft_model(llama(quantize=True), LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS,
                                                            use_dora=True))
    # Copy our adapter into PEFT's layers by name.
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                path, field = name.rsplit(".", 1)
                key = f"base_model.model.{path}.{field}.default.weight"
                theirs_params[key].copy_(p)
    ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, **FP32_TOL)


def test_deepcopy_and_pickle_of_converted_model(tmp_path):
    ours = peft_ops.from_peft(peft_llama(use_dora=False, target_modules=["q_proj"]))
    clone = copy.deepcopy(ours)
    assert len(fused_layers(clone)) == 2
    torch.save(ours, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits)


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "bnb4bit"])
def test_autocast_matches_peft_dtype_and_values(quantize):
    """Trainer(bf16=True) runs the model under autocast: output dtypes must be PEFT's."""
    theirs = peft_llama(use_dora=False, quantize=quantize, target_modules=["q_proj"])
    ours = peft_ops.from_peft(peft_llama(use_dora=False, quantize=quantize, target_modules=["q_proj"]))
    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    x = torch.randn(BATCH, SEQ, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = ours.get_submodule(layer)(x), theirs.get_submodule(layer)(x)
    assert got.dtype == expected.dtype  # bf16 for nn.Linear, the input's fp32 for bitsandbytes
    # PEFT runs both GEMMs in bf16 and rounds in between, we round once: a few bf16 ulps of |y|~1.
    torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_dropout_in_training_only(use_dora):
    theirs = peft_llama(use_dora, target_modules=["v_proj"], lora_dropout=0.3)
    ours = peft_ops.from_peft(peft_llama(use_dora, target_modules=["v_proj"], lora_dropout=0.3))
    ids, _ = batch()
    ours.eval(), theirs.eval()
    with torch.no_grad():
        eval_logits = ours(input_ids=ids).logits
        torch.testing.assert_close(eval_logits, theirs(input_ids=ids).logits, **FP32_TOL)
        ours.train()
        torch.manual_seed(0)
        first = ours(input_ids=ids).logits
        torch.manual_seed(0)
        again = ours(input_ids=ids).logits
        other = ours(input_ids=ids).logits
    assert not torch.allclose(first, eval_logits)  # the dropout is applied ...
    torch.testing.assert_close(first, again)  # ... with masks drawn from torch's RNG (reproducible)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_bnb_compute_dtype_with_fp32_activations(use_dora):
    # prepare_model_for_kbit_training leaves activations in fp32 while each Linear4bit computes
    # in its compute_dtype (bf16): the fused call must run its GEMM in bf16 too (not a slow fp32
    # GEMM with different numbers) and hand back fp32.
    def build():
        model = llama(0, torch.float32, layers=1)
        _to_bnb_nf4(model, torch.bfloat16)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS, use_dora=use_dora, init_lora_weights=False)
        return get_peft_model(model, config)

    theirs, ours = build(), build()   # the same seeds: the same weights and adapters
    peft_ops.from_peft(ours)
    dtypes = []
    real = peft_ops.modules.lora_linear
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peft_ops.modules, "lora_linear", lambda x, *a, **k: dtypes.append(x.dtype) or real(x, *a, **k))
        ids, labels = batch()
        logits, _, grads = loss_and_grads(ours, ids, labels)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    ref_logits, _, ref_grads = loss_and_grads(theirs, ids, labels)
    assert logits.dtype == ref_logits.dtype == torch.float32
    # Both run the base GEMM on bf16 operands; we also feed the adapter the bf16 input and round
    # the layer output to bf16 once (PEFT adds an fp32 adapter output to a bf16-valued base): a
    # few bf16 ulps (2^-8 = 3.9e-3) per layer, hence 2e-2.
    torch.testing.assert_close(logits, ref_logits, atol=2e-2, rtol=2e-2)
    for name in ref_grads:
        scale = ref_grads[name].abs().max()
        err = (grads[name] - ref_grads[name]).abs().max()
        assert err <= 3e-2 * scale, f"{name}: {err} vs {scale}"


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "bnb4bit"])
def test_converted_layers_keep_peft_names(quantize):
    theirs = peft_llama(use_dora=True, quantize=quantize, layers=1)
    ours = peft_ops.from_peft(peft_llama(use_dora=True, quantize=quantize, layers=1))
    assert repr(ours) == repr(theirs)
    assert ("lora.Linear4bit(" if quantize else "lora.Linear(") in repr(ours)
    assert ours.get_layer_status() == theirs.get_layer_status()
    assert ours.get_model_status() == theirs.get_model_status()


def _count_fused_calls(monkeypatch):
    calls = []
    real = peft_ops.modules.lora_linear
    monkeypatch.setattr(peft_ops.modules, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_hotswap_tensor_scaling_runs_fused_and_compiles_once(monkeypatch):
    # prepare_model_for_compiled_hotswap turns every scaling into a 0-d tensor, and a hot-swap then
    # fill_()s it: the fused path must take it, give PEFT's numbers, and a compiled layer must
    # neither break its graph on it nor recompile when it changes.
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    setup = dict(target_modules=["q_proj", "v_proj"], layers=1)
    theirs, ours = peft_llama(False, **setup), peft_ops.from_peft(peft_llama(False, **setup))
    prepare_model_for_compiled_hotswap(theirs)
    prepare_model_for_compiled_hotswap(ours)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.scaling["default"], torch.Tensor)
    calls = _count_fused_calls(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no fallback
        assert_same_numbers(ours, theirs)
    assert len(calls) == 2
    monkeypatch.undo()   # the counter's list would be a guarded input of the compiled graph

    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    x = torch.randn(2, 3, 64)
    reference = theirs.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(x), **FP32_TOL)
        for module in (layer, reference):
            module.scaling["default"].fill_(0.5)       # what a hot-swap does
        torch.testing.assert_close(compiled(x), reference(x), **FP32_TOL)
    assert len(compiles) == 1
    assert any("peft_ops" in str(node.target) for node in compiles[0].graph.nodes)   # the fused op ran
    torch._dynamo.reset()


def test_hooks_on_peft_submodules_fall_back_and_fire(monkeypatch):
    # Activation capture and weight-casting hooks on base_layer / lora_A run under PEFT: with
    # hooks there, the layer must take PEFT's path (said once) so that they fire.
    monkeypatch.setattr(peft_ops.convert, "_warned", set())
    setup = dict(target_modules=["q_proj"], layers=1)
    theirs, ours = peft_llama(False, **setup), peft_ops.from_peft(peft_llama(False, **setup))
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    fired = []
    handles = [
        layer.base_layer.register_forward_pre_hook(lambda m, args: fired.append("base pre")),
        layer.base_layer.register_forward_hook(lambda m, args, out: fired.append("base")),
        layer.lora_A["default"].register_forward_pre_hook(lambda m, args: fired.append("A pre")),
        layer.lora_A["default"].register_forward_hook(lambda m, args, out: fired.append("A")),
    ]
    calls = _count_fused_calls(monkeypatch)
    with pytest.warns(UserWarning, match=r"hooks on base_layer \(forward pre-hook, forward hook\), "
                                         r"lora_A\['default'\] \(forward pre-hook, forward hook\)") as record:
        assert_same_numbers(ours, theirs)
        assert_same_numbers(ours, theirs)
    assert sum("hooks on" in str(w.message) for w in record) == 1
    assert fired == ["base pre", "base", "A pre", "A"] * 2 and calls == []
    for handle in handles:
        handle.remove()
    assert_same_numbers(ours, theirs)
    assert len(calls) == 1   # no hooks left: fused again


def test_base_weight_that_requires_grad_falls_back(monkeypatch):
    # FSDP1 with use_orig_params=True, or a user who unfroze the base: PEFT trains it, so must we.
    monkeypatch.setattr(peft_ops.convert, "_warned", set())
    setup = dict(target_modules=["q_proj"], layers=1)
    theirs, ours = peft_llama(False, **setup), peft_ops.from_peft(peft_llama(False, **setup))
    for model in (ours, theirs):
        model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)
    calls = _count_fused_calls(monkeypatch)
    with pytest.warns(UserWarning, match="the base weight requires grad"):
        grads = assert_same_numbers(ours, theirs)
    assert any(name.endswith("q_proj.base_layer.weight") for name in grads) and calls == []
    with torch.no_grad():   # nothing trains: the fused path is fine
        ours(input_ids=batch()[0])
    assert len(calls) == 1
