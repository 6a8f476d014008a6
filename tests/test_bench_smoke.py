"""The bench harness itself: a tiny suite runs in-process and writes the CSV it promises, and the
saved-for-backward accounting reproduces SPEC §7's PEFT + bitsandbytes numbers.

Timings taken here mean nothing (TRITON_INTERPRET=1, tiny shapes, two rounds) and nothing about
them is asserted; speed targets are checked by `python -m bench`, never by tests.
"""

import csv
import importlib.util

import pytest
import torch

# `bench` is imported by path in conftest.py (the repo root is not on sys.path under pytest)
from bench import cases as C
from bench.__main__ import main as bench_main
from bench.memory import MIB, layer_saved_bytes, saved_bytes
from bench.providers import PROVIDERS, Inputs, make_layer
from bench.suite import COLUMNS, Config, run_suite

HAVE_PEFT_BNB = all(importlib.util.find_spec(m) for m in ("peft", "bitsandbytes"))


def test_tiny_suite_writes_the_long_format_csv(tmp_path):
    cases = C.shape_set("tiny", ["qlora", "lora"], ["forward+backward", "decode"])
    cfg = Config(device="cpu", cases=cases, providers=list(PROVIDERS), out_dir=str(tmp_path),
                 cpu_rounds=2, cpu_warmup=0, memory_table=False, plots=False, quiet=True)
    report = run_suite(cfg)

    errors = [s for s in report.skipped if "unsupported" not in s[2]]
    assert errors == [], errors
    with open(report.csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    expect = ["peft_ops", "torch", "reference", "dequant_addmm"] + (["peft_bnb"] if HAVE_PEFT_BNB else [])
    for case in cases:
        got = {(r["provider"], r["metric"]) for r in rows
               if (r["op"], r["mode"], int(r["M"]), int(r["N"]), int(r["K"]), int(r["r"]), float(r["dropout"])) == case.key()}
        for p in expect:
            assert (p, "time") in got and (p, "tflops") in got and (p, "gbps") in got, (case, p)
            assert ((p, "saved_bytes") in got) == case.trains, (case, p)
        assert ("peft_ops", "ratio_vs_torch") in got
    for r in rows:
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]), r
        assert r["dtype"] == "bf16" and r["torch"] == torch.__version__ and r["git_sha"]


def test_saved_bytes_counts_distinct_storages_and_leaves_out_frozen_tensors():
    w = torch.randn(8, 4)
    x = torch.randn(3, 4, requires_grad=True)

    # x * w[:3] needs only w (a view: all of w's storage is kept) for x's grad; the outer product
    # saves its two fresh 3x4 operands
    assert saved_bytes(lambda x: (x * w[:3]) * (x * 1.5), x) == w.untyped_storage().nbytes() + 2 * 48
    assert saved_bytes(lambda x: (x * w[:3]) * (x * 1.5), x, exclude=[w]) == 2 * 48
    assert saved_bytes(lambda x: x * x, x) == x.untyped_storage().nbytes()  # saved twice, counted once


@pytest.mark.skipif(not HAVE_PEFT_BNB, reason="needs peft and bitsandbytes, the baseline being measured")
@pytest.mark.parametrize("op, dropout, spec_mib", [("qlora", 0.0, 2.03), ("qlora", 0.05, 4.03),
                                                   ("qdora", 0.0, 9.11), ("qdora", 0.05, 16.11)])
def test_peft_bnb_saved_bytes_reproduce_spec(op, dropout, spec_mib):
    case = C.Case(op, "forward", 512, 1024, 1024, 16, dropout=dropout)
    inputs = Inputs.make(case, "cpu")
    mib = layer_saved_bytes(make_layer("peft_bnb", case, inputs), inputs) / MIB
    assert mib == pytest.approx(spec_mib, abs=0.01)


def test_cli_refuses_to_time_under_the_interpreter(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bench_main(["--quick"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


@pytest.mark.skipif(not HAVE_PEFT_BNB, reason="needs bitsandbytes for the dequantize baseline")
def test_cpu_loops_ab_writes_every_case_and_variant(tmp_path, capsys):
    from bench.cpu_loops import main as loops_main
    from peft_ops import _cpu_loops

    if not _cpu_loops.available():
        assert loops_main(["--rounds", "1"]) == 1   # says why, times nothing
        return
    assert loops_main(["--quick", "--rounds", "2", "--threads", "1", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    cases = {r["case"] for r in rows}
    assert len(cases) == 2 and all({r["variant"] for r in rows if r["case"] == c} >= {"native", "torch_passes"}
                                   for c in cases)
    assert all(float(r["median_ms"]) > 0 and r["cpu_loops"].startswith("native") for r in rows)
    assert "native / torch_passes" in (tmp_path / "summary.txt").read_text()
