"""What the bench measures: ops, modes, shape sets, and the nominal work of each case.

FLOP and byte counts are *nominal*: the work of the adapted layer itself (what a perfect fused
kernel must do and move), the same number for every provider of a case. TFLOP/s and GB/s are
therefore effective rates (nominal work / measured time), comparable across providers; for the
`torch` provider (a dense F.linear with no adapter) they overstate what it actually computes.
"""

from dataclasses import dataclass, replace

import torch

OPS = ("nf4_dequantize", "lora", "qlora", "dora", "qdora", "qlora_mixed", "qdora_mixed")
# "prefill": a forward without grad at any M (serving a prompt); "decode": the same at M <= 16
MODES = ("forward", "forward+backward", "decode", "prefill")
DECODE_MAX_M = 16
# Mixed-adapter batches (the `*_mixed` ops): rows take the case's `adapters` adapters in turn
# (row m uses adapter m mod E), each of rank r, scaling 2, DoRA magnitudes for qdora_mixed.
MIXED_OPS = ("qlora_mixed", "qdora_mixed")
SERVING_ADAPTERS = 8

# Llama-3-8B projections as (K, N) = (in_features, out_features): q/o, k/v, gate/up, down.
LLAMA3_8B = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
# SPEC §7 canonical config for the memory table and the CPU target (with M = 256 there).
CANONICAL = dict(K=1024, N=1024, r=16)


@dataclass(frozen=True)
class Case:
    op: str
    mode: str
    M: int
    N: int
    K: int
    r: int
    dtype: torch.dtype = torch.bfloat16          # activations (and the dense base weight)
    adapter_dtype: torch.dtype = torch.float32   # PEFT keeps adapters in fp32 by default
    dropout: float = 0.0
    adapters: int = 1                            # distinct adapters in the batch (the *_mixed ops)

    @property
    def quantized(self) -> bool:
        return self.op in ("qlora", "qdora", "nf4_dequantize", "qlora_mixed", "qdora_mixed")

    @property
    def dora(self) -> bool:
        return self.op in ("dora", "qdora", "qdora_mixed")

    @property
    def mixed(self) -> bool:
        return self.op in MIXED_OPS

    @property
    def trains(self) -> bool:
        return self.mode in ("forward", "forward+backward")

    def key(self):
        return (self.op, self.mode, self.M, self.N, self.K, self.r, self.dropout)

    def label(self) -> str:
        if self.op == "nf4_dequantize":
            return f"{self.op} N={self.N} K={self.K}"
        p = f" p={self.dropout:g}" if self.dropout else ""
        e = f" adapters={self.adapters}" if self.mixed else ""
        return f"{self.op} {self.mode} M={self.M} N={self.N} K={self.K} r={self.r}{p}{e}"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def weight_bytes(case: Case) -> float:
    """Bytes of the frozen base weight as stored: NF4 is 4 bits per element plus one double-quantized
    absmax byte per 64-element block (plus negligible nested statistics); dense is the activation dtype."""
    n = case.N * case.K
    if case.quantized:
        return n / 2 + n / 64
    return n * case.dtype.itemsize


def flops(case: Case) -> float:
    M, N, K, r = case.M, case.N, case.K, case.r
    if case.op == "nf4_dequantize":
        return 2.0 * N * K  # one table lookup and one multiply per element
    fwd = 2.0 * M * N * K + 2.0 * M * r * (K + N)
    if case.dora and case.trains:
        fwd += 2.0 * N * K * r + 3.0 * N * K  # row norm of W + s·B A (kept between no-grad calls)
    if case.mode != "forward+backward":
        return fwd
    # dx = g W + s (g B) A;  dA = s (g B)ᵀ x;  dB = s gᵀ (x Aᵀ)  (+ dm = Σ dy ⊙ z / n for DoRA)
    bwd = 2.0 * M * N * K + 2.0 * M * r * (N + K) + 2.0 * M * r * K + 2.0 * M * N * r
    if case.dora:
        bwd += 2.0 * M * N
    return fwd + bwd


def nbytes(case: Case) -> float:
    """Minimum bytes moved: read the inputs and weights once, write the outputs once per pass."""
    M, N, K, r = case.M, case.N, case.K, case.r
    act, ad = case.dtype.itemsize, case.adapter_dtype.itemsize
    if case.op == "nf4_dequantize":
        return weight_bytes(case) + N * K * act
    adapters = (r * (K + N) * ad + (N * ad if case.dora else 0)) * max(1, min(case.adapters, M))
    fwd = M * K * act + weight_bytes(case) + adapters + M * N * act
    if case.mode != "forward+backward":
        return fwd
    # read dy, x, W, adapters; write dx and the adapter grads
    bwd = M * N * act + M * K * act + weight_bytes(case) + adapters + M * K * act + adapters
    return fwd + bwd


# -- shape sets -------------------------------------------------------------------------------

def _training_and_decode(op, K, N, Ms, r, decode_Ms, modes):
    out = []
    if "decode" in modes:
        out += [Case(op, "decode", M, N, K, r) for M in decode_Ms]
    for mode in ("forward+backward", "forward"):
        if mode in modes:
            out += [Case(op, mode, M, N, K, r) for M in Ms]
    return out


def _with_dropout(op, K, N, M, r, modes, p=0.05):
    """QLoRA forward+backward with dropout: generating the mask is part of the real cost."""
    return [Case(op, "forward+backward", M, N, K, r, dropout=p)] if "forward+backward" in modes else []


def serving_cases(op, shapes, decode_Ms, prefill_Ms, modes):
    """Serving without grad: QLoRA / QDoRA decode and prefill (QDoRA's target: within 1.05x of
    QLoRA), and mixed-adapter decode batches over `SERVING_ADAPTERS` adapters (target: within
    1.25x of a single-adapter batch of the same size; baseline PEFT's `adapter_names` loop)."""
    out = []
    for K, N in shapes:
        if op in MIXED_OPS:
            if "decode" in modes:
                out += [Case(op, "decode", M, N, K, 16, adapters=SERVING_ADAPTERS) for M in decode_Ms]
        elif "prefill" in modes:
            out += [Case(op, "prefill", M, N, K, 16) for M in prefill_Ms]
    return out


def shape_set(name: str, ops, modes):
    """Cases for a named shape set, most important first (QLoRA training before the rest), so a run
    cut short by its time budget still has the headline numbers."""
    ops = [o for o in ("qlora", "qdora", "lora", "dora", "nf4_dequantize", "qlora_mixed", "qdora_mixed") if o in ops]
    cases = []
    for op in ops:
        if op in MIXED_OPS or "prefill" in modes:
            serving = {"gpu": (LLAMA3_8B, (16,), (512,)), "gpu-quick": (LLAMA3_8B[:1], (16,), (512,)),
                       "cpu": (((1024, 1024), (4096, 1024)), (16,), (512,)),
                       "cpu-quick": (((1024, 1024),), (16,), (512,)), "tiny": (((128, 64),), (8,), (16,))}.get(name)
            if serving is not None and (op in MIXED_OPS or op in ("qlora", "qdora")):
                cases += serving_cases(op, *serving, modes)
            if op in MIXED_OPS:
                continue
        if op == "nf4_dequantize":
            kn = {"gpu": LLAMA3_8B, "gpu-quick": LLAMA3_8B[:1], "cpu": ((1024, 1024), (4096, 1024)),
                  "cpu-quick": ((1024, 1024),), "tiny": ((128, 64),)}[name]
            if "forward" in modes:
                cases += [Case(op, "forward", 0, N, K, 0) for K, N in kn]
            continue
        quant = op in ("qlora", "qdora")
        if name == "gpu":
            shapes = LLAMA3_8B if quant else LLAMA3_8B[:1]
            Ms = (512, 4096, 16384) if quant else (4096,)
            for K, N in shapes:
                cases += _training_and_decode(op, K, N, Ms, 16, (1, 16), modes)
                # rank 64 at one training size: the LoRA path is a small share of the work
                cases += _training_and_decode(op, K, N, (4096,), 64, (), modes)
                cases += _with_dropout(op, K, N, 4096, 16, modes)
        elif name == "gpu-quick":
            for K, N in ((4096, 4096),) if quant else ():
                cases += _training_and_decode(op, K, N, (4096,), 16, (16,), modes)
        elif name == "cpu":
            shapes = ((1024, 1024), (1024, 4096), (4096, 1024)) if quant else ((1024, 1024),)
            for K, N in shapes:
                cases += _training_and_decode(op, K, N, (256,), 16, (1, 16), modes)
            if quant:
                cases += _training_and_decode(op, 1024, 1024, (256,), 64, (), modes)
                cases += _with_dropout(op, 1024, 1024, 256, 16, modes)
        elif name == "cpu-quick":
            # the canonical config at M = 256 (the CPU target) and one decode size
            if op == "qlora":
                cases += _training_and_decode(op, 1024, 1024, (256,), 16, (16,),
                                              [m for m in modes if m != "forward"])
            elif op == "qdora":
                cases += _training_and_decode(op, 1024, 1024, (256,), 16, (),
                                              [m for m in modes if m == "forward+backward"])
        elif name == "tiny":
            cases += _training_and_decode(op, 128, 64, (16,), 8, (4,), modes)
        else:
            raise ValueError(f"--shapes: unknown shape set {name!r}; expected one of {SHAPE_SETS} "
                             "or explicit M=..,N=..,K=..,r=.. entries")
    return cases


SHAPE_SETS = ("gpu", "gpu-quick", "cpu", "cpu-quick", "tiny")


def parse_shape(text: str):
    """'M=256,N=1024,K=1024,r=16' -> dict; every key is required."""
    try:
        d = {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(","))}
    except ValueError:
        raise ValueError(f"--shapes: cannot parse {text!r}; expected M=..,N=..,K=..,r=..") from None
    if set(d) != {"M", "N", "K", "r"}:
        raise ValueError(f"--shapes: {text!r} must give exactly M, N, K and r")
    return d


def explicit_cases(shapes, ops, modes):
    cases = []
    for s in shapes:
        for op in ops:
            if op == "nf4_dequantize":
                if "forward" in modes:
                    cases.append(Case(op, "forward", 0, s["N"], s["K"], 0))
                continue
            for mode in modes:
                if mode == "decode" and s["M"] > DECODE_MAX_M:
                    continue
                cases.append(Case(op, mode, s["M"], s["N"], s["K"], s["r"],
                                  adapters=SERVING_ADAPTERS if op in MIXED_OPS else 1))
    return list(dict.fromkeys(cases))


def with_dtype(cases, dtype):
    return [replace(c, dtype=dtype) for c in cases]
