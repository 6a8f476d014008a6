"""Which implementation runs the base GEMM of a fused op: one table of candidates per op, one place
that picks, one switch to pin a choice, and a count of every decision for the bench.

Candidates (`CANDIDATES`), for the forward GEMM (`forward`) and the backward dx GEMM (`dx`):

    fused           NF4 tiles decoded in registers inside one Triton GEMM (`kernels.lora`): any
                    shape, dtype and stride; the weight is read as 4-bit bytes, once per M tile.
    fused_lut       (NF4 with whole quantization blocks a row, 16-bit activations) the decode as
                    a lookup in a shared-memory code table, ~5 instructions a thread for 8 weights:
                    up to 64 rows (forward) in a swapped tensor-core GEMM (`kernels.decode`), every
                    weight element read once; above (forward) and for dx, a tile at a time inside
                    the TMA GEMM's K loop (`kernels.gemm`, no buffer), so the decode hides under
                    the tensor cores instead of costing a pass over the weight.
    dequant_gemm    the weight decoded once a call into a transient buffer of at most
                    `buffer_mib()` MiB, then a tensor-core GEMM with the epilogue fused
                    (`kernels.gemm`, TMA); 16-bit activations with 16-byte aligned rows.
    dequant_cublas  (forward) the same buffer, cuBLAS, then one epilogue pass.

How one is picked (`choose`):
  - `PEFT_OPS_STRATEGY` pins it: a name for every op, or per op ("forward=fused,dx=dequant_gemm");
    a pinned candidate a call cannot use runs `fused` instead, with one warning per reason, and
    the count says so.
  - on a CUDA device, the eligible candidates are timed at first use for each key (GPU, op, M
    rounded up to a power of two, N, K, dtype, the epilogue's flags), as `triton.autotune` does,
    and the winner kept in memory and on disk (`PEFT_OPS_STRATEGY_CACHE`, default
    ~/.cache/peft_ops/strategy.json); set `PEFT_OPS_STRATEGY_TIMING=0` to use the rule instead.
  - everywhere else (the interpreter, the bench's static model on meta tensors), and while a CUDA
    graph is being captured, by `rule`: `fused_lut` when eligible, else `dequant_gemm` from
    `RULE_MIN_M` rows when eligible, else `fused`.

Every candidate computes the same function; they differ in rounding order only, so a choice,
once made for a key, keeps results bitwise repeatable.
"""

import json
import os
import threading
import warnings
from collections import Counter

import torch

OPS = ("forward", "dx")
CANDIDATES = {"forward": ("fused", "fused_lut", "dequant_gemm", "dequant_cublas"),
              "dx": ("fused", "fused_lut", "dequant_gemm")}
# bitsandbytes' own sm_90 dispatch keeps its fused 4-bit kernel up to M = 64 and decodes once
# beyond ("dequant + F.linear is significantly faster"); the static model agrees for these
# kernels (README, "Predicted on a Hopper GPU").
RULE_MIN_M = 65

_lock = threading.Lock()
_counts = Counter()
_timed = {}
_warned = set()
_disk = None


def buffer_mib() -> int:
    """Largest transient decode buffer, MiB (`PEFT_OPS_DEQUANT_BUFFER_MIB`, default 64)."""
    value = os.environ.get("PEFT_OPS_DEQUANT_BUFFER_MIB", "64")
    try:
        mib = int(value)
    except ValueError:
        raise ValueError(f"PEFT_OPS_DEQUANT_BUFFER_MIB: expected a positive integer, got {value!r}") from None
    if mib < 1:
        raise ValueError(f"PEFT_OPS_DEQUANT_BUFFER_MIB: expected a positive integer, got {value!r}")
    return mib


def pinned(op: str):
    """The strategy `PEFT_OPS_STRATEGY` pins for `op`, or None."""
    text = os.environ.get("PEFT_OPS_STRATEGY", "").strip()
    if not text:
        return None
    names = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if sep:
            names[key.strip()] = value.strip()
        else:
            names.update({o: key.strip() for o in OPS})
    unknown = {k for k in names if k not in OPS}
    if unknown:
        raise ValueError(f"PEFT_OPS_STRATEGY: unknown op(s) {sorted(unknown)}; expected {OPS}")
    for o, name in names.items():
        if name not in CANDIDATES[o]:
            raise ValueError(f"PEFT_OPS_STRATEGY: {o} strategy must be one of {CANDIDATES[o]}, got {name!r}")
    return names.get(op)


def why_not_decode_once(op, act, weight) -> str:
    """Why the decode-once strategies cannot run this call ('' when they can). `act` is x for the
    forward, dy for dx; `weight` a dense [N, K] tensor or an NF4Weight."""
    from .kernels.gemm import tma_ready

    if act.dtype not in (torch.float16, torch.bfloat16):
        return f"{act.dtype} activations (the decode-once GEMM is 16-bit only)"
    if op == "forward" and not tma_ready(act):
        return "x rows not 16-byte aligned or not contiguous"
    if op == "dx" and (act.shape[1] * act.element_size()) % 16:
        return "out_features not a multiple of 8"
    K = weight.shape[1]
    if isinstance(weight, torch.Tensor):
        if weight.dtype != act.dtype or not tma_ready(weight):
            return "a dense weight without 16-byte aligned contiguous rows"
    elif K % weight.blocksize:
        return "NF4 rows that do not hold whole quantization blocks"
    if (K * act.element_size()) % 16:
        return "in_features not a multiple of 8"
    return ""


def rule(op, M, why_not, why_not_lut="not a candidate") -> str:
    """The fixed choice: the table-lookup decode when the call allows it; else, for training-sized
    M, decode once; else the fused kernels."""
    if not why_not_lut:
        return "fused_lut"
    if M >= RULE_MIN_M and not why_not:
        return "dequant_gemm"
    return "fused"


def _key(op, act, weight, flags):
    M, K = act.shape[0], weight.shape[1]
    bucket = 1 << max(0, (M - 1).bit_length())
    quant = "dense" if isinstance(weight, torch.Tensor) else f"nf4/{weight.blocksize}"
    device = torch.cuda.get_device_name(act.device) if act.is_cuda else act.device.type
    return "|".join(map(str, (device, op, bucket, weight.shape[0], K, act.dtype, quant,
                              ",".join(sorted(k for k, v in flags.items() if v)))))


def _disk_path():
    return os.environ.get("PEFT_OPS_STRATEGY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "peft_ops",
        "strategy.json")


def _load_disk():
    global _disk
    if _disk is None:
        try:
            with open(_disk_path()) as f:
                _disk = json.load(f)
        except (OSError, ValueError):
            _disk = {}
    return _disk


def _save_disk(key, name):
    disk = _load_disk()
    disk[key] = name
    path = _disk_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(disk, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass   # a read-only home keeps the choice for this process only


def _timing_allowed(act) -> bool:
    return (act.is_cuda and os.environ.get("PEFT_OPS_STRATEGY_TIMING", "1") != "0"
            and not torch.cuda.is_current_stream_capturing())


def _time(candidates):
    import triton.testing

    times = {name: triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")
             for name, fn in candidates.items()}
    return min(times, key=times.get)


def choose(op, act, weight, flags, candidates, why_not_lut="") -> str:
    """The strategy that runs `op` for this call; `candidates` maps each eligible-or-not name to
    a zero-argument callable running it (timed only on CUDA at a key's first use);
    `why_not_lut` says why `fused_lut` cannot take the call ('' when it can)."""
    why_not = why_not_decode_once(op, act, weight)
    eligible = [c for c in CANDIDATES[op] if c in candidates
                and not (c.startswith("dequant") and why_not) and not (c == "fused_lut" and why_not_lut)]
    name = pinned(op)
    if name is not None:
        if name not in eligible:
            reason = why_not_lut if name == "fused_lut" else why_not
            has = f"this call has {reason}" if reason else f"{name} does not take this call's operands"
            reason = f"PEFT_OPS_STRATEGY pins {op}={name}, but {has}: the fused kernels ran"
            with _lock:
                if reason not in _warned:
                    _warned.add(reason)
                    warnings.warn(reason, stacklevel=3)
            name, how = "fused", "pinned, not eligible"
        else:
            how = "pinned"
    elif len(eligible) == 1:
        name, how = eligible[0], "only eligible"
    elif _timing_allowed(act):
        key = _key(op, act, weight, flags)
        name = _timed.get(key) or _load_disk().get(key)
        if name not in eligible:
            name = _time({c: candidates[c] for c in eligible})
            _save_disk(key, name)
        _timed[key] = name
        how = "timed"
    else:
        lut = "" if "fused_lut" in eligible else (why_not_lut or "not a candidate for this op")
        name, how = rule(op, act.shape[0], why_not, lut), "rule"
    with _lock:
        _counts[(op, name, how)] += 1
    return name


def counts() -> Counter:
    """(op, strategy, how it was chosen) -> number of calls, since the process started."""
    with _lock:
        return Counter(_counts)


def describe(before: Counter, after: Counter) -> str:
    """The decisions between two `counts()` snapshots, as 'forward=dequant_gemm (rule), dx=...'."""
    diff = after - before
    parts = sorted({f"{op}={name} ({how})" for (op, name, how) in diff})
    return ", ".join(parts)
