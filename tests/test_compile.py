"""torch.compile(fullgraph=True) over the fused layers, and the registered ops' contracts.

These tests run the PyTorch twins (the `twin` fixture makes `interpreting()` false): a compiled
graph calls our ops as opaque custom ops, so which backend runs inside them is what
tests/test_lora.py covers; the interpreter would only make compiled runs slow. Backends:
`inductor` (what users run) for the model test, `aot_eager` (dynamo + AOTAutograd, fake tensors,
no codegen) where RNG must match eager exactly or time matters.
"""

import pytest
import torch
from torch import nn

import peft_ops
from peft_ops import _library as lib
from peft_ops import nf4 as nf4_module
from peft_ops import ops
from peft_ops.kernels import _config


@pytest.fixture
def twin(monkeypatch):
    monkeypatch.setattr(_config, "interpreting", lambda: False)
    monkeypatch.setattr(nf4_module, "interpreting", lambda: False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def graph_breaks():
    return sum(torch._dynamo.utils.counters["graph_break"].values())


# --- the ops' schemas and fake implementations ---------------------------------------------------

def _op_cases():
    gen = torch.Generator().manual_seed(0)
    M, N, K, r = 6, 10, 64, 3
    x = torch.randn(M, K, generator=gen)
    A, B = torch.randn(r, K, generator=gen), torch.randn(N, r, generator=gen)
    xa, dy = torch.randn(M, r, generator=gen), torch.randn(M, N, generator=gen)
    mn, bias = torch.rand(N, generator=gen) + 0.5, torch.randn(N, generator=gen)
    seed = torch.tensor(17)
    dense = lib.weight_operands(torch.randn(N, K, generator=gen))
    nf4 = lib.weight_operands(peft_ops.NF4Weight.quantize(torch.randn(N, K, generator=gen)))
    P = torch.ops.peft_ops
    cases = [(P.lora_shrink, (x, A, 0.0, None, False)), (P.lora_shrink, (x, A, 0.3, seed, True)),
             (P.outer_reduce, (xa, x, 0.3, seed, 0.5, None)), (P.outer_reduce, (dy, xa, 0.0, None, 2.0, mn)),
             (P.column_dot, (dy, dy))]
    for tensors, meta, offset in (dense, nf4):
        w = (*tensors, meta, offset)
        cases += [
            (P.fused_linear, (x, *w, xa, B, 0.5, bias, None, None, 1.0, False, (2, 3))),
            (P.fused_linear, (x, *w, xa, B, 0.5, None, mn, x * 2, 2.0, True, (M,))),
            (P.fused_linear_dx, (dy, *w, xa, A, 0.5, mn, None, 0.0, None, torch.float32)),
            (P.fused_linear_dx, (dy.bfloat16(), *w, xa, A, 0.5, None, mn, 0.3, seed, torch.bfloat16)),
            (P.row_norm, (*w, A, B, 0.5)),
        ]
    return cases


def test_ops_pass_opcheck(twin):
    # Schema, fake (meta) shapes/dtypes/strides against the real op, and AOT dispatch with
    # dynamic shapes, for every op, dense and NF4 weights, with and without dropout.
    for op, args in _op_cases():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# --- a model with LoRA and DoRA layers, dense and NF4 bases ---------------------------------------

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lora_dense, self.lora_nf4 = nn.Linear(64, 48), nn.Linear(48, 64)
        self.dora_dense, self.dora_nf4 = nn.Linear(64, 40), nn.Linear(40, 24, bias=False)

    def forward(self, x):
        x = torch.relu(self.lora_nf4(torch.relu(self.lora_dense(x))))
        return self.dora_nf4(torch.tanh(self.dora_dense(x)))


def tiny_model(dropout=0.0):
    torch.manual_seed(0)
    model = Tiny()
    model.lora_nf4 = peft_ops.NF4Linear.from_linear(model.lora_nf4)
    model.dora_nf4 = peft_ops.NF4Linear.from_linear(model.dora_nf4)
    peft_ops.add_lora(model, ["lora_dense", "lora_nf4"], r=4, lora_alpha=8, lora_dropout=dropout)
    peft_ops.add_lora(model, ["dora_dense", "dora_nf4"], r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True)
    with torch.no_grad():   # B ≠ 0 and m ≠ ‖W‖, so every branch shows in the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
            elif "magnitude" in name:
                p.mul_(1.3)
    for name, p in model.named_parameters():   # the second add_lora keeps the first one's adapters trainable
        assert p.requires_grad == (name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_magnitude_vector")), name
    return model


def run(model, x):
    model.zero_grad()
    x = x.detach().requires_grad_()
    y = model(x)
    (y.float() ** 2).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def test_compiled_model_matches_eager(twin, monkeypatch):
    model = tiny_model()
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))
    calls = []
    for name in ("fused_linear", "fused_linear_dx", "row_norm", "column_dot"):
        fn = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    y, dx, grads = run(model, x)
    eager_calls, calls[:] = list(calls), []

    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    y_c, dx_c, grads_c = run(compiled, x)
    assert graph_breaks() == 0
    # The compiled forward and backward ran our ops, as many times as eager did (nothing was
    # decomposed or re-traced into something else, nothing fell back to eager).
    assert sorted(calls) == sorted(eager_calls) and calls.count("fused_linear") == 4
    # Inductor may fuse the elementwise glue (m/n, s·dA, casts) differently: fp32 rounding only.
    torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_c, dx, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads.keys() and len(grads) == 2 * 4 + 2
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_dropout_draws_seed_in_graph(twin, autocast):
    # Training with dropout and no seed: the seed is drawn as a tensor inside the graph (no
    # `.item()`, no graph break), saved for backward, and drawn from torch's generator exactly as
    # eager draws it, so with aot_eager the masks, outputs and grads are eager's, bit for bit.
    # Two batch sizes: the second call recompiles once with a dynamic M and must still match.
    # With bf16 autocast the layers run in bf16 with fp32 adapters.
    model = tiny_model(dropout=0.3).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(2)
    outputs = []
    for batch in (3, 5, 5):
        x = torch.randn(batch, 64, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            torch.manual_seed(100 + len(outputs))
            y, dx, grads = run(model, x)
            torch.manual_seed(100 + len(outputs))
            y_c, dx_c, grads_c = run(compiled, x)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert torch.equal(y_c, y) and torch.equal(dx_c, dx)
        for name, g in grads.items():
            assert torch.equal(grads_c[name], g), name
        outputs.append(y_c)
    assert graph_breaks() == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    # A fresh seed each step: the same input under another seed gives another output.
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        again, _, _ = run(compiled, x)
    assert not torch.equal(again, outputs[-1])


def test_compiled_functional_with_explicit_seed(twin):
    # `lora_linear` itself under compile, NF4 base, bf16 activations with fp32 adapters, a seed
    # given as an int: equal to eager.
    gen = torch.Generator().manual_seed(3)
    W = peft_ops.NF4Weight.quantize(torch.randn(24, 32, generator=gen).bfloat16())
    x = torch.randn(4, 3, 32, generator=gen).bfloat16()
    A = torch.randn(4, 32, generator=gen).requires_grad_()
    B = torch.randn(24, 4, generator=gen).requires_grad_()
    m = (torch.rand(24, generator=gen) + 0.5).requires_grad_()

    def f(x):
        return peft_ops.lora_linear(x, W, A, B, 0.5, magnitude=m, dropout=0.2, training=True, seed=11)

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        xx = x.clone().requires_grad_()
        y = fn(xx)
        y.float().sum().backward()
        results.append([y, xx.grad] + [t.grad.clone() for t in (A, B, m)])
        for t in (A, B, m):
            t.grad = None
    assert graph_breaks() == 0
    assert results[0][0].shape == (4, 3, 24) and results[0][0].dtype == torch.bfloat16
    for eager, compiled in zip(*results):
        assert torch.equal(compiled, eager)
