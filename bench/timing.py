"""Timers. GPU: `triton.testing.do_bench` per provider (it warms up, flushes L2 between runs and
returns quantiles). CPU: all providers of a case interleaved round by round with
`time.perf_counter`, so slow drift of the machine (frequency, other load) hits every provider
alike, and per-round ratios between providers are paired samples."""

import math
import time

import torch

QUANTILES = (0.5, 0.2, 0.8)
MIN_ROUND_MS = 2.0    # CPU: a round of one closure lasts at least about this long
MAX_CALLS = 32


def quantiles(samples, qs=QUANTILES):
    t = torch.tensor(samples, dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in qs]


def gpu_time_ms(fn, warmup_ms=25, rep_ms=100):
    """(p50, p20, p80) in milliseconds."""
    from triton.testing import do_bench

    return tuple(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES)))


def gpu_peak_extra_mib(fn):
    """Peak of memory allocated during one call, above what was allocated before it (MiB)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - before) / 2**20


def cpu_time_rounds_ms(fns: dict, warmup=2, rounds=15, budget_s=None, min_round_ms=MIN_ROUND_MS):
    """Interleaved timing on CPU: `warmup` untimed calls each, then up to `rounds` rounds in which
    every closure runs (order rotated each round). A closure faster than `min_round_ms` runs
    several times back to back in each round (as many as one probe call says reach it, at most
    `MAX_CALLS`), so that a sub-millisecond call's round is not one timer-and-scheduler-sized
    sample. Returns {name: [ms per call, one entry per round]}. Stops after at least 3 rounds once
    `budget_s` is spent."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    calls = {}
    for name in names:
        t0 = time.perf_counter()
        fns[name]()
        probe_ms = (time.perf_counter() - t0) * 1e3
        calls[name] = max(1, min(MAX_CALLS, math.ceil(min_round_ms / max(probe_ms, 1e-3))))
    samples = {n: [] for n in names}
    start = time.perf_counter()
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            fn, n = fns[name], calls[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) * 1e3 / n)
        if budget_s is not None and i >= 2 and time.perf_counter() - start > budget_s:
            break
    return samples
