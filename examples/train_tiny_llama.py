"""QLoRA and QDoRA on a tiny Llama: peft_ops.add_lora(..., quantize="nf4") beside PEFT + bitsandbytes.

A Llama is built from a config (no downloads), its seven projection types per layer are quantized
to NF4 and given LoRA / DoRA adapters, and each variant trains for the same steps on the same
synthetic token stream from the same base weights:

    python examples/train_tiny_llama.py                 # 300 steps (a GPU run)
    python examples/train_tiny_llama.py --steps 20      # a few minutes on a CPU

Progress (step, loss, that step's tokens/s) is printed every step, or about 25 times a variant
on longer runs (--log-every). Writes, under --out (default
examples/out/<device-tag>-<date-time>/, git-ignored): `loss.csv` (variant, step, loss),
`summary.csv` (variant, final loss, tokens/s, peak memory, the hardware (on a CPU: its model,
bf16 units and peft_ops' GEMM dtype), the LoRA layer class), `loss.png`
(QLoRA and QDoRA panels, peft_ops beside PEFT + bitsandbytes). The summary's tokens/s counts the
steps after the first --warmup (5; compilation and autotuning happen there); peak memory is
CUDA's max allocated and is only reported on a GPU. The PEFT variant is what a 4-bit transformers
model gets (PEFT's bitsandbytes `lora.Linear4bit` layer). The adapters' random initialisation
comes from each library, so the curves are close, not identical.
"""

import argparse
import copy
import csv
import datetime as dt
import os
import platform
import re
import sys
import time

# With the repository root on sys.path (PYTHONPATH=., python -m examples...), its `kernels/` folder
# would shadow Hugging Face's `kernels`, which bitsandbytes and transformers import: the baseline
# must import what it imports anywhere else. peft_ops comes from its installation.
_ROOT = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _ROOT]

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(vocab, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device, torch.bfloat16)


def synthetic_batches(vocab, batch, seq, steps, seed=1):
    """Sequences from a fixed random first-order Markov chain with a few likely successors per
    token: learnable (the loss falls well below log(vocab)) yet not trivial."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)
    for _ in range(steps):
        toks = torch.empty(batch, seq, dtype=torch.long)
        toks[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, seq):
            pick = torch.randint(0, 4, (batch,), generator=g)
            toks[:, t] = succ[toks[:, t - 1], pick]
        yield toks


def with_peft_ops(base, use_dora, r, alpha, dropout):
    import peft_ops

    model = copy.deepcopy(base)
    return peft_ops.add_lora(model, TARGETS, r=r, lora_alpha=alpha, lora_dropout=dropout,
                             use_dora=use_dora, quantize="nf4")


def with_peft_bnb(base, use_dora, r, alpha, dropout):
    """Every target nn.Linear replaced by a bitsandbytes Linear4bit holding the same weight (NF4,
    blocksize 64, double quantization), then PEFT's LoRA / DoRA on top."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    device = next(model.parameters()).device
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in TARGETS:
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(mod.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
            q = q.to(device)
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], q)
    # What transformers sets on a model loaded in 4 bit: PEFT then wraps each Linear4bit in its
    # bitsandbytes layer (peft.tuners.lora.bnb.Linear4bit), the class QLoRA users train.
    model.is_loaded_in_4bit = True
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS, use_dora=use_dora)
    return get_peft_model(model, cfg)


def lora_layer_class(model):
    """Module path and name of the class of the first LoRA layer (what the variant benchmarks)."""
    import peft_ops

    kinds = (peft_ops.LoraLinear,)
    try:
        from peft.tuners.lora import LoraLayer

        kinds += (LoraLayer,)
    except ImportError:   # the peft_ops variants run without PEFT
        pass
    for m in model.modules():
        if isinstance(m, kinds):
            return f"{type(m).__module__}.{type(m).__name__}"
    return "none"


def train(model, batches, lr, device, steps, warmup, label, log_every):
    """Train for `steps` batches, printing step, loss and that step's tokens/s every `log_every`
    steps; returns (losses, tokens/s over the steps after `warmup`, peak MiB, trainable count)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses, tokens, t_start = [], 0, None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step, toks in enumerate(batches):
        if step == warmup:  # the first steps compile / autotune kernels
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_start, tokens = time.perf_counter(), 0
        t0 = time.perf_counter()
        toks = toks.to(device)
        loss = model(input_ids=toks, labels=toks).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())   # waits for the step, so the step time below is the GPU's too
        tokens += toks.numel()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"  {label:<16} step {step + 1:>4}/{steps}  loss {losses[-1]:.4f}  "
                  f"{toks.numel() / (time.perf_counter() - t0):,.0f} tokens/s", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t_start if t_start else float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return losses, tokens / elapsed, peak, sum(p.numel() for p in params)


def plot(loss_rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kind in zip(axes, ("qlora", "qdora")):
        for variant in sorted({r[0] for r in loss_rows if r[0].endswith(kind)}):
            pts = [(s, l) for v, s, l in loss_rows if v == variant]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=variant, lw=1)
        ax.set_title({"qlora": "QLoRA", "qdora": "QDoRA"}[kind])
        ax.set_xlabel("step")
        ax.legend()
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_description():
    """The CPU model, its bf16 matrix units (AVX512-BF16, AMX), the dtype of peft_ops' CPU-path
    base GEMMs and what its dropout masks and NF4 decode run as: CPU tokens/s depend on all of
    them (bitsandbytes multiplies in bf16, fast only with those units)."""
    from peft_ops import _cpu_loops, ops

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    units = ops.cpu_bf16_units()
    gemm = {torch.bfloat16: "bf16", torch.float32: "fp32"}[ops.cpu_gemm_dtype(torch.bfloat16)]
    return (f"{model} x{os.cpu_count()}; {torch.backends.cpu.get_cpu_capability()}; "
            f"bf16 units: {', '.join(units) or 'none'}; peft_ops CPU GEMMs: {gemm}; "
            f"peft_ops CPU loops: {_cpu_loops.describe()}")


def default_out_dir(tag):
    """examples/out/<device-tag>-<date-time>/: git-ignored, so a run leaves nothing untracked."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", f"{tag}-{dt.datetime.now():%Y%m%d-%H%M%S}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=5,
                    help="steps left out of the summary's tokens/s (at most steps - 1)")
    ap.add_argument("--log-every", type=int,
                    help="print progress every this many steps (default: every step up to 25 steps, "
                         "else about 25 lines a variant)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", nargs="+", default=["peft_ops-qlora", "peft_bnb-qlora", "peft_ops-qdora", "peft_bnb-qdora"])
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.steps < 1 or (a.log_every is not None and a.log_every < 1) or a.warmup < 0:
        ap.error("--steps and --log-every must be at least 1, --warmup at least 0")
    warmup = min(a.warmup, a.steps - 1)   # at least one timed step
    log_every = a.log_every or max(1, a.steps // 25)

    device = torch.device(a.device)
    tag = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{os.cpu_count()}c"
    tag = re.sub(r"[^a-z0-9]+", "-", tag.lower()).strip("-")
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    print(f"device: {hardware}", flush=True)
    out = a.out or default_out_dir(tag)
    os.makedirs(out, exist_ok=True)
    base = tiny_llama(a.vocab, device)
    for p in base.parameters():
        p.requires_grad_(False)

    loss_rows, summary, lines = [], [], []
    for variant in a.variants:
        lib, kind = variant.split("-")
        build = {"peft_ops": with_peft_ops, "peft_bnb": with_peft_bnb}[lib]
        model = build(base, kind == "qdora", a.r, a.alpha, a.dropout)
        layer_class = lora_layer_class(model)
        print(f"{variant}: {a.steps} steps, LoRA layers {layer_class}", flush=True)
        torch.manual_seed(2)  # same dropout stream for the libraries that draw from torch's RNG
        losses, tok_s, peak, n_train = train(model, synthetic_batches(a.vocab, a.batch, a.seq, a.steps),
                                             a.lr, device, a.steps, warmup, variant, log_every)
        loss_rows += [(variant, i, l) for i, l in enumerate(losses)]
        summary.append(dict(variant=variant, steps=a.steps, first_loss=f"{losses[0]:.4f}",
                            final_loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}",
                            tokens_per_s=f"{tok_s:.0f}", peak_mem_mib=f"{peak:.1f}",
                            trainable_params=n_train, device=tag, hardware=hardware, lora_layer=layer_class))
        lines.append(f"{variant:<16} loss {losses[0]:.3f} -> {summary[-1]['final_loss']} (mean of last 10)  "
                     f"{tok_s:,.0f} tokens/s after {warmup} warm-up steps  "
                     f"peak {'%.0f MiB' % peak if device.type == 'cuda' else 'n/a (CPU)'}  "
                     f"trainable {n_train:,}")
        print(lines[-1], flush=True)
        del model

    with open(os.path.join(out, "loss.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "step", "loss"])
        w.writerows((v, s, f"{l:.5f}") for v, s, l in loss_rows)
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    try:
        plot(loss_rows, os.path.join(out, "loss.png"))
    except ImportError:
        print("matplotlib not installed: loss.png skipped")
    # Once more, together: the per-step lines have pushed them apart (and out of a log's tail).
    print("\n".join(["", f"device: {hardware}", *lines, f"wrote {out}"]))


if __name__ == "__main__":
    main()
