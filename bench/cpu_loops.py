"""The CPU path's native loops against the PyTorch passes they replace, and against what the
baselines run for the same job: ``python -m bench.cpu_loops [--threads N] [--rounds R] [--out DIR]``.

Cases: the dropout keep mask of a 256 x 1024 input (PEFT's `nn.Dropout` on that bf16 input beside
it: a different stream, and one it stores for backward) and the bf16 NF4 dequantize of three
weights (bitsandbytes' `dequantize_4bit` beside it). Each round times every variant of every
case once (interleaved, so a slow spell of a busy machine hits all of them), each timing a run
of calls of at least 2 ms; the summary has the medians over the rounds and their ratios. CPU
only; the CPU model, its ISA and what the loops were built as head the output.
"""

import argparse
import csv
import os
import statistics
import sys
import time

import torch

from .suite import cpu_facts, git_sha

MIN_TIME_S = 0.002


def _ms_a_call(fn):
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= MIN_TIME_S:
            return elapsed / calls * 1e3


def _loops(mode, fn):
    """fn with `PEFT_OPS_CPU_LOOPS=mode` (read at each call)."""
    def call():
        before = os.environ.get("PEFT_OPS_CPU_LOOPS")
        os.environ["PEFT_OPS_CPU_LOOPS"] = mode
        try:
            return fn()
        finally:
            if before is None:
                del os.environ["PEFT_OPS_CPU_LOOPS"]
            else:
                os.environ["PEFT_OPS_CPU_LOOPS"] = before
    return call


def cases(weights=((1024, 1024), (4096, 1024), (4096, 4096))):
    """{case: {variant: fn}}, the baseline's own op last; `weights`: the (N, K) to dequantize."""
    import bitsandbytes.functional as bnb_f

    from peft_ops import NF4Weight, nf4, ops

    out = {}
    x = torch.randn(256, 1024).to(torch.bfloat16)
    dropout = torch.nn.Dropout(0.05)
    out["dropout keep mask 256x1024 p=0.05"] = {
        "native": _loops("native", lambda: ops.dropout_keep(5, (256, 1024), 0.05)),
        "torch_passes": _loops("torch", lambda: ops.dropout_keep(5, (256, 1024), 0.05)),
        "peft_nn_dropout": lambda: dropout(x)}
    for N, K in weights:
        dense = torch.randn(N, K).to(torch.bfloat16)
        packed, state = bnb_f.quantize_4bit(dense, blocksize=64, quant_type="nf4", compress_statistics=True)
        w = NF4Weight.from_bnb(packed, state)   # the same bytes for both
        # (the CPU twin itself: `NF4Weight.dequantize` would run the Triton kernel under the interpreter)
        out[f"nf4_dequantize bf16 N={N} K={K}"] = {
            "native": _loops("native", lambda w=w: nf4._dequantize_torch(w, torch.bfloat16)),
            "torch_passes": _loops("torch", lambda w=w: nf4._dequantize_torch(w, torch.bfloat16)),
            "bitsandbytes": lambda p=packed, s=state: bnb_f.dequantize_4bit(p, s)}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_loops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--out", help="folder for results.csv and summary.txt (default: print only)")
    parser.add_argument("--quick", action="store_true", help="the mask and one 1024 x 1024 weight only")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.rounds < 1:
        parser.error("--threads and --rounds: expected positive integers")
    torch.set_num_threads(args.threads)
    from peft_ops import _cpu_loops

    if not _cpu_loops.available():
        print(f"the native loops are not available here: {_cpu_loops.describe()}", file=sys.stderr)
        return 1
    table = cases(((1024, 1024),)) if args.quick else cases()
    times = {c: {v: [] for v in variants} for c, variants in table.items()}
    for _ in range(args.rounds):
        for c, variants in table.items():
            for v, fn in variants.items():
                times[c][v].append(_ms_a_call(fn))
    facts = cpu_facts()
    lines = [f"CPU: {facts['cpu_model']}; {facts['cpu_isa']}; loops: {facts['cpu_loops']}; torch {torch.__version__}; "
             f"{args.threads} thread(s), {args.rounds} interleaved rounds, medians (ms a call)"]
    rows = []
    for c, variants in times.items():
        median = {v: statistics.median(t) for v, t in variants.items()}
        baseline = list(median)[-1]
        lines.append(f"{c}: " + ", ".join(f"{v} {m:.3f}" for v, m in median.items()) +
                     f" | native / torch_passes {median['native'] / median['torch_passes']:.2f}x, "
                     f"native / {baseline} {median['native'] / median[baseline]:.2f}x")
        for v, m in median.items():
            rows.append(dict(case=c, variant=v, threads=args.threads, rounds=args.rounds, median_ms=f"{m:.4f}",
                             p20_ms=f"{statistics.quantiles(times[c][v], n=5)[0]:.4f}" if args.rounds > 1 else "",
                             cpu_model=facts["cpu_model"], cpu_isa=facts["cpu_isa"], cpu_loops=facts["cpu_loops"],
                             torch=torch.__version__, git_sha=git_sha()))
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with open(os.path.join(args.out, "summary.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
