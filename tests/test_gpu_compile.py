"""Every kernel launch the library makes compiles for a Hopper GPU (sm_90), within bounds, with no
GPU at hand.

The interpreter runs the kernels' logic on CPU but never lowers them, so a kernel that is right
there can still fail on a GPU: refuse to compile (tensor-core `tl.dot` shapes and dtypes, layouts),
refuse to launch (more shared memory than an SM grants one block), or run far below speed
(registers spilled to local memory, a 16-bit GEMM off the tensor cores).

`bench/lowering.py` runs the real forward and backward of every op (LoRA, QLoRA, DoRA, QDoRA;
dropout; bf16 and fp32; decode, small and training batches; r up to 256; odd K) and the NF4
storage launchers with each Triton launch recorded instead of run, then lowers every distinct
launch for sm_90 with the ptxas Triton ships and reads the cubin. So these tests check the
configurations the launchers really pick, not hand-written ones.

Kernels defined under TRITON_INTERPRET=1 (as the test session's are) cannot be compiled, so the
work runs in one child process without it.
"""

import json
import os
import subprocess
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
CHILD = """
import json, sys
sys.path.insert(0, {root!r})
import triton
from bench import lowering
why = lowering.available()
if why:
    print(json.dumps({{"unavailable": why}}))
else:
    rows = lowering.lower(lowering.record())
    print(json.dumps({{"rows": rows, "smem_limit": lowering.SMEM_LIMIT, "triton": triton.__version__}}))
"""
# Other Pythons whose Triton lowers the same launches (space-separated paths). .ci/run sets it to
# an environment with Triton 3.6, the version the lent GPU machines and torch 2.11 have: there the
# launches must compile, fit shared memory and use tensor cores; the spill bound is held for the
# main toolchain only, as register allocation differs between Triton versions.
OTHER_PYTHONS = os.environ.get("PEFT_OPS_LOWERING_PYTHONS", "").split()


def _lower_with(python):
    env = dict(os.environ, TRITON_INTERPRET="0")
    code = CHILD.format(root=os.path.dirname(BENCH_DIR))
    run = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    if "unavailable" in out:
        pytest.skip(out["unavailable"])
    return out


@pytest.fixture(scope="module")
def lowered():
    return _lower_with(sys.executable)


@pytest.fixture(scope="module", params=OTHER_PYTHONS or [None], ids=lambda p: "other-triton" if p else "none")
def lowered_other(request):
    if request.param is None:
        pytest.skip("no other Triton to lower with: set PEFT_OPS_LOWERING_PYTHONS (.ci/run does)")
    return _lower_with(request.param)


def _bad(rows, pred):
    return "\n".join(f"{r['config']} (first in: {r['first_seen_in']}): {r['verdict']}" for r in rows if pred(r))


def test_every_kernel_is_launched_and_compiles(lowered):
    # A kernel the workload never reaches would go unchecked; every one must appear.
    from peft_ops.kernels import decode, dora, dropout, gemm, lora, multi_lora, nf4

    kernels = {name for mod in (lora, decode, gemm, dora, nf4, dropout, multi_lora)
               for name, obj in vars(mod).items() if type(obj).__name__ == "JITFunction" and name.endswith("_kernel")}
    seen = {r["kernel"] for r in lowered["rows"]}
    assert kernels <= seen, f"never launched by the workload: {sorted(kernels - seen)}"


def test_no_register_spills(lowered):
    # 16-bit launches must not spill at all; fp32 FMA launches within the documented bound.
    bad = _bad(lowered["rows"], lambda r: "spills" in r["verdict"])
    assert not bad, bad


def test_shared_memory_fits_one_sm(lowered):
    bad = _bad(lowered["rows"], lambda r: r["shared_bytes"] > lowered["smem_limit"])
    assert not bad, bad


def test_16bit_gemms_use_tensor_cores(lowered):
    bad = _bad(lowered["rows"], lambda r: "tensor-core" in r["verdict"])
    assert not bad, bad
    # and the bound is not vacuous: the training-size GEMMs use Hopper's warpgroup MMA
    for kernel in ("_fused_linear_kernel", "_fused_linear_dx_kernel", "_gemm_forward_kernel", "_gemm_dx_kernel",
                   "_decode_linear_kernel"):
        assert any(r["hgmma"] > 0 for r in lowered["rows"] if r["kernel"] == kernel), kernel


def test_launches_chain_on_sm90_cuda_only(monkeypatch):
    # Programmatic dependent launch: on CUDA GPUs of compute capability 9.0 and newer, never under
    # the interpreter, and off with PEFT_OPS_PDL=0.
    import torch

    from peft_ops.kernels import _config

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    assert _config._pdl_capable.__wrapped__(cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    assert not _config._pdl_capable.__wrapped__(cuda)
    monkeypatch.setattr(_config, "_pdl_capable", lambda device: True)
    monkeypatch.setattr(_config, "interpreting", lambda: False)
    assert _config.pdl_args(cuda) == dict(PDL=True, launch_pdl=True)
    assert _config.pdl_args(torch.device("cpu")) == dict(PDL=False)
    monkeypatch.setenv("PEFT_OPS_PDL", "0")
    assert _config.pdl_args(cuda) == dict(PDL=False)
    monkeypatch.delenv("PEFT_OPS_PDL")
    monkeypatch.setattr(_config, "interpreting", lambda: True)
    assert _config.pdl_args(cuda) == dict(PDL=False)


def test_chained_launches_wait_before_touching_memory(lowered):
    # A launch chained by programmatic dependent launch may start while the one before it runs:
    # its first global-memory access must come after its wait (SASS ACQBULK), and it lets the next
    # launch start (PREEXIT). On sm_90 every kernel of a layer call is chained (not the NF4 storage
    # kernels, quantize and dequantize, nor the dropout mask's, which tests and references use).
    chained = [r for r in lowered["rows"] if r["chained"]]
    assert {r["kernel"] for r in chained} >= {"_lora_shrink_kernel", "_gemm_forward_kernel", "_gemm_dx_kernel",
                                            "_decode_linear_kernel", "_split_k_epilogue_kernel",
                                            "_outer_reduce_kernel", "_fused_linear_kernel", "_fused_linear_dx_kernel",
                                            "_multi_shrink_kernel", "_multi_expand_kernel", "_multi_dx_expand_kernel",
                                            "_segment_outer_reduce_kernel", "_segment_column_dot_kernel",
                                            "_row_norm_kernel", "_row_norm_lut_kernel", "_sqrt_sum_kernel",
                                            "_column_dot_kernel", "_sum_parts_kernel"}
    bad = "\n".join(f"{r['config']}: waits={r['waits']}, {r['memory_before_wait']} before, "
                    f"lets the next start: {r['launches_dependents']}" for r in chained
                    if not (r["waits"] and r["memory_before_wait"] == 0 and r["launches_dependents"]))
    assert not bad, bad
    # and a launch that is not chained has no wait to pay
    assert all(not r["waits"] for r in lowered["rows"] if not r["chained"])


def test_rank_is_chunked(lowered):
    # r = 256 must not turn into a 256-wide register tile: every rank block stays small (64 only
    # with dropout beside bf16 x, where each rank block draws the mask again).
    import re

    blocks = [(int(m), r["config"]) for r in lowered["rows"] for m in re.findall(r"BLOCK_R=(\d+)", r["config"])]
    assert blocks and max(b for b, _ in blocks) <= 64
    assert all(b <= 32 for b, config in blocks if "DROPOUT=True" not in config or "bf16x3" not in config), blocks


def test_other_triton_compiles_and_fits(lowered, lowered_other):
    # Every launch compiles there too (a child that fails to compile one exits non-zero above),
    # and the same launches are recorded; shared memory and tensor cores hold as well.
    assert lowered_other["triton"] != lowered["triton"]
    assert {r["config"] for r in lowered_other["rows"]} == {r["config"] for r in lowered["rows"]}
    bad = _bad(lowered_other["rows"], lambda r: r["shared_bytes"] > lowered_other["smem_limit"]
               or "tensor-core" in r["verdict"])
    assert not bad, f"with Triton {lowered_other['triton']}:\n{bad}"
