"""python -m bench [--quick] [--out DIR] [--ops ...] [--shapes ...] — see bench/README.md."""

import argparse
import os
import sys

import torch

from . import cases as C
from .providers import PROVIDERS
from .suite import Config, default_out_dir, run_suite


def build_config(argv=None) -> Config:
    ap = argparse.ArgumentParser(prog="python -m bench", description="peft_ops benchmark suite")
    ap.add_argument("--quick", action="store_true", help="small suite (CPU: < 45 s on 2 cores)")
    ap.add_argument("--out", help="output folder (default bench/out/<device-tag>-<date-time>/, git-ignored; "
                                  "results to commit go under bench/results/)")
    ap.add_argument("--ops", nargs="+", default=list(C.OPS), choices=C.OPS)
    ap.add_argument("--modes", nargs="+", default=list(C.MODES), choices=C.MODES)
    ap.add_argument("--shapes", nargs="+", metavar="SET|M=..,N=..,K=..,r=..",
                    help=f"named shape sets {C.SHAPE_SETS} and/or explicit shapes "
                         "(default: gpu or cpu, the -quick variant with --quick)")
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget-s", type=float, help="stop starting new cases after this many seconds "
                    "(default: 540 for the full GPU suite, none otherwise)")
    ap.add_argument("--rounds", type=int, help="CPU: timed rounds per case (default 15, quick 7)")
    ap.add_argument("--no-memory", action="store_true", help="skip the saved-for-backward memory table")
    ap.add_argument("--no-lowering", action="store_true",
                    help="CPU: skip lowering every launch for sm_90 (on by default without --quick)")
    ap.add_argument("--no-model", action="store_true",
                    help="skip the static sm_90 model (CPU full suite: every gpu case predicted; GPU: measured / "
                         "predicted for each timed case)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    a = ap.parse_args(argv)

    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if a.shapes is None:
        a.shapes = [("gpu" if cuda else "cpu") + ("-quick" if a.quick else "")]
    named = [s for s in a.shapes if "=" not in s]
    explicit = [C.parse_shape(s) for s in a.shapes if "=" in s]
    cases = []
    try:
        for name in named:
            cases += C.shape_set(name, a.ops, a.modes)
    except ValueError as e:
        ap.error(str(e))
    cases += C.explicit_cases(explicit, a.ops, a.modes)
    cases = list(dict.fromkeys(cases))
    budget = a.budget_s if a.budget_s is not None else (540.0 if cuda and "gpu" in named else float("inf"))
    cfg = Config(device=a.device, cases=cases, providers=a.providers,
                 out_dir=a.out or default_out_dir(a.device), budget_s=budget,
                 cpu_rounds=a.rounds or (7 if a.quick else 15), cpu_warmup=0 if a.quick else 2,
                 cpu_case_budget_s=2.5 if a.quick else 15.0,
                 gpu_warmup_ms=10 if a.quick else 25, gpu_rep_ms=40 if a.quick else 60,
                 memory_table=not a.no_memory, plots=not a.no_plots,
                 lowering=not (cuda or a.quick or a.no_lowering),
                 model=not (a.no_model or (a.quick and not cuda)))
    cfg.list_only = a.list
    return cfg


def main(argv=None):
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("python -m bench: TRITON_INTERPRET=1 is set; interpreter timings mean nothing, "
              "the interpreter is for tests only. Unset it and run again.", file=sys.stderr)
        return 2
    cfg = build_config(argv)
    if cfg.list_only:
        for c in cfg.cases:
            print(c.label())
        print(f"{len(cfg.cases)} cases x {len(cfg.providers)} providers")
        return 0
    run_suite(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
