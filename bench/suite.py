"""Runs cases x providers, writes one long-format CSV, prints the summary.

One row per (case, provider, metric) with p50 / p20 / p80:
- `time` (ms): GPU `do_bench` quantiles; CPU quantiles over interleaved rounds;
- `tflops` (TFLOP/s) and `gbps` (GB/s): the case's nominal work (cases.py) over the time
  quantiles (p20 of a rate comes from p80 of the time);
- `peak_mem_extra` (MiB, CUDA only): peak allocated during one call above what was allocated
  before it (activations, saved tensors, dequantized buffers, outputs and grads);
- `saved_bytes` (MiB, training modes): saved-for-backward bytes of one forward (memory.py);
- `ratio_vs_<provider>` (x, peft_ops rows): time(peft_ops) / time(provider), lower is better;
  on CPU the quantiles of the per-round paired ratios, on GPU the ratio of medians.
"""

import csv
import datetime as _dt
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field

import torch

from . import cases as C
from . import memory, timing
from .providers import PROVIDERS, Inputs, Unsupported, make_layer

COLUMNS = ["op", "provider", "mode", "M", "N", "K", "r", "dtype", "adapter_dtype", "dropout",
           "metric", "unit", "p50", "p20", "p80", "device", "cpu_model", "cpu_isa", "cpu_gemm",
           "cpu_loops", "torch", "triton", "git_sha", "timestamp", "note"]
OURS = "peft_ops"
# CPU target: in every case, peft_ops' CPU path at most as slow as PEFT + bitsandbytes (paired
# median). CPU ratios depend on the CPU (bf16 units or not), hence the cpu_* columns on every row.
CPU_BASELINE, CPU_MAX_RATIO = "peft_bnb", 1.0


@dataclass
class Config:
    device: str
    cases: list
    providers: list
    out_dir: str
    cpu_rounds: int = 15
    cpu_warmup: int = 2
    cpu_case_budget_s: float = 10.0
    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100
    budget_s: float = float("inf")      # whole-suite time budget; cases past it are counted, not run
    memory_table: bool = True
    lowering: bool = False              # lower every launch for sm_90 and read the cubins (lowering.py)
    model: bool = False                 # the static sm_90 model (CPU: every gpu case; GPU: measured / predicted)
    plots: bool = True
    quiet: bool = False


@dataclass
class Report:
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)     # (case label, provider, reason)
    notes: dict = field(default_factory=dict)       # (provider, note) -> count of cases
    memory_rows: list = field(default_factory=list)
    lowering_rows: list = field(default_factory=list)
    lowering_note: str = ""
    model_lines: list = field(default_factory=list)
    csv_path: str = ""
    summary: str = ""


def device_tag(device):
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"cpu-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_out_dir(device):
    """bench/out/<device-tag>-<date-time>/: git-ignored, so a run leaves nothing untracked in the
    repository. Results meant to be committed go under bench/results/ with --out."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", f"{device_tag(device)}-{stamp}")


def git_sha():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_facts():
    """What a CPU timing depends on (SPEC §7): the CPU model and core count, torch's vector ISA with
    the bf16 matrix units (AVX512-BF16, AMX) present or not, and the dtype of the CPU path's base
    GEMMs for bf16 activations that this picks (`PEFT_OPS_CPU_PRECISION`, default auto), and
    what its dropout masks and NF4 decode run as (`PEFT_OPS_CPU_LOOPS`: the native loops, or the
    PyTorch passes and why)."""
    from peft_ops import _cpu_loops, ops

    units = ops.cpu_bf16_units()
    isa = " ".join([torch.backends.cpu.get_cpu_capability()] +
                   [f"{u}={'yes' if u in units else 'no'}" for u in ("avx512_bf16", "amx_bf16")])
    precision = os.environ.get("PEFT_OPS_CPU_PRECISION", "auto") or "auto"
    gemm = f"{C.dtype_name(ops.cpu_gemm_dtype(torch.bfloat16))} (PEFT_OPS_CPU_PRECISION={precision})"
    return dict(cpu_model=f"{cpu_model()} x{os.cpu_count()}", cpu_isa=isa, cpu_gemm=gemm,
                cpu_loops=_cpu_loops.describe())


def _env(device):
    import triton
    cpu = cpu_facts()
    dev = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else f"cpu {cpu['cpu_model']}"
    return dict(device=dev, **cpu, torch=torch.__version__, triton=triton.__version__, git_sha=git_sha(),
                timestamp=_dt.datetime.now().astimezone().isoformat(timespec="seconds"))


def _row(env, case, provider, metric, unit, p50, p20="", p80="", note=""):
    return dict(op=case.op, provider=provider, mode=case.mode, M=case.M, N=case.N, K=case.K, r=case.r,
                dtype=C.dtype_name(case.dtype), adapter_dtype=C.dtype_name(case.adapter_dtype),
                dropout=case.dropout, metric=metric, unit=unit, p50=_num(p50), p20=_num(p20), p80=_num(p80),
                note=note, **env)


def _num(v):
    return v if v == "" else f"{v:.6g}"


def _rate_rows(env, case, name, t50, t20, t80, note):
    f, b = C.flops(case), C.nbytes(case)
    return [_row(env, case, name, "tflops", "TFLOP/s", f / t50 / 1e9, f / t80 / 1e9, f / t20 / 1e9, note),
            _row(env, case, name, "gbps", "GB/s", b / t50 / 1e6, b / t80 / 1e6, b / t20 / 1e6, note)]


def run_case(cfg: Config, case, env, report: Report):
    cuda = cfg.device.startswith("cuda")
    try:
        inputs = Inputs.make(case, cfg.device)
    except Exception as e:
        for name in cfg.providers:
            report.skipped.append((case.label(), name, f"inputs: {e!r}"))
        return
    layers, closures = {}, {}
    for name in cfg.providers:
        prov = PROVIDERS[name]
        missing = prov.missing()
        if missing:
            report.skipped.append((case.label(), name, f"{missing} not installed"))
            continue
        try:
            layer = make_layer(name, case, inputs)
            fn = layer.closure(case, inputs)
            fn()  # first call outside the timer: compiles, autotunes, and surfaces errors here
        except Unsupported as e:
            report.skipped.append((case.label(), name, f"unsupported: {e}"))
            continue
        except Exception as e:
            report.skipped.append((case.label(), name, f"error: {type(e).__name__}: {e}"[:300]))
            continue
        layers[name], closures[name] = layer, fn
        if layer.note:
            report.notes[(name, layer.note)] = report.notes.get((name, layer.note), 0) + 1

    times = {}
    if cuda:
        for name, fn in closures.items():
            times[name] = timing.gpu_time_ms(fn, cfg.gpu_warmup_ms, cfg.gpu_rep_ms)
        peaks = {name: timing.gpu_peak_extra_mib(fn) for name, fn in closures.items()}
        rounds = None
    elif closures:
        rounds = timing.cpu_time_rounds_ms(closures, warmup=cfg.cpu_warmup, rounds=cfg.cpu_rounds, budget_s=cfg.cpu_case_budget_s)
        times = {name: tuple(timing.quantiles(s)) for name, s in rounds.items()}
        peaks = {}

    for name, (t50, t20, t80) in times.items():
        note = layers[name].note
        report.rows.append(_row(env, case, name, "time", "ms", t50, t20, t80, note))
        report.rows += _rate_rows(env, case, name, t50, t20, t80, note)
        if name in peaks:
            report.rows.append(_row(env, case, name, "peak_mem_extra", "MiB", peaks[name], note=note))
        if case.trains:
            mib = memory.layer_saved_bytes(layers[name], inputs) / memory.MIB
            report.rows.append(_row(env, case, name, "saved_bytes", "MiB", mib, mib, mib, note))
    if OURS in times:
        for base in times:
            if base == OURS:
                continue
            if rounds is not None:
                paired = [a / b for a, b in zip(rounds[OURS], rounds[base])]
                q = timing.quantiles(paired)
                report.rows.append(_row(env, case, OURS, f"ratio_vs_{base}", "x", *q, note="paired rounds"))
            else:
                report.rows.append(_row(env, case, OURS, f"ratio_vs_{base}", "x",
                                        times[OURS][0] / times[base][0], note="ratio of medians"))
    del layers, closures, inputs
    if cuda:
        torch.cuda.empty_cache()


def run_suite(cfg: Config) -> Report:
    report = Report()
    env = _env(cfg.device)
    start = time.perf_counter()
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, flush=True))
    for i, case in enumerate(cfg.cases):
        if time.perf_counter() - start > cfg.budget_s:
            for c in cfg.cases[i:]:
                report.skipped.append((c.label(), "*", f"time budget of {cfg.budget_s:.0f} s spent"))
            break
        t0 = time.perf_counter()
        run_case(cfg, case, env, report)
        say(f"[{i + 1}/{len(cfg.cases)}] {case.label()}  ({time.perf_counter() - t0:.1f} s)")

    if cfg.memory_table:
        report.memory_rows = memory.memory_table(cfg.device, providers=[p for p in ("peft_ops", "peft_bnb", "dequant_addmm")
                                                                        if p in cfg.providers])
        for r in report.memory_rows:
            if r["saved_mib"] is None:
                continue
            case = C.Case(r["op"], "forward", dropout=r["dropout"], **memory.CANONICAL)
            v = r["saved_mib"]
            report.rows.append(_row(env, case, r["provider"], "saved_bytes", "MiB", v, v, v,
                                    "memory table; " + r["note"]))

    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.lowering:
        from . import lowering
        why = lowering.available()
        if why:
            report.lowering_note = f"sm_90 lowering not run: {why}"
        else:
            say("lowering every launch for sm_90 (compile only, about two minutes on 2 cores) ...")
            report.lowering_rows = lowering.lower(lowering.record())
            lowering.write_csv(os.path.join(cfg.out_dir, "lowering.csv"), report.lowering_rows)
    report.csv_path = os.path.join(cfg.out_dir, "results.csv")

    def write():
        write_csv(report.csv_path, report.rows)
        report.summary = summarize(cfg, report)
        with open(os.path.join(cfg.out_dir, "summary.txt.partial"), "w") as f:
            f.write(report.summary + "\n")
        os.replace(os.path.join(cfg.out_dir, "summary.txt.partial"), os.path.join(cfg.out_dir, "summary.txt"))

    write()
    if cfg.model:   # after the measurements are on disk: a time limit that cuts the model loses nothing else
        run_model(cfg, report, env, say)
        write()
    say(report.summary)
    if cfg.plots:
        try:
            from . import plot
            paths = plot.plot_csv(report.csv_path, os.path.join(cfg.out_dir, "plots"))
            model_csv = os.path.join(cfg.out_dir, "model.csv")
            if cfg.model and os.path.exists(model_csv):
                paths += plot.plot_csv(model_csv, os.path.join(cfg.out_dir, "plots"))
            say(f"plots: {len(paths)} PNG files in {os.path.join(cfg.out_dir, 'plots')}")
        except ImportError as e:
            say(f"plots skipped: {e} (pip install matplotlib)")
    say(f"wrote {report.csv_path} ({len(report.rows)} rows) in {time.perf_counter() - start:.1f} s")
    return report


def run_model(cfg: Config, report: Report, env, say):
    """The static sm_90 model (`bench.model`). On a CPU: every case of the `gpu` set, predicted for
    the H200 and H100, into model.csv / model_launches.csv / model_summary.txt beside results.csv,
    its targets quoted in the summary. On a GPU: measured / predicted for each case timed here."""
    from . import lowering, model

    why = lowering.available()
    if why:
        report.model_lines = ["", f"static sm_90 model not run: {why}"]
        return
    if cfg.device.startswith("cuda"):
        say("static sm_90 model: predicting the cases timed here (the calibration) ...")
        try:
            rows, failures = model.calibrate(cfg.cases, report.rows, env["device"], env)
        except ValueError as e:   # a GPU the model has no constants for
            report.model_lines = ["", f"static sm_90 model not run: {e}"]
            return
        report.rows += rows
        ratios = sorted(float(r["p50"]) for r in rows if r["metric"] == "measured_over_predicted")
        lines = ["", f"Static model calibration ({model.LABEL} for the predictions): measured / predicted over "
                     f"{len(ratios)} case x provider pairs"
                     + (f": min {ratios[0]:.2f}, median {ratios[len(ratios) // 2]:.2f}, max {ratios[-1]:.2f}"
                        if ratios else "") + " (metric measured_over_predicted in results.csv)"]
        lines += [f"  not modelled: {label} / {p}: {why}" for label, p, why in failures]
        report.model_lines = lines
        return
    say("static sm_90 model: every gpu case on the H200 and H100 (compiles each launch once, cached) ...")
    model.run(out_dir=cfg.out_dir, say=lambda *a: None)
    with open(os.path.join(cfg.out_dir, "model_summary.txt")) as f:
        text = f.read()
    targets = text[text.index("Targets on H200"):].split("\n\n")[0] if "Targets on H200" in text else ""
    report.model_lines = ["", targets or "static sm_90 model: no targets in model_summary.txt",
                          "(all cases: model.csv, model_launches.csv, model_summary.txt)"]


def write_csv(path, rows):
    """Write the long-format CSV whole or not at all (a run cut by a time limit while rewriting it
    keeps the previous complete file)."""
    tmp = path + ".partial"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _case_label(key):
    op, mode, M, N, K, r, p = key[:7]
    label = f"{op} {mode}" + (f" M={M} N={N} K={K} r={r}" if op != "nf4_dequantize" else f" N={N} K={K}")
    return label + (f" p={float(p):g}" if float(p) else "")


SERVING_LIMITS = {"peft_ops_lora": 1.05, "peft_ops_one_adapter": 1.25}


def serving_summary(ratios):
    """The serving cases' paired ratios: QDoRA decode / prefill against the same case as LoRA
    (target <= 1.05, CPU measured here), mixed-adapter decode against one adapter for every row
    (the target, <= 1.25, is on the static sm_90 model; the CPU twins loop over the adapters) and
    against PEFT's mixed-batch loop."""
    lines = []
    for (op, mode, M, N, K, r, p, base), row in sorted(ratios.items()):
        if base not in SERVING_LIMITS and not (op.endswith("_mixed") and base == "peft_bnb"):
            continue
        q = f"{float(row['p50']):.3f} (p20 {float(row['p20']):.3f}, p80 {float(row['p80']):.3f})"
        what = f"{op} {mode} M={M} N={N} K={K} r={r}: {OURS} / {base} {q}"
        if base == "peft_ops_lora":
            what += f", target <= 1.05: {'PASS' if float(row['p50']) <= 1.05 else 'FAIL'}"
        elif base == "peft_ops_one_adapter":
            what += " (target <= 1.25 on the static sm_90 model: python -m bench.model)"
        lines.append("  " + what)
    return ["", "Serving targets (paired medians):"] + lines if lines else []


def summarize(cfg: Config, report: Report) -> str:
    rows = report.rows
    lines = []
    tm = {}
    for r in rows:
        if r["metric"] == "time":
            tm[(r["op"], r["mode"], r["M"], r["N"], r["K"], r["r"], r["dropout"], r["provider"])] = float(r["p50"])
    ratios = {(r["op"], r["mode"], r["M"], r["N"], r["K"], r["r"], r["dropout"], r["metric"][len("ratio_vs_"):]): r
              for r in rows if r["metric"].startswith("ratio_vs_")}
    cases = list(dict.fromkeys(k[:7] for k in tm))
    others = [p for p in cfg.providers if p != OURS]
    base = [p for p in cfg.providers if PROVIDERS[p].baseline]
    device = cfg.device
    if not cfg.device.startswith("cuda"):
        cpu = cpu_facts()
        device = (f"cpu: {cpu['cpu_model']}; {cpu['cpu_isa']}; CPU path base GEMMs for bf16 activations in "
                  f"{cpu['cpu_gemm']}; dropout masks and NF4 decode: {cpu['cpu_loops']}. CPU ratios depend on "
                  "the CPU: PEFT + bitsandbytes multiply in bf16, fast "
                  "only with AVX512-BF16 / AMX")
    lines.append(f"\nTime, median ms; ratio = time({OURS}) / time(baseline), lower is better "
                 f"(marked baseline: {', '.join(base) or 'none'}). Device: {device}.")
    head = f"{'case':<52} {OURS:>10}" + "".join(f" {p:>22}" for p in others)
    lines.append(head)
    for k in cases:
        label = _case_label(k)
        ours = tm.get(k + (OURS,))
        cells = [f"{label:<52} {('%.3f' % ours) if ours else '-':>10}"]
        for p in others:
            t = tm.get(k + (p,))
            rr = ratios.get(k + (p,))
            cell = "-" if t is None else f"{t:.3f}" + (f" ({float(rr['p50']):.2f}x)" if rr else "")
            cells.append(f" {cell:>22}")
        lines.append("".join(cells))

    if not cfg.device.startswith("cuda"):
        judged = [(k, float(r["p50"])) for k, r in ratios.items() if k[-1] == CPU_BASELINE]
        lines.append("")
        if not judged:
            lines.append(f"CPU target ({OURS} CPU path / {CPU_BASELINE} <= {CPU_MAX_RATIO} in every case): "
                         "NOT MEASURED in this run")
        else:
            fails = [f"{_case_label(k)} ({v:.2f}x)" for k, v in judged if v > CPU_MAX_RATIO]
            worst = max(judged, key=lambda kv: kv[1])
            lines.append(f"CPU target: {OURS} (CPU path) / {CPU_BASELINE} median paired ratio <= {CPU_MAX_RATIO} in "
                         f"every case: {len(judged) - len(fails)} of {len(judged)} PASS (worst {worst[1]:.3f}, "
                         f"{_case_label(worst[0])}): {'FAIL: ' + '; '.join(fails) if fails else 'PASS'}")

    lines += serving_summary(ratios)

    if report.memory_rows:
        text, _ = memory.format_table(report.memory_rows)
        lines += ["", text]

    lines += report.model_lines
    if report.lowering_rows:
        from . import lowering
        lines += ["", lowering.summary(report.lowering_rows) + " Table: lowering.csv."]
    elif report.lowering_note:
        lines += ["", report.lowering_note]

    if report.notes:
        lines.append("\nBackends and fallbacks (provider: note, number of cases):")
        for (p, n), c in sorted(report.notes.items()):
            lines.append(f"  {p}: {n}  [{c}]")
    if report.skipped:
        lines.append(f"\nNot measured ({len(report.skipped)} case x provider pairs):")
        reasons = {}
        for _, p, why in report.skipped:
            reasons[(p, why)] = reasons.get((p, why), 0) + 1
        for (p, why), c in sorted(reasons.items()):
            lines.append(f"  {p}: {why}  [{c}]")
    if not cfg.device.startswith("cuda"):
        lines.append("\nNeeds a GPU (not measured here): the fused Triton kernels' speed at the Llama-3-8B shapes "
                     "(M up to 16384), TFLOP/s and GB/s against the H100's limits, peak memory, and the "
                     "cuBLAS / bitsandbytes CUDA baselines. On this CPU peft_ops runs its plain-PyTorch twin "
                     "(the CPU path); run `python -m bench` on a CUDA machine for the kernel numbers.")
    return "\n".join(lines)
