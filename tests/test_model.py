"""The static sm_90 cost model (`bench.model`, `bench.sass`): its loop finder, its trip counts, its
ranking of a wasteful kernel, and a quick run of the whole model.

Kernels defined under TRITON_INTERPRET=1 (as this session's are) cannot be compiled, so the
compiling checks run in one child process without it, on kernels of known structure
(tests/sm90_probe_kernels.py) and on the library's own launches, and report back as JSON.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

CHILD = r"""
import json, math, os, sys, tempfile
sys.path[:0] = [{root!r}, {tests!r}]
import torch
from bench import cases as C, lowering, model, sass
why = lowering.available()
if why:
    print(json.dumps({{"unavailable": why}}))
    sys.exit(0)
import sm90_probe_kernels as probe

out = {{}}

def record(fn):
    with lowering.recording() as rec:
        fn()
    return rec.calls

def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")

# 1. the loop finder on a kernel of known structure
# a wide block: tiny loop bodies get unrolled by LLVM (a main loop plus remainder loops)
calls = record(lambda: probe.nested_then_flat[(6,)](meta(35 * 8192), meta(6 * 8192), 5, 7, BLOCK=8192,
                                                    enable_fp_fusion=False))
call = calls[0]
facts = model.analyse(model._job(call.launch))
roots = [model._json_loop(d) for d in facts["loops"]]
out["forest"] = [[len(r.children), [len(c.children) for c in r.children]] for r in roots]
out["inner_loads"] = roots[0].children[0].own.get("lsu", 0) if roots and roots[0].children else 0
out["second_loads"] = roots[1].own.get("lsu", 0) if len(roots) > 1 else -1
out["second_fma"] = roots[1].own.get("fma", 0) if len(roots) > 1 else 0
model.LOOPS["nested_then_flat"] = lambda a: [
    model.LoopSpec("i", a["n"], [model.LoopSpec("j", a["m"])]), model.LoopSpec("i2", a["n"])]
cost = model.triton_cost(model.H200, call, facts)
outer, inner, second = roots[0], roots[0].children[0], roots[1]
expected = sum(facts["outside"].values()) + 5 * outer.own_size + 5 * 7 * inner.own_size + 5 * second.own_size
out["warp_instructions"] = cost.detail["warp_instructions"]
out["expected_warp_instructions"] = expected * 4 * 6   # 4 warps, 6 programs

# 2. a wasteful variant of the same decode loop is predicted slower
def decode(kernel):
    calls = record(lambda: kernel[(528,)](meta(528 * 64 * 8192, dtype=torch.uint8), meta(32), meta(528 * 64),
                                          meta(528 * 8192), 64, BLOCK=8192,
                                          enable_fp_fusion=False))
    model.LOOPS[kernel.__name__] = lambda a: [model.LoopSpec("t", a["trips"], hot=True)]
    facts = model.analyse(model._job(calls[0].launch))
    cost = model.triton_cost(model.H200, calls[0], facts)
    return cost.seconds, cost.detail["hot_loop_instructions"]
out["lean"], out["wasteful"] = decode(probe.decode_lean), decode(probe.decode_wasteful)

# 3. trip counts against the grid: every GEMM launch covers each weight element once per M tile
cover = []
for case in (C.Case("qlora", "forward+backward", 4096, 4096, 4096, 16), C.Case("qdora", "decode", 16, 14336, 4096, 16),
             C.Case("qlora", "forward+backward", 512, 1024, 4096, 64), C.Case("qlora", "decode", 1, 4096, 14336, 16),
             C.Case("lora", "decode", 16, 4096, 4096, 16)):
    events, _ = model.trace_case(case, "peft_ops")
    for e in events:
        if not isinstance(e, lowering.Call):
            continue
        args = dict(e.arguments, **e.launch.constexprs)
        for spec in model.LOOPS[e.launch.kernel.__name__](args):
            if not spec.elements:
                continue
            programs = e.grid[0] * e.grid[1] * e.grid[2]
            m_tiles = math.ceil(args["M"] / args["BLOCK_M"]) if "BLOCK_M" in args and "M" in args else 1
            trips = spec.total or programs * spec.trips
            cover.append([case.label(), e.launch.kernel.__name__, trips * spec.elements,
                          case.N * case.K * m_tiles])
out["cover"] = cover

# 4. the quick model, start to end
folder = tempfile.mkdtemp()
preds = model.run(quick=True, out_dir=folder, workers=2, say=lambda *a: None)
out["providers"] = sorted({{p.provider for p in preds}})
out["gpus"] = sorted({{p.gpu.name for p in preds}})
out["nonpositive"] = [p.case.label() for p in preds if not p.seconds > 0]
with open(os.path.join(folder, "model.csv")) as f:
    import csv
    rows = list(csv.DictReader(f))
out["metrics"] = sorted({{r["metric"] for r in rows}})
out["labelled"] = all("static model" in r["device"] for r in rows) and all("lower bound" in r["note"] for r in rows)
with open(os.path.join(folder, "model_summary.txt")) as f:
    summary = f.read()
out["not_modelled"] = summary.split("Not modelled")[1].split("\n\n")[0] if "Not modelled" in summary else ""
out["has_targets"] = "Targets on H200" in summary
out["bounds"] = [line for line in summary.splitlines() if line.startswith("sm_90 bounds over")]

# 5. the calibration a GPU run writes: measured / predicted for each timed case the model covers
from bench.suite import _env, _row
env = dict(_env("cpu"), device="NVIDIA H100 80GB HBM3")
timed = [C.Case("qlora", "decode", 16, 4096, 4096, 16), C.Case("qlora", "forward", 4096, 4096, 4096, 16)]
measured = [_row(env, c, p, "time", "ms", t) for c in timed for p, t in (("peft_ops", 0.05), ("torch", 0.25))]
rows, failures = model.calibrate(timed + [C.Case("lora", "decode", 1, 64, 64, 4)], measured, env["device"], env)
pairs = {{}}
for r in rows:
    pairs.setdefault((r["op"], r["M"], r["provider"]), {{}})[r["metric"]] = float(r["p50"])
out["calibration"] = [[k[0], k[1], k[2], v["predicted_time"], v["measured_over_predicted"]] for k, v in sorted(pairs.items())]
out["calibration_devices"] = sorted({{r["device"] for r in rows}})
out["calibration_failures"] = failures

# 6. a launch chained to the one before it (programmatic dependent launch) pays no launch cost
chains = []
m = model.Model(workers=2)
for case in (C.Case("qlora", "forward", 4096, 4096, 4096, 16),
             C.Case("qlora", "forward", 4096, 4096, 4096, 16, dropout=0.05)):
    pred = m.predict(case, "peft_ops", model.H200)
    events, _ = m.trace(case, "peft_ops")
    for prev, e, cost in zip([None] + list(events[:-1]), events, pred.costs):
        chains.append([case.dropout, cost.what, model.chains(prev, e), cost.seconds - max(cost.terms.values())])
out["chains"] = chains
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    env = dict(os.environ, TRITON_INTERPRET="0", PEFT_OPS_MODEL_CACHE=str(tmp_path_factory.mktemp("sm90")))
    run = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, tests=TESTS)], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    if "unavailable" in out:
        pytest.skip(out["unavailable"])
    return out


def test_loop_finder_sees_the_known_structure(child):
    # two top-level loops; the first holds one loop with no loop inside it
    assert child["forest"] == [[1, [0]], [0, []]]
    assert child["inner_loads"] >= 1             # the loads live in the inner loop ...
    assert child["second_loads"] == 0            # ... and none in the arithmetic loop
    assert child["second_fma"] >= 1


def test_issued_instructions_follow_trips_and_grid(child):
    assert child["warp_instructions"] == child["expected_warp_instructions"]


def test_wasteful_variant_is_predicted_slower(child):
    (lean_s, lean_loop), (waste_s, waste_loop) = child["lean"], child["wasteful"]
    assert waste_loop > lean_loop
    assert waste_s > lean_s * 1.05


def test_gemm_trips_cover_each_weight_element_once_per_m_tile(child):
    assert child["cover"], "no GEMM launch with a weight-tile hot loop was traced"
    bad = [c for c in child["cover"] if c[2] != c[3]]
    assert not bad, bad


def test_quick_model_runs_and_labels_every_figure(child):
    assert child["providers"] == ["dequant_addmm", "peft_bnb", "peft_ops", "torch"]
    assert child["gpus"] == ["H100 SXM", "H200"]
    assert not child["nonpositive"]
    assert "predicted_time" in child["metrics"] and any(m.startswith("ratio_vs_") for m in child["metrics"])
    assert child["labelled"]
    assert not child["not_modelled"], child["not_modelled"]
    assert child["has_targets"]


# --- costing outside Triton (no compile needed) ----------------------------------------------------

def test_a_cublas_gemm_costs_its_flops_at_the_measured_rate():
    from bench import model

    events = []
    with model._DeviceOps(events):
        a = torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta")
        a @ a
        a.t()                      # a view launches nothing
    assert [e.name for e in events] == ["aten.mm"]
    cost = model.device_op_cost(model.H200, events[0])
    assert cost.bound == "cublas"
    assert cost.seconds == pytest.approx(2 * 4096 ** 3 / 790e12 + model.H200.launch_s)


def test_bitsandbytes_dispatch_is_its_own_decision():
    pytest.importorskip("bitsandbytes", reason="the rule is read from the installed bitsandbytes")
    from bench import model

    # bitsandbytes' sm_90 dispatch: fused at decode sizes, dequantize + cuBLAS at training sizes
    assert model._bnb_fused(torch.bfloat16, 1, 4096, 4096)
    assert model._bnb_fused(torch.bfloat16, 16, 14336, 4096)
    assert not model._bnb_fused(torch.bfloat16, 4096, 4096, 4096)


def test_calibration_is_measured_over_predicted(child):
    # Only the timed (case, provider) pairs, each with its prediction for the GPU the bench ran on
    # (an H100 here) and measured / predicted from the measured median.
    cal = child["calibration"]
    assert [(op, M, p) for op, M, p, _, _ in cal] == [("qlora", 16, "peft_ops"), ("qlora", 16, "torch"),
                                                      ("qlora", 4096, "peft_ops"), ("qlora", 4096, "torch")]
    measured_ms = {"peft_ops": 0.05, "torch": 0.25}
    for op, M, provider, predicted_us, ratio in cal:
        assert predicted_us > 0
        assert abs(ratio - measured_ms[provider] * 1e3 / predicted_us) <= 1e-4 * ratio
    assert not child["calibration_failures"]
    assert any("H100 SXM (static model)" in d for d in child["calibration_devices"])
    assert any("(measured) / H100 SXM (static model)" in d for d in child["calibration_devices"])


def test_quick_model_launches_hold_the_lowering_bounds(child):
    # The model compiles every launch of its cases (the Llama shapes): they must hold the bounds
    # the lowering test holds its own small workload to, and the summary says so.
    assert len(child["bounds"]) == 1 and child["bounds"][0].endswith(": all hold"), child["bounds"]


def test_chained_launches_pay_no_launch_cost(child):
    from bench import model

    rows = child["chains"]
    # the shrink starts the chain and the GEMM after it is chained to it; with dropout the
    # shrink's K splits are summed between them, by a chained launch too
    assert [(what, chained) for p, what, chained, _ in rows if not p] == [("_lora_shrink_kernel", False),
                                                                       ("_gemm_forward_kernel", True)]
    assert [(what, chained) for p, what, chained, _ in rows if p] == [("_lora_shrink_kernel", False),
                                                                   ("_sum_parts_kernel", True),
                                                                   ("_gemm_forward_kernel", True)]
    for _, what, chained, beyond_work in rows:
        assert beyond_work == pytest.approx(0.0 if chained else model.H200.launch_s, abs=1e-12), what
