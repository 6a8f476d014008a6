"""PNG plots made from a results CSV alone: ``python -m bench.plot RESULTS.csv [--out DIR]``.

- ``time_<op>_<mode>.png``: median time per shape and provider (bars, log scale) with p20-p80
  whiskers;
- ``ratio_<op>_<mode>.png``: time(peft_ops) / time(provider) per shape (1.0 = parity);
- ``saved_bytes.png``: the saved-for-backward memory table (canonical config);
- from the static model's ``model.csv`` (metric ``predicted_time``), per GPU:
  ``predicted_<gpu>_<op>_<mode>.png`` and ``ratio_<gpu>_<op>_<mode>.png`` at r = 16 without
  dropout (one bar group a shape), every title saying the figures are predictions.
"""

import argparse
import os
import sys
from collections import defaultdict

from .suite import read_csv


def _shape(r):
    if r["op"] == "nf4_dequantize":
        return f"N{r['N']} K{r['K']}"
    label = f"M{r['M']} N{r['N']}\nK{r['K']} r{r['r']}"
    # Cases that differ only in dropout are different bars, not one bar drawn twice.
    return label + (f" p={r['dropout']}" if float(r.get("dropout") or 0) else "")


def _save(fig, out_dir, name):
    """Write `fig` as out_dir/name and close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grouped_bars(ax, groups, series, values, errs=None, log=False):
    import numpy as np
    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    for i, s in enumerate(series):
        v = [values.get((g, s), float("nan")) for g in groups]
        yerr = None
        if errs is not None:
            lo = [max(v[j] - errs.get((g, s), (v[j], v[j]))[0], 0) for j, g in enumerate(groups)]
            hi = [max(errs.get((g, s), (v[j], v[j]))[1] - v[j], 0) for j, g in enumerate(groups)]
            yerr = [lo, hi]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, v, width, label=s, yerr=yerr, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def plot_csv(csv_path, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(csv_path)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    by_op_mode = defaultdict(list)
    predicted = any(r["metric"] == "predicted_time" for r in rows)
    for r in rows:
        if "memory table" in r["note"]:
            continue
        if predicted and (r["r"] != "16" or float(r["dropout"] or 0)) and r["op"] != "nf4_dequantize":
            continue   # one bar group a shape: the model's r = 64 and dropout cases stay in the CSV
        by_op_mode[(r["device"], r["op"], r["mode"])].append(r)

    for (device, op, mode), rs in by_op_mode.items():
        stem = f"{op}_{mode.replace('+', '_')}"
        if predicted:
            gpu = device.split(" (")[0].lower().replace(" ", "")
            time_name, ratio_name, unit = f"predicted_{gpu}_{stem}.png", f"ratio_{gpu}_{stem}.png", "us"
            what = "predicted time, us (static model: a lower bound, not a measurement)"
        else:
            time_name, ratio_name, unit = f"time_{stem}.png", f"ratio_{stem}.png", "ms"
            what = "time, ms (median, p20-p80)"
        times = [r for r in rs if r["metric"] in ("time", "predicted_time")]
        if times:
            groups = list(dict.fromkeys(_shape(r) for r in times))
            series = list(dict.fromkeys(r["provider"] for r in times))
            vals = {(_shape(r), r["provider"]): float(r["p50"]) for r in times}
            errs = None if predicted else {(_shape(r), r["provider"]): (float(r["p20"]), float(r["p80"]))
                                           for r in times}
            fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups) + 2), 4))
            _grouped_bars(ax, groups, series, vals, errs, log=True)
            ax.set_ylabel(what if unit == "ms" else "predicted time, us")
            ax.set_title(f"{op} {mode} ({device})" + ("\nstatic model: a lower bound, not a measurement"
                                                       if predicted else ""), fontsize=9)
            paths.append(_save(fig, out_dir, time_name))
        ratios = [r for r in rs if r["metric"].startswith("ratio_vs_")]
        if ratios:
            groups = list(dict.fromkeys(_shape(r) for r in ratios))
            series = list(dict.fromkeys(r["metric"][len("ratio_vs_"):] for r in ratios))
            vals = {(_shape(r), r["metric"][len("ratio_vs_"):]): float(r["p50"]) for r in ratios}
            fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups) + 2), 4))
            _grouped_bars(ax, groups, series, vals, log=True)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_ylabel("time(peft_ops) / time(provider)\n< 1: peft_ops faster")
            ax.set_title(f"{op} {mode}: peft_ops vs each baseline ({device})"
                         + ("\nstatic model: a lower bound, not a measurement" if predicted else ""), fontsize=9)
            paths.append(_save(fig, out_dir, ratio_name))

    mem = [r for r in rows if r["metric"] == "saved_bytes" and "memory table" in r["note"]]
    if mem:
        name = {"qlora": "QLoRA", "qdora": "QDoRA"}
        groups = list(dict.fromkeys(f"{name.get(r['op'], r['op'])} p={r['dropout']}" for r in mem))
        series = list(dict.fromkeys(r["provider"] for r in mem))
        vals = {(f"{name.get(r['op'], r['op'])} p={r['dropout']}", r["provider"]): float(r["p50"]) for r in mem}
        fig, ax = plt.subplots(figsize=(7, 4))
        _grouped_bars(ax, groups, series, vals)
        ax.set_ylabel("saved for backward, MiB")
        ax.set_title("saved-for-backward memory, M=512 K=N=1024 r=16, bf16, NF4, fp32 adapters", fontsize=9)
        paths.append(_save(fig, out_dir, "saved_bytes.png"))
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.plot", description="plots from a bench results CSV")
    ap.add_argument("csv")
    ap.add_argument("--out", help="folder for the PNGs (default: plots/ beside the CSV)")
    a = ap.parse_args(argv)
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.csv)), "plots")
    for p in plot_csv(a.csv, out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
