"""Saved-for-backward bytes (SPEC §7), runnable on its own: ``python -m bench.memory``.

Definition: the distinct storages autograd keeps for backward during one training forward of a
layer, excluding the layer's parameters and buffers and the frozen (packed NF4) weight with its
quantization state. Measured with `torch.autograd.graph.saved_tensors_hooks`: every tensor
autograd packs is recorded, deduplicated by its untyped storage's data_ptr, and its storage's
full size counted (a saved view keeps its whole storage alive). Tensors stashed as attributes on
an autograd ctx bypass the hooks; SPEC §7 requires `ctx.save_for_backward`, and a layer that
stashes tensors would be under-counted here.

Canonical config: M=512, K=N=1024, r=16, bf16 activations, NF4 base (blocksize 64, double
quantization), fp32 adapters, dropout 0 and 0.05, LoRA and DoRA; peft_ops vs PEFT + bitsandbytes.
"""

import argparse
import sys

import torch

from .cases import Case
from .providers import PROVIDERS, Inputs, Unsupported, make_layer

MIB = 2**20
CANONICAL = dict(M=512, N=1024, K=1024, r=16)
# target ratio peft_ops / peft_bnb of saved bytes, per (op, dropout)
TARGETS = {("qlora", 0.0): 0.55, ("qlora", 0.05): 0.30, ("qdora", 0.0): 0.25, ("qdora", 0.05): 0.15}


def storage_ptrs(objs, depth=4):
    """data_ptrs of every tensor storage reachable from `objs`: tensors, modules (parameters and
    buffers), containers and plain objects' attributes (an NF4 weight, a bitsandbytes QuantState)."""
    ptrs, seen = set(), set()

    def visit(o, d):
        if id(o) in seen or d < 0:
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            ptrs.add(o.untyped_storage().data_ptr())
            for v in getattr(o, "__dict__", {}).values():  # Params4bit.quant_state
                visit(v, d - 1)
        elif isinstance(o, torch.nn.Module):
            for t in list(o.parameters()) + list(o.buffers()):
                visit(t, d - 1)
        elif isinstance(o, dict):
            for v in o.values():
                visit(v, d - 1)
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v, d - 1)
        elif hasattr(o, "__dict__") and not isinstance(o, type) and not callable(o):
            for v in vars(o).values():
                visit(v, d - 1)

    for o in objs:
        visit(o, depth)
    return ptrs


def saved_bytes(forward, x, exclude=()):
    """Bytes of the distinct storages autograd saves during `forward(x)`, minus `exclude`'s."""
    skip = storage_ptrs(exclude)
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward(x)
    del y
    return sum(saved.values())


def layer_saved_bytes(layer, inputs):
    return saved_bytes(layer.forward, inputs.x, exclude=list(layer.params) + list(layer.frozen))


def memory_table(device="cpu", providers=("peft_ops", "peft_bnb"), dtype=torch.bfloat16):
    """Rows: dict(op, dropout, provider, saved_mib, note) for the canonical config; errors and
    unsupported combinations come back as rows with saved_mib None and the reason in note."""
    rows = []
    for op in ("qlora", "qdora"):
        for p in (0.0, 0.05):
            case = Case(op, "forward", dropout=p, dtype=dtype, **CANONICAL)
            try:
                inputs = Inputs.make(case, device)
            except Exception as e:  # the NF4 container may be missing in a partial checkout
                rows += [dict(op=op, dropout=p, provider=n, saved_mib=None, note=f"inputs: {e!r}")
                         for n in providers]
                continue
            for name in providers:
                missing = PROVIDERS[name].missing()
                if missing:
                    rows.append(dict(op=op, dropout=p, provider=name, saved_mib=None,
                                     note=f"{missing} not installed"))
                    continue
                try:
                    layer = make_layer(name, case, inputs)
                    mib = layer_saved_bytes(layer, inputs) / MIB
                    rows.append(dict(op=op, dropout=p, provider=name, saved_mib=mib, note=layer.note))
                except Unsupported as e:
                    rows.append(dict(op=op, dropout=p, provider=name, saved_mib=None, note=f"unsupported: {e}"))
                except Exception as e:
                    rows.append(dict(op=op, dropout=p, provider=name, saved_mib=None, note=f"error: {e!r}"))
    return rows


def format_table(rows, ours="peft_ops", base="peft_bnb"):
    """Printed table with the SPEC targets and PASS / FAIL per row; returns (text, all_passed)."""
    by = {(r["op"], r["dropout"], r["provider"]): r for r in rows}
    x_mib = CANONICAL["M"] * CANONICAL["K"] * 2 / MIB
    lines = [f"Saved-for-backward memory, M={CANONICAL['M']} K=N={CANONICAL['K']} r={CANONICAL['r']}, "
             f"bf16 activations (x itself is {x_mib:.2f} MiB), NF4 base, fp32 adapters",
             f"{'layer':<6} {'dropout':>7} {ours + ' MiB':>13} {base + ' MiB':>13} {'ratio':>7} {'target':>7}  result"]
    ok_all = True
    for (op, p), target in TARGETS.items():
        a, b = by.get((op, p, ours)), by.get((op, p, base))
        a_mib = a and a["saved_mib"]
        b_mib = b and b["saved_mib"]
        name = {"qlora": "LoRA", "qdora": "DoRA"}[op]
        if a_mib is None or b_mib is None:
            why = "; ".join(r["note"] for r in (a, b) if r and r["saved_mib"] is None)
            lines.append(f"{name:<6} {p:>7.2f} {_f(a_mib):>13} {_f(b_mib):>13} {'-':>7} {target:>6.2f}x  NOT MEASURED ({why})")
            ok_all = False
            continue
        ratio = a_mib / b_mib
        ok = ratio <= target
        ok_all &= ok
        lines.append(f"{name:<6} {p:>7.2f} {a_mib:>13.2f} {b_mib:>13.2f} {ratio:>6.2f}x {target:>6.2f}x  "
                     f"{'PASS' if ok else 'FAIL'}")
    return "\n".join(lines), ok_all


def _f(v):
    return "-" if v is None else f"{v:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    rows = memory_table(args.device, providers=("peft_ops", "peft_bnb", "dequant_addmm"))
    text, ok = format_table(rows)
    print(text)
    for r in rows:
        if r["provider"] == "dequant_addmm" and r["saved_mib"] is not None:
            print(f"  (dequant_addmm, {r['op']} dropout {r['dropout']}: {r['saved_mib']:.2f} MiB)")
    notes = {(r["provider"], r["note"]) for r in rows if r["note"]}
    for prov, note in sorted(notes):
        print(f"  note {prov}: {note}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
