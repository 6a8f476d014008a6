"""The static sm_90 cost model: what every bench case would take on an H100 SXM and an H200,
read off the code without a GPU.

    python -m bench.model [--quick] [--out DIR] [--gpus H200 H100] [--workers N]

Every figure it prints or writes is a prediction: "static model: a lower bound, not a
measurement". How it is made:

1. Each provider's forward (and backward) of a case runs on meta tensors (shapes only, no data,
   any size at no cost). Triton launches are recorded instead of run (`bench.lowering`), with
   their grid and arguments; every other device op (torch's, cuBLAS's, bitsandbytes') is seen by a
   dispatch mode with the sizes of what it reads and writes.
2. Each distinct Triton launch is compiled for sm_90 and its SASS read (`bench.sass`): the loop
   forest, and per loop the instructions a warp issues a trip, by execution class. How often each
   loop runs comes from the launch's arguments (`LOOPS` below, one entry a kernel, matched to the
   SASS loops by nesting and order); code outside loops runs once a program.
3. A launch's time is the largest of: issue time (warp-instructions of the busiest SM over its 4
   schedulers, and no warp issuing faster than one a clock), the time of each limited execution
   class (`bench.sass.LANES`), tensor-core time (the FLOPs of its MMA instructions at the rate the
   GPU's own cuBLAS reaches), and HBM time (the bytes of every distinct tensor it touches, once,
   at the measured copy rate); plus a fixed launch cost. The largest term names the bound.
4. Work outside Triton: a matrix product at the measured cuBLAS rate (or its bytes, if larger),
   anything else at its bytes; bitsandbytes' CUDA kernels (which this cannot read) are taken as
   bandwidth-bound at the HBM rate, its `gemm_4bit` dispatch as bitsandbytes decides it on sm_90.

So a prediction leaves out L2 misses beyond one pass, latency a warp cannot hide, load imbalance
within an SM, and CPU-side launch cost; it is a bound below the real time, and a GPU run of the
bench writes measured / predicted for each case it times (the calibration).
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import cases as C
from . import lowering, sass

LABEL = "static model: a lower bound, not a measurement"


# ----------------------------------------------------------------------------------------------
# the GPUs: every constant with its source
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    clock_hz: float                 # SM clock under load
    hbm_bytes_s: float              # device-to-device copy rate (bytes read + written a second)
    gemm_16bit_flops_s: float       # cuBLAS bf16 GEMM: the tensor-core rate a GEMM reaches here
    gemm_fp32_flops_s: float        # cuBLAS fp32 GEMM (torch's default precision: no TF32)
    launch_s: float                 # GPU time a kernel launch costs beyond its work
    sources: dict = field(default_factory=dict, compare=False)
    regs_per_sm: int = 65536
    smem_per_sm: int = 233472       # 228 KiB
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32

    @property
    def tensor_rates(self):
        """FLOP a second by MMA kind: warpgroup MMA (HGMMA) at the cuBLAS rate; TF32 at half
        (the datasheet ratio); warp MMA (HMMA, mma.sync) at two thirds of HGMMA (an assumption:
        mma.sync kernels on Hopper are reported at about that share of wgmma's)."""
        g = self.gemm_16bit_flops_s
        return {("HGMMA", "16"): g, ("HGMMA", "TF32"): g / 2, ("HMMA", "16"): g * 2 / 3,
                ("HMMA", "TF32"): g / 3}


_LAUNCH_SOURCE = ("assumed: GPU time of a kernel launch without CUDA graphs (launch latency, ramp-up and "
                  "tail); the CPU-side launch cost, which can dominate at decode sizes, is not modelled")
H200 = GPU(
    "H200", sms=132, clock_hz=1.98e9, hbm_bytes_s=4.3e12, gemm_16bit_flops_s=790e12,
    gemm_fp32_flops_s=67e12 * 790 / 989, launch_s=2e-6,
    sources=dict(
        sms="measured: torch on a lent H200 machine (132 multiprocessors)",
        clock_hz="measured: nvidia-smi read 1980 MHz right after bf16 GEMMs on a lent H200",
        hbm_bytes_s="measured: 8.6 GB device-to-device copy in 2.0 ms on a lent H200 (4.3 TB/s)",
        gemm_16bit_flops_s="measured: 8192^3 bf16 torch matmul, 769-798 TFLOP/s on random data, lent H200",
        gemm_fp32_flops_s="datasheet fp32 67 TFLOP/s scaled by cuBLAS bf16's measured share of the bf16 "
                          "datasheet rate (790 / 989)",
        launch_s=_LAUNCH_SOURCE))
H100 = GPU(
    "H100 SXM", sms=132, clock_hz=1.98e9, hbm_bytes_s=3.0e12, gemm_16bit_flops_s=790e12,
    gemm_fp32_flops_s=67e12 * 790 / 989, launch_s=2e-6,
    sources=dict(
        sms="datasheet: 132 SMs (the H200's die)",
        clock_hz="assumed equal to the H200's (same die, same 1980 MHz boost)",
        hbm_bytes_s="datasheet 3.35 TB/s x the copy / datasheet ratio measured on the H200 (4.3 / 4.8), "
                    "about the 3 TB/s SPEC §4 gives",
        gemm_16bit_flops_s="assumed equal to the H200's measurement: same SMs, clock and power, and a "
                           "GEMM at 8192^3 is compute-bound",
        gemm_fp32_flops_s="as the H200's",
        launch_s=_LAUNCH_SOURCE))
GPUS = {"H200": H200, "H100": H100}


def gpu_for(name: str) -> GPU:
    """The GPU table entry for a device name such as 'NVIDIA H200' or 'NVIDIA H100 80GB HBM3'."""
    upper = name.upper()
    if "H200" in upper:
        return H200
    if "H100" in upper:
        return H100
    raise ValueError(f"no model constants for GPU {name!r}; known: {', '.join(GPUS)}")


# ----------------------------------------------------------------------------------------------
# loops: how many times each SASS loop of a kernel runs, from the launch's arguments
# ----------------------------------------------------------------------------------------------

@dataclass
class LoopSpec:
    """A source loop: `trips` a program (the longest, when programs differ); `total` the trips
    summed over the grid when programs differ (else trips x programs); `elements` weight elements
    one trip consumes (the hot loop of a GEMM); `may_vanish` when its trip count is a compile-time
    constant, so the compiler may unroll it away."""
    name: str
    trips: int
    children: list = field(default_factory=list)
    hot: bool = False
    elements: int = 0
    may_vanish: bool = False
    total: int = 0


def _cdiv(a, b):
    return -(-int(a) // int(b))


def _rank_loop(a):
    return LoopSpec("rank", _cdiv(a["R"], a["BLOCK_R"]))


def _split_k_loop(a, tiles, **kw):
    """The K loop of a split-K kernel: the last split may be shorter, so a program's trips are the
    longest's and the grid's are each tile's K blocks once."""
    return LoopSpec("k", _cdiv(min(a["k_per_split"], a["K"]), a["BLOCK_K"]), total=tiles * _cdiv(a["K"], a["BLOCK_K"]),
                    **kw)


def _split_m_loop(a, tiles):
    """The M loop of a split reduction (dA, dB, dm): as `_split_k_loop` over M."""
    return LoopSpec("m", _cdiv(min(a["m_per_split"], a["M"]), a["BLOCK_M"]), total=tiles * _cdiv(a["M"], a["BLOCK_M"]),
                    hot=True)


def _fused_linear_loops(a):
    tiles = _cdiv(a["M"], a["BLOCK_M"]) * _cdiv(a["N"], a["BLOCK_N"])
    k = _split_k_loop(a, tiles, hot=True, elements=a["BLOCK_N"] * a["BLOCK_K"])
    return [k] + ([_rank_loop(a)] if a["SPLIT_K"] == 1 else [])


def _dx_loops(a):
    return [LoopSpec("n", _cdiv(a["N"], a["BLOCK_N"]), hot=True, elements=a["BLOCK_N"] * a["BLOCK_K"]),
            _rank_loop(a)]


def _gemm_forward_loops(a):
    return [LoopSpec("k", _cdiv(a["K"], a["BLOCK_K"]), hot=True, elements=a["BLOCK_N"] * a["BLOCK_K"]),
            _rank_loop(a)]


def _gemm_dx_loops(a):
    return [LoopSpec("n", _cdiv(a["N"], a["BLOCK_N"]), hot=True, elements=a["BLOCK_N"] * a["BLOCK_K"]),
            _rank_loop(a)]


def _decode_loops(a):
    # K in 4-byte words of 8 codes: the last split may be shorter
    words, per_split, step = a["row_words"], a["split_words"], a["BLOCK_K"] // 8
    k = LoopSpec("k", _cdiv(min(per_split, words), step), hot=True, elements=a["BLOCK_N"] * a["BLOCK_K"],
                 total=_cdiv(a["N"], a["BLOCK_N"]) * _cdiv(words, step))
    return [k] + ([_rank_loop(a)] if a["SPLIT_K"] == 1 else [])


# mixed-adapter batches (kernels/multi_lora.py): a tile of rows loops over the adapters its rows
# name: every one present (up to one a row) when the rows are not sorted (decode sizes), about
# E·BLOCK_M/M + 1 when they are (rows grouped by adapter); each adapter's rank loop at the largest r
def _tile_adapters(a):
    E, M, bm = a["E"], a["M"], a["BLOCK_M"]
    if not a.get("PERMUTED"):
        return max(1, min(E, bm, M))
    return max(1, min(E, _cdiv(E * bm, M) + 1))


def _multi_shrink_loops(a):
    # a program an adapter (ADAPTER_GRID): its one-trip adapter loop compiles away
    adapters = [] if a.get("ADAPTER_GRID") else [LoopSpec("adapter", _tile_adapters(a))]
    return [LoopSpec("k", _cdiv(a["k_per_split"], a["BLOCK_K"]), adapters, hot=True)]


def _multi_expand_loops(a, rank_operand):
    rank = LoopSpec("rank", _cdiv(a[rank_operand].shape[1], a["BLOCK_R"]))
    return [rank] if a.get("ADAPTER_GRID") else [LoopSpec("adapter", _tile_adapters(a), [rank])]


def _segment_loops(a, rows_operand):
    # each adapter's run of rows taken as M / E (the runs' real lengths are data)
    M, E = a[rows_operand].shape[0], a["bounds_ptr"].shape[0] - 1
    return [LoopSpec("m", _cdiv(_cdiv(_cdiv(M, E), a["splits"]), a["BLOCK_M"]), hot=True)]


LOOPS = {
    "_decode_linear_kernel": _decode_loops,
    "_gemm_forward_kernel": _gemm_forward_loops,
    "_gemm_dx_kernel": _gemm_dx_loops,
    "_lora_shrink_kernel": lambda a: [_split_k_loop(a, _cdiv(a["M"], a["BLOCK_M"]) * _cdiv(a["R"], a["BLOCK_R"]),
                                                    hot=True)],
    "_fused_linear_kernel": _fused_linear_loops,
    "_split_k_epilogue_kernel": lambda a: [LoopSpec("split", a["SPLIT_K"], may_vanish=True), _rank_loop(a)],
    "_fused_linear_dx_kernel": _dx_loops,
    "_outer_reduce_kernel": lambda a: [_split_m_loop(a, _cdiv(a["P"], a["BLOCK_P"]) * _cdiv(a["Q"], a["BLOCK_Q"]))],
    "_row_norm_kernel": lambda a: [LoopSpec("k", _cdiv(a["K"], a["BLOCK_K"]), [_rank_loop(a)], hot=True,
                                            elements=a["BLOCK_N"] * a["BLOCK_K"])],
    "_row_norm_lut_kernel": lambda a: [LoopSpec(
        "k", _cdiv(min(a["split_words"], a["row_words"]), a["BLOCK_K"] // 8), [_rank_loop(a)], hot=True,
        elements=a["BLOCK_N"] * a["BLOCK_K"], total=_cdiv(a["N"], a["BLOCK_N"]) * _cdiv(a["row_words"], a["BLOCK_K"] // 8))],
    "_sqrt_sum_kernel": lambda a: [],
    "_sum_parts_kernel": lambda a: [],
    "_column_dot_kernel": lambda a: [_split_m_loop(a, _cdiv(a["N"], a["BLOCK_N"]))],
    "_nf4_dequantize_kernel": lambda a: [],
    "_nf4_dequantize_tail_kernel": lambda a: [],
    "_nf4_quantize_kernel": lambda a: [],
    "_dropout_scale_kernel": lambda a: [],
    "_multi_shrink_kernel": _multi_shrink_loops,
    "_multi_expand_kernel": lambda a: _multi_expand_loops(a, "xa_ptr"),
    "_multi_dx_expand_kernel": lambda a: _multi_expand_loops(a, "gb_ptr"),
    "_segment_outer_reduce_kernel": lambda a: _segment_loops(a, "l_ptr"),
    "_segment_column_dot_kernel": lambda a: _segment_loops(a, "a_ptr"),
}


class ModelError(Exception):
    """The model cannot cost a launch (a kernel without a loop table, or SASS loops that do not
    match it)."""


def _match(kernel, specs, loops, path="top level"):
    """[(LoopSpec, sass.Loop)] pairing the specs with the SASS loops at one nesting level (and
    below), in order; constant-trip loops may have been unrolled away."""
    if len(specs) != len(loops):
        kept = [s for s in specs if not s.may_vanish]
        if len(kept) != len(loops):
            raise ModelError(f"{kernel}: {len(loops)} SASS loop(s) at {path}, the loop table expects "
                             f"{len(specs)} ({', '.join(s.name for s in specs) or 'none'})")
        specs = kept
    pairs = []
    for spec, loop in zip(specs, loops):
        pairs.append((spec, loop))
        pairs += _match(kernel, spec.children, loop.children, f"loop '{spec.name}'")
    return pairs


# ----------------------------------------------------------------------------------------------
# compiled facts of a launch (cached on disk: compiling is the slow part)
# ----------------------------------------------------------------------------------------------

def _cache_dir():
    base = os.environ.get("PEFT_OPS_MODEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "peft_ops", "sm90")
    os.makedirs(base, exist_ok=True)
    return base


def _job(launch):
    return launch.job()


def _job_hash(launch):
    import triton

    text = repr((launch.kernel.cache_key, launch.signature, sorted(launch.constexprs.items(), key=str),
                 sorted(launch.options.items()), sorted(launch.attrs.items()), triton.__version__))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _loop_json(loop):
    return dict(first=loop.first, last=loop.last, size=loop.size, own=dict(loop.own), own_mma=loop.own_mma,
                own_bytes=loop.own_bytes, children=[_loop_json(c) for c in loop.children])


def _json_loop(d):
    loop = sass.Loop(d["first"], d["last"], [_json_loop(c) for c in d["children"]], Counter(d["own"]),
                     list(d["own_mma"]), d["own_bytes"])
    return loop


def analyse(job):
    """Compile `job` for sm_90 and reduce its SASS to what the model needs (JSON-able)."""
    facts = lowering.compile_sass(job, ptxas_log=False)
    functions = sass.parse(facts.pop("sass"))
    name = job[1]
    instrs = functions.get(name) or next(iter(functions.values()))
    roots = sass.find_loops(instrs)
    mix, mma, nbytes = sass.outside(instrs, roots)
    return dict(facts, loops=[_loop_json(r) for r in roots], outside=dict(mix), outside_mma=mma,
                outside_bytes=nbytes, total_instructions=len(instrs))


class Compiled:
    """Compile-and-read results by launch key, from the disk cache or a process pool."""

    def __init__(self, workers=2):
        self.workers = workers
        self.facts = {}

    def ensure(self, launches):
        todo = {}
        for launch in launches:
            if launch.key in self.facts or launch.key in todo:
                continue
            path = os.path.join(_cache_dir(), _job_hash(launch) + ".json")
            if os.path.exists(path):
                with open(path) as f:
                    self.facts[launch.key] = json.load(f)
            else:
                todo[launch.key] = (launch, path)
        if not todo:
            return
        items = list(todo.values())
        if self.workers > 1 and len(items) > 1:
            with ProcessPoolExecutor(self.workers) as ex:
                results = list(ex.map(analyse, [_job(launch) for launch, _ in items]))
        else:
            results = [analyse(_job(launch)) for launch, _ in items]
        for (launch, path), facts in zip(items, results):
            self.facts[launch.key] = facts
            tmp = path + f".{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(facts, f)
            os.replace(tmp, path)

    def __getitem__(self, key):
        return self.facts[key]


# ----------------------------------------------------------------------------------------------
# tracing a provider's call: Triton launches and every other device op, in order
# ----------------------------------------------------------------------------------------------

def _storage(t):
    return t.untyped_storage()._cdata


def _footprint(t) -> int:
    """Bytes of memory a tensor view spans (a stride-0 expand spans one element)."""
    if t.numel() == 0:
        return 0
    return (sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 1) + 1) * t.element_size()


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _distinct_bytes(tensors):
    spans = {}
    for t in tensors:
        if t.device.type != "meta":
            continue
        key = _storage(t)
        spans[key] = max(spans.get(key, 0), _footprint(t))
    return spans


@dataclass
class DeviceOp:
    """A device op outside Triton: a torch / cuBLAS / bitsandbytes kernel."""
    name: str
    read: dict          # storage -> bytes
    written: dict
    flops: float = 0.0
    fp32: bool = False
    parts: list = field(default_factory=list)   # [(name, bytes, flops)] for an op that is several kernels
    note: str = ""


_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "dot", "addbmm", "_addmm_activation"}
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense",
         "lift_fresh", "lift_fresh_copy", "detach", "alias", "set_", "resize_", "sym_size", "sym_stride"}


def _gemm_flops(name, args, out):
    if name in ("mm", "bmm", "addmm", "baddbmm", "addbmm", "_addmm_activation"):
        a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
        batch = a.shape[0] if a.dim() == 3 else 1
        return 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
    if name in ("mv", "addmv"):
        a = args[0] if name == "mv" else args[1]
        return 2.0 * a.shape[0] * a.shape[1]
    if name == "dot":
        return 2.0 * args[0].numel()
    return 0.0


def _bnb_gemm_4bit_parts(args, kwargs, out):
    """bitsandbytes' gemm_4bit on sm_90, as its CUDA dispatch decides (`_bnb_fused` below): its fused
    kernel (bandwidth-bound here), or dequantize_4bit + F.linear."""
    A = args[0]
    N, K = args[2][0], args[2][1]
    M = A.numel() // A.shape[-1]
    weight = N * K / 2 + N * K / 64            # NF4 bytes and one absmax byte a block
    act = A.element_size()
    if _bnb_fused(A.dtype, M, N, K):
        return [("bitsandbytes fused 4-bit GEMM (bandwidth-bound)", weight + M * K * act + M * N * act, 0.0)], \
            "fused kernel"
    return [("bitsandbytes dequantize_4bit", weight + N * K * act, 0.0),
            ("cuBLAS GEMM", M * K * act + N * K * act + M * N * act, 2.0 * M * N * K)], "dequantize + F.linear"


_BNB_RULE = None


def _bnb_fused(dtype, M, N, K):
    """Whether bitsandbytes' CUDA dispatch runs its fused 4-bit GEMM at this shape on an sm_90 GPU
    with 132 SMs: its own decision function, read from the installed bitsandbytes (it imports only
    on a CUDA build of torch), else its documented rule (fused up to M = 64 on sm_90)."""
    global _BNB_RULE
    if _BNB_RULE is None:
        _BNB_RULE = _load_bnb_rule()
    return _BNB_RULE(dtype, M, N, K)


def _load_bnb_rule():
    import ast
    import importlib.util

    spec = importlib.util.find_spec("bitsandbytes")
    path = os.path.join(os.path.dirname(spec.origin), "backends", "cuda", "ops.py") if spec else None
    try:
        with open(path) as f:
            tree = ast.parse(f.read())
        wanted = {"_gemm_4bit_use_custom_cuda", "_GEMM_4BIT_CUSTOM_FLOOR_M"}
        body = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name in wanted)
                or (isinstance(n, ast.Assign) and any(getattr(t, "id", "") in wanted for t in n.targets))]
        if len(body) < 2:
            raise LookupError("decision function not found")
        for n in body:
            if isinstance(n, ast.FunctionDef):
                n.decorator_list = []
        scope = {"torch": torch, "_gpu_dispatch_props": lambda index: (132, 9, 0)}
        exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), scope)
        decide = scope["_gemm_4bit_use_custom_cuda"]
        decide(0, torch.bfloat16, 16, 4096, 4096)
        return lambda dtype, M, N, K: bool(decide(0, dtype, M, N, K))
    except (OSError, SyntaxError, LookupError, KeyError, TypeError, NameError, AttributeError):
        return lambda dtype, M, N, K: M <= 64


class _DeviceOps(TorchDispatchMode):
    """Sees every op dispatched on meta tensors and keeps those that would be device kernels."""

    def __init__(self, events):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out):
        inputs = list(_tensors((args, kwargs)))
        outputs = list(_tensors(out))
        if not any(t.device.type == "meta" for t in inputs + outputs):
            return   # host-side (seed tensors, scalars)
        namespace = func.namespace
        name = func._schema.name.split("::")[-1]
        if namespace == "aten":
            if name in _FREE or name.startswith("empty"):
                return
            returns = func._schema.returns
            # a view (an output aliasing an input without writing it) launches nothing
            if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
                return
        read, written = _distinct_bytes(inputs), _distinct_bytes(outputs)
        op = DeviceOp(f"{namespace}.{name}", read, written)
        if namespace == "aten" and name in _GEMMS:
            op.flops = _gemm_flops(name, args, out)
            op.fp32 = any(t.dtype == torch.float32 for t in inputs if t.dim() >= 1)
        elif namespace == "bitsandbytes":
            if name == "gemm_4bit":
                op.parts, decision = _bnb_gemm_4bit_parts(args, kwargs, out)
                op.note = f"bitsandbytes gemm_4bit: {decision} (its sm_90 dispatch)"
            else:
                op.note = "bitsandbytes CUDA kernel: bandwidth-bound at the HBM rate (not readable here)"
        self.events.append(op)


@contextlib.contextmanager
def tracing(sm_count=132):
    """Collect, in order, the Triton calls (`lowering.Call`) and device ops (`DeviceOp`) made inside."""
    events = []
    with lowering.recording(sm_count) as rec:
        rec.on_call = events.append
        with _DeviceOps(events):
            yield events


# ----------------------------------------------------------------------------------------------
# costing
# ----------------------------------------------------------------------------------------------

@dataclass
class Cost:
    """Predicted seconds of one launch or device op, each bound, and what it was."""
    what: str
    seconds: float
    bound: str
    terms: dict
    detail: dict = field(default_factory=dict)


def _occupancy(gpu, facts, warps):
    regs = max(1, facts["registers"])
    regs_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = gpu.regs_per_sm // (regs_warp * warps)
    by_smem = gpu.smem_per_sm // (facts["shared_bytes"] + 1024) if facts["shared_bytes"] else gpu.max_blocks_per_sm
    return max(1, min(gpu.max_blocks_per_sm, gpu.max_warps_per_sm // warps, by_regs, by_smem))


def _mma_kind(opcode):
    found = sass.mma_flops(opcode)
    if found is None:
        return None
    flops, operand = found
    family = "HGMMA" if opcode.startswith(("HGMMA", "QGMMA", "IGMMA")) else "HMMA"
    return flops, (family, "TF32" if operand == "TF32" else "16")


def triton_cost(gpu: GPU, call, facts, chained=False) -> Cost:
    """Predicted time of one Triton call from its compiled facts and its arguments; `chained`
    (`chains`): a launch whose latency and ramp-up hide behind the launch before it."""
    launch = call.launch
    kernel = launch.kernel.__name__
    if kernel not in LOOPS:
        raise ModelError(f"{kernel}: no loop table in bench.model.LOOPS")
    args = dict(call.arguments)
    args.update(launch.constexprs)
    warps = launch.options.get("num_warps", 4)
    programs = call.grid[0] * call.grid[1] * call.grid[2]
    roots = [_json_loop(d) for d in facts["loops"]]
    pairs = _match(kernel, LOOPS[kernel](args), roots)
    # trips of every loop a program and over the grid, nested loops multiplied out
    trips, grid_trips = {}, {}
    top = {id(r) for r in roots}
    for spec, loop in pairs:
        trips[id(loop)] = spec.trips
        grid_trips[id(loop)] = (spec.total or spec.trips * programs) if id(loop) in top else spec.trips
    for root in roots:
        _multiply(root, trips, 1)
        _multiply(root, grid_trips, 1)

    per_program = Counter(facts["outside"])          # warp-instructions a warp issues a program
    lane_bytes = facts["outside_bytes"]
    mma = Counter(facts["outside_mma"])
    grid_instructions = sum(facts["outside"].values()) * programs   # a warp's, over the grid
    grid_mma = Counter({op: n * programs for op, n in mma.items()})
    hot = None
    for spec, loop in pairs:
        n = trips[id(loop)]
        for k, v in loop.own.items():
            per_program[k] += v * n
        lane_bytes += loop.own_bytes * n
        grid_instructions += loop.own_size * grid_trips[id(loop)]
        for op in loop.own_mma:
            mma[op] += n
            grid_mma[op] += grid_trips[id(loop)]
        if spec.hot:
            hot = (spec, loop)
    per_warp = sum(per_program.values())
    progs_sm = _cdiv(programs, gpu.sms)
    resident = _occupancy(gpu, facts, warps)
    cycles = {"issue": max(progs_sm * warps * per_warp / 4, _cdiv(progs_sm, resident) * per_warp)}
    for klass, lanes in sass.LANES.items():
        if per_program.get(klass):
            cycles[klass] = progs_sm * warps * per_program[klass] * 32 / lanes
    if lane_bytes:
        cycles["lsu"] = max(cycles.get("lsu", 0.0), progs_sm * warps * 32 * lane_bytes / sass.SHARED_BYTES_PER_CLOCK)
    terms = {k: v / gpu.clock_hz for k, v in cycles.items()}
    tensor_s, flops = 0.0, 0.0
    rates = gpu.tensor_rates
    for op, count in mma.items():
        kind = _mma_kind(op)
        if kind is None:
            continue
        f = kind[0] * count * warps * progs_sm
        flops += kind[0] * grid_mma[op] * warps
        tensor_s += f / (rates[kind[1]] / gpu.sms)
    if tensor_s:
        terms["tensor"] = tensor_s
    operands = [getattr(v, "base", v) for v in call.arguments.values()]   # a tensor descriptor's tensor
    nbytes = sum(_distinct_bytes(t for t in operands if isinstance(t, torch.Tensor)).values())
    terms["hbm"] = nbytes / gpu.hbm_bytes_s
    bound = max(terms, key=terms.get)
    detail = dict(kernel=kernel, grid="x".join(map(str, call.grid)), warps=warps, programs=programs,
                  registers=facts["registers"], shared_bytes=facts["shared_bytes"], resident=resident,
                  warp_instructions=grid_instructions * warps, hbm_bytes=nbytes, tensor_flops=flops)
    if hot is not None:
        spec, loop = hot
        # the hot loop alone over all 4 x SMs schedulers, no wave or per-SM imbalance: the coarse
        # figure the design budgets are written in (instructions x warps x trips / (4 x SMs x clock))
        detail.update(hot_loop=spec.name, hot_loop_instructions=loop.size, hot_trips=trips[id(loop)],
                      hot_grid_trips=grid_trips[id(loop)],
                      hot_loop_issue_s=loop.size * warps * grid_trips[id(loop)] / (4 * gpu.sms * gpu.clock_hz))
        if spec.elements:
            detail["instructions_per_element"] = loop.size * warps / spec.elements
    if chained:
        detail["note"] = "chained (programmatic dependent launch): no launch cost of its own"
    return Cost(kernel, terms[bound] + (0.0 if chained else gpu.launch_s), bound, terms, detail)


def chains(previous, event) -> bool:
    """Whether `event` is a Triton launch chained to `previous` by programmatic dependent launch:
    it was launched with `launch_pdl` and `previous` is a Triton launch that lets its dependents
    start (`kernels._config.pdl_chain`). Its programs then get resident while `previous` runs and
    wait there for it to end, so the launch latency, ramp-up and tail that `GPU.launch_s` stands
    for overlap `previous` (assumed, as `launch_s` itself is). No work overlaps: the kernel's own
    terms are charged after `previous`'s in full."""
    return (isinstance(event, lowering.Call) and isinstance(previous, lowering.Call)
            and bool(event.launch.options.get("launch_pdl")) and bool(previous.launch.constexprs.get("PDL")))


def _multiply(loop, trips, outer):
    """A nested loop's count times its parents' (a program's, or the grid's)."""
    trips[id(loop)] = trips.get(id(loop), 1) * outer
    for c in loop.children:
        _multiply(c, trips, trips[id(loop)])


def device_op_cost(gpu: GPU, op: DeviceOp) -> Cost:
    """Predicted time of a device op outside Triton (one kernel, or its parts in sequence)."""
    if op.parts:
        seconds, terms = 0.0, Counter()
        for name, nbytes, flops in op.parts:
            t_hbm = nbytes / gpu.hbm_bytes_s
            t_mma = flops / gpu.gemm_16bit_flops_s
            terms["hbm"] += t_hbm
            if flops:
                terms["cublas"] += t_mma
            seconds += max(t_hbm, t_mma) + gpu.launch_s
        bound = max(terms, key=terms.get)
        return Cost(op.name, seconds, bound, dict(terms), dict(note=op.note, kernels=len(op.parts)))
    nbytes = sum(op.read.values()) + sum(op.written.values())
    terms = {"hbm": nbytes / gpu.hbm_bytes_s}
    if op.flops:
        terms["cublas"] = op.flops / (gpu.gemm_fp32_flops_s if op.fp32 else gpu.gemm_16bit_flops_s)
    bound = max(terms, key=terms.get)
    return Cost(op.name, terms[bound] + gpu.launch_s, bound, terms, dict(note=op.note, hbm_bytes=nbytes,
                                                                          flops=op.flops))


# ----------------------------------------------------------------------------------------------
# cases and providers on meta tensors
# ----------------------------------------------------------------------------------------------

def meta_nf4(N, K, dtype):
    """An NF4Weight of shape [N, K] (blocksize 64, double quantization) on the meta device."""
    from peft_ops.nf4 import NF4Weight

    dev, blocks = "meta", _cdiv(N * K, 64)
    return NF4Weight._wrap(
        torch.empty((N * K + 1) // 2, dtype=torch.uint8, device=dev), torch.empty(blocks, dtype=torch.uint8, device=dev),
        (N, K), dtype, 64, nested_absmax=torch.empty(_cdiv(blocks, 256), device=dev),
        nested_code=torch.empty(256, device=dev), offset=0.0, offset_tensor=torch.empty((), device=dev),
        code=torch.empty(16, device=dev), nested_blocksize=256)


def meta_bnb(N, K, dtype):
    """bitsandbytes (packed, quant_state) of shape [N, K] (blocksize 64, double quantization) on meta."""
    from bitsandbytes.functional import QuantState

    dev, blocks = "meta", _cdiv(N * K, 64)
    state2 = QuantState(absmax=torch.empty(_cdiv(blocks, 256), device=dev), code=torch.empty(256, device=dev),
                        blocksize=256, dtype=torch.float32)
    state = QuantState(absmax=torch.empty(blocks, dtype=torch.uint8, device=dev), shape=torch.Size([N, K]),
                       code=torch.empty(16, device=dev), blocksize=64, quant_type="nf4", dtype=dtype,
                       offset=torch.empty((), device=dev), state2=state2)
    return torch.empty((N * K + 1) // 2, 1, dtype=torch.uint8, device=dev), state


def meta_inputs(case):
    """The bench's `Inputs` for `case`, every tensor on the meta device."""
    from .providers import Inputs

    dev = "meta"
    r, ad = max(case.r, 1), case.adapter_dtype
    w = torch.empty(case.N, case.K, dtype=case.dtype, device=dev)
    A = torch.empty(r, case.K, dtype=ad, device=dev, requires_grad=True)
    B = torch.empty(case.N, r, dtype=ad, device=dev, requires_grad=True)
    m = torch.empty(case.N, dtype=ad, device=dev, requires_grad=True) if case.dora else None
    M = max(case.M, 1)
    x = torch.empty(M, case.K, dtype=case.dtype, device=dev, requires_grad=case.trains)
    dy = torch.empty(M, case.N, dtype=case.dtype, device=dev) if case.mode == "forward+backward" else None
    cache = {"w": w}
    if case.quantized:
        cache["nf4"] = meta_nf4(case.N, case.K, case.dtype)
        if _has("bitsandbytes"):
            cache["bnb"] = meta_bnb(case.N, case.K, case.dtype)
    return Inputs(w, A, B, m, x, dy, cache)


def _has(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


MODELLED = ("peft_ops", "torch", "dequant_addmm", "peft_bnb")


@contextlib.contextmanager
def _meta_friendly_peft():
    """PEFT's DoRA init deep-copies a bitsandbytes base to take the weight norm once; a meta
    Params4bit cannot be deep-copied, and the copy is no part of a forward, so it is skipped."""
    try:
        import peft.tuners.lora.dora as dora
    except ImportError:
        yield
        return
    saved = dora.deepcopy
    dora.deepcopy = lambda obj: obj
    try:
        yield
    finally:
        dora.deepcopy = saved


def trace_case(case, provider, sm_count=132):
    """(events, note) of one provider running one case on meta tensors."""
    from .providers import make_layer

    from peft_ops import strategy

    inputs = meta_inputs(case)
    with _meta_friendly_peft():
        layer = make_layer(provider, case, inputs)
    run = layer.closure(case, inputs)
    before = strategy.counts()
    with tracing(sm_count) as events:
        run()
    if provider == "peft_ops":
        # the strategies the rule picks (the model's meta tensors are never timed)
        return events, "Triton; " + strategy.describe(before, strategy.counts())
    return events, layer.note


def strategy_of(events):
    """The kernels a trace launched, in order, without repeats."""
    names = [e.launch.kernel.__name__ for e in events if isinstance(e, lowering.Call)]
    return " + ".join(dict.fromkeys(n.strip("_").replace("_kernel", "") for n in names))


@dataclass
class Prediction:
    case: object
    provider: str
    gpu: GPU
    seconds: float
    bound: str
    costs: list
    note: str = ""
    strategy: str = ""

    @property
    def us(self):
        return self.seconds * 1e6


def _case_bound(costs):
    share = Counter()
    for c in costs:
        share[c.bound] += c.seconds
    launches = sum(1 for _ in costs)
    total = sum(share.values()) or 1.0
    top = share.most_common(2)
    text = ", ".join(f"{b} {100 * s / total:.0f}%" for b, s in top)
    return f"{text} ({launches} launches)"


class Model:
    """Predictions for cases x providers x GPUs; compiles each distinct Triton launch once."""

    def __init__(self, workers=2):
        self.compiled = Compiled(workers)
        self.traces = {}

    def trace(self, case, provider):
        key = (case, provider)
        if key not in self.traces:
            self.traces[key] = trace_case(case, provider)
        return self.traces[key]

    def prepare(self, pairs):
        """Trace every (case, provider) in `pairs` and compile their launches together."""
        launches = []
        for case, provider in pairs:
            events, _ = self.trace(case, provider)
            launches += [e.launch for e in events if isinstance(e, lowering.Call)]
        self.compiled.ensure(launches)

    def predict(self, case, provider, gpu: GPU) -> Prediction:
        events, note = self.trace(case, provider)
        self.compiled.ensure([e.launch for e in events if isinstance(e, lowering.Call)])
        costs = []
        for previous, e in zip([None] + events[:-1], events):
            if isinstance(e, lowering.Call):
                costs.append(triton_cost(gpu, e, self.compiled[e.launch.key], chained=chains(previous, e)))
            else:
                costs.append(device_op_cost(gpu, e))
        seconds = sum(c.seconds for c in costs)
        strategy = strategy_of(events) if provider == "peft_ops" else ""
        return Prediction(case, provider, gpu, seconds, _case_bound(costs), costs, note, strategy)


# ----------------------------------------------------------------------------------------------
# the case sets
# ----------------------------------------------------------------------------------------------

TRAIN_MS = (64, 512, 4096, 16384)
DECODE_MS = (1, 16, 64)


def model_cases(quick=False):
    """The `gpu` shape set the model covers: the four Llama-3-8B projections; decode at M in
    {1, 16, 64}; forward and forward+backward at M in {64, 512, 4096, 16384}; r 16 and 64;
    LoRA, QLoRA, DoRA, QDoRA; dropout 0 and 0.05 in training; the NF4 dequantize. `quick`: a
    subset for CI (two projections, M 1 / 16 / 4096, r 16)."""
    shapes = C.LLAMA3_8B if not quick else ((4096, 4096), (4096, 14336))
    ranks = (16, 64) if not quick else (16,)
    decode = DECODE_MS if not quick else (1, 16)
    train = TRAIN_MS if not quick else (4096,)
    ops = ("qlora", "qdora", "lora", "dora")
    cases = []
    for K, N in shapes:
        for op in ops:
            for r in ranks:
                cases += [C.Case(op, "decode", M, N, K, r) for M in decode]
                for mode in ("forward", "forward+backward"):
                    for M in train:
                        for p in (0.0, 0.05):
                            if quick and p and op in ("lora", "dora"):
                                continue
                            cases.append(C.Case(op, mode, M, N, K, r, dropout=p))
        cases.append(C.Case("nf4_dequantize", "forward", 0, N, K, 0))
        if not quick:
            cases += serving_cases(K, N)
    return cases


SERVING_PREFILL_MS = (512,)


def serving_cases(K, N):
    """Serving without grad (the serving issue): QLoRA / QDoRA prefill at M = 512 (their decode
    cases are above), and mixed-adapter decode batches of 16 rows over 8 adapters."""
    cases = [C.Case(op, "prefill", M, N, K, 16) for op in ("qlora", "qdora") for M in SERVING_PREFILL_MS]
    return cases + [C.Case(op, "decode", 16, N, K, 16, adapters=C.SERVING_ADAPTERS) for op in C.MIXED_OPS]


def providers_for(case):
    out = []
    for name in MODELLED:
        if name == "peft_bnb" and not (_has("peft") and _has("bitsandbytes")):
            continue
        if name == "dequant_addmm" and case.dropout and case.trains:
            continue   # the bench's baseline times dropout 0 only
        if name == "torch" and case.op == "nf4_dequantize":
            continue
        if name == "dequant_addmm" and case.op == "nf4_dequantize":
            continue
        if name == "dequant_addmm" and case.mixed:
            continue   # one adapter a call; PEFT's loop (peft_bnb) is the mixed baseline
        out.append(name)
    return out


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------

LAUNCH_FIELDS = ["gpu", "op", "mode", "M", "N", "K", "r", "dropout", "provider", "position", "what", "bound",
                 "predicted_us", "issue_us", "tensor_us", "hbm_us", "other_bound_us", "grid", "warps",
                 "registers", "shared_bytes", "resident", "hot_loop", "hot_loop_instructions", "hot_trips",
                 "instructions_per_element", "hot_loop_issue_us", "note"]


def rows_for(pred: Prediction, env, ratios=None):
    """Long-format rows (the bench's columns) for one prediction: the time, and for peft_ops the
    ratio against each other provider of the case."""
    from .suite import _row

    note = f"{LABEL}; bound: {pred.bound}" + (f"; kernels: {pred.strategy}" if pred.strategy else "")
    if pred.note:
        note += f"; {pred.note}"
    env = dict(env, device=f"{pred.gpu.name} (static model)")
    rows = [_row(env, pred.case, pred.provider, "predicted_time", "us", pred.us, note=note)]
    for base, ratio in (ratios or {}).items():
        rows.append(_row(env, pred.case, pred.provider, f"ratio_vs_{base}", "x", ratio, note=LABEL))
    return rows


def calibrate(cases, rows, device_name, env, workers=2):
    """The first check of the model on a GPU: for every case the bench timed there and a provider
    the model covers, the prediction for that GPU (`gpu_for(device_name)`) and measured /
    predicted (metrics `predicted_time`, us, and `measured_over_predicted`, x). A ratio below 1
    would mean the model is no lower bound. Returns (rows, [(label, provider, why)] not modelled)."""
    from .suite import _row

    gpu = gpu_for(device_name)
    measured = {(r["op"], r["mode"], r["M"], r["N"], r["K"], r["r"], r["dropout"], r["provider"]): float(r["p50"])
                for r in rows if r["metric"] == "time" and r["unit"] == "ms"}
    model, out, failures = Model(workers), [], []
    for case in cases:
        for provider in providers_for(case):
            t = measured.get((case.op, case.mode, case.M, case.N, case.K, case.r, case.dropout, provider))
            if t is None:
                continue
            try:
                pred = model.predict(case, provider, gpu)
            except Exception as e:   # reported, never hidden
                failures.append((case.label(), provider, f"{type(e).__name__}: {e}"[:200]))
                continue
            out += rows_for(pred, env)
            out.append(_row(dict(env, device=f"{env['device']} (measured) / {gpu.name} (static model)"), case,
                            provider, "measured_over_predicted", "x", t * 1e-3 / pred.seconds,
                            note=f"measured median / {LABEL}"))
    return out, failures


def launch_rows(pred: Prediction):
    out = []
    c = pred.case
    for i, cost in enumerate(pred.costs):
        d = cost.detail
        others = {k: v for k, v in cost.terms.items() if k not in ("issue", "tensor", "hbm")}
        row = dict(gpu=pred.gpu.name, op=c.op, mode=c.mode, M=c.M, N=c.N, K=c.K, r=c.r, dropout=c.dropout,
                   provider=pred.provider, position=i, what=cost.what, bound=cost.bound,
                   predicted_us=f"{cost.seconds * 1e6:.4g}",
                   issue_us=f"{cost.terms.get('issue', 0) * 1e6:.4g}", tensor_us=f"{cost.terms.get('tensor', 0) * 1e6:.4g}",
                   hbm_us=f"{cost.terms.get('hbm', 0) * 1e6:.4g}",
                   other_bound_us=";".join(f"{k}={v * 1e6:.3g}" for k, v in sorted(others.items())),
                   note=d.get("note", ""))
        for k in ("grid", "warps", "registers", "shared_bytes", "resident", "hot_loop", "hot_loop_instructions",
                  "hot_trips"):
            row[k] = d.get(k, "")
        ipe = d.get("instructions_per_element")
        row["instructions_per_element"] = f"{ipe:.4g}" if ipe is not None else ""
        row["hot_loop_issue_us"] = f"{d['hot_loop_issue_s'] * 1e6:.4g}" if "hot_loop_issue_s" in d else ""
        out.append(row)
    return out


def hot_loop_of(pred: Prediction, kernel_prefix=("_fused_linear", "_decode", "_dequant")):
    """The costliest launch of a peft_ops prediction that has a hot loop with a per-element count."""
    best = None
    for cost in pred.costs:
        if "instructions_per_element" in cost.detail and (best is None or cost.seconds > best.seconds):
            best = cost
    return best


def _ratio(index, gpu, case, ours="peft_ops", base="torch", scale=1.0):
    a, b = index.get((gpu, case, ours)), index.get((gpu, case, base))
    if a is None or b is None:
        return None
    return a.seconds / (scale * b.seconds)


def check_targets(index, gpu="H200"):
    """The speed targets (the decode-and-training issue), PASS / FAIL on the model's predictions
    for `gpu`: each line gives the worst case of its set."""
    out = [f"Targets on {gpu} ({LABEL}):"]

    def line(text, values, limit):
        values = [(v, c) for v, c in values if v is not None]
        if not values:
            out.append(f"  {text}: not modelled in this run")
            return
        worst, case = max(values, key=lambda vc: vc[0])
        out.append(f"  {text}: worst {worst:.3f} at {case.label()} (limit {limit:g}): "
                   f"{'PASS' if worst <= limit else 'FAIL'}")

    cases = {c for (g, c, _) in index if g == gpu}
    big = ((4096, 14336), (14336, 4096))
    decode = [c for c in cases if c.mode == "decode" and c.op in ("qlora", "qdora") and c.M in (1, 16)
              and (c.K, c.N) in big]
    line("decode vs dense bf16 (peft_ops / torch, at most 1/3)", [(_ratio(index, gpu, c), c) for c in decode], 1 / 3)
    hot = []
    for c in decode:
        p = index.get((gpu, c, "peft_ops"))
        cost = hot_loop_of(p) if p else None
        if cost is not None:
            hot.append((cost.detail["instructions_per_element"], c))
    line("decode hot loop, warp-instructions per weight element", hot, 0.16)
    train = [c for c in cases if c.trains and c.M in (4096, 16384) and (c.K, c.N) in ((4096, 4096), (4096, 14336))]
    q = lambda op, mode, p=0.0: [c for c in train if c.op == op and c.mode == mode and c.dropout == p]
    line("QLoRA forward vs dense bf16", [(_ratio(index, gpu, c), c) for c in q("qlora", "forward")], 1.10)
    line("QLoRA forward+backward vs dense bf16", [(_ratio(index, gpu, c), c) for c in q("qlora", "forward+backward")], 1.20)
    line("QDoRA forward+backward vs dense bf16", [(_ratio(index, gpu, c), c) for c in q("qdora", "forward+backward")], 1.30)
    drop = []
    for c in q("qlora", "forward+backward", 0.05) + q("qlora", "forward", 0.05):
        with_p, without = index.get((gpu, c, "peft_ops")), index.get((gpu, dataclasses.replace(c, dropout=0.0), "peft_ops"))
        drop.append((with_p.seconds / without.seconds if with_p and without else None, c))
    line("QLoRA dropout 0.05 over dropout 0", drop, 1.05)
    line("QDoRA dropout 0.05 vs two dense GEMMs",
         [(_ratio(index, gpu, c, scale=2.0), c) for m in ("forward", "forward+backward") for c in q("qdora", m, 0.05)], 1.30)
    line("QLoRA forward+backward vs PEFT + bitsandbytes (at most 1/1.3)",
         [(_ratio(index, gpu, c, base="peft_bnb"), c) for c in q("qlora", "forward+backward")], 1 / 1.3)
    line("QDoRA forward+backward vs PEFT + bitsandbytes (at most 1/2)",
         [(_ratio(index, gpu, c, base="peft_bnb"), c) for c in q("qdora", "forward+backward")], 0.5)
    out += serving_targets(index, gpu, cases, line)
    return "\n".join(out)


def serving_targets(index, gpu, cases, line):
    """The serving issue's targets: QDoRA decode and prefill without grad within 1.05x of QLoRA's
    (the same case as qlora) at M = 1, 16 and 512; a 16-row decode batch over 8 adapters within
    1.25x of a single-adapter batch of the same size (the qlora / qdora decode case). Lines of
    ratios against PEFT's mixed-batch loop follow, with no limit."""
    def same(c, op):
        p, q = index.get((gpu, c, "peft_ops")), index.get((gpu, dataclasses.replace(c, op=op, adapters=1), "peft_ops"))
        return p.seconds / q.seconds if p and q else None
    dora = [c for c in cases if c.op == "qdora" and c.M in (1, 16, 512) and c.r == 16
            and c.mode in ("decode", "prefill")]
    line("QDoRA decode / prefill vs QLoRA without grad (peft_ops qdora / qlora)", [(same(c, "qlora"), c) for c in dora],
         1.05)
    mixed = [c for c in cases if c.mixed and c.mode == "decode" and c.M == 16]
    line("mixed decode, 16 rows over 8 adapters, vs one adapter (peft_ops)",
         [(same(c, c.op.replace("_mixed", "")), c) for c in mixed], 1.25)
    extra = []
    for c in mixed:
        r = _ratio(index, gpu, c, base="peft_bnb")
        if r is not None:
            extra.append(f"    {c.label()}: peft_ops / PEFT's mixed-batch loop {r:.3f}")
    return extra


def summarize(preds, targets_text=""):
    """Text tables: per GPU, each case with peft_ops' prediction and every other provider's."""
    by_gpu = defaultdict(dict)
    for p in preds:
        by_gpu[p.gpu.name][(p.case, p.provider)] = p
    lines = [f"Predicted times, us ({LABEL}). ratio = peft_ops / provider (< 1: peft_ops faster)."]
    for gname, table in by_gpu.items():
        cases = list(dict.fromkeys(c for c, _ in table))
        lines.append(f"\n{gname}:")
        lines.append(f"{'case':<52} {'peft_ops':>10} {'bound':<24} " +
                     " ".join(f"{p:>20}" for p in MODELLED[1:]))
        for case in cases:
            ours = table.get((case, "peft_ops"))
            cells = [f"{case.label():<52}", f"{ours.us:10.1f}" if ours else f"{'-':>10}",
                     f"{(ours.bound.split(' (')[0] if ours else ''):<24}"]
            for prov in MODELLED[1:]:
                other = table.get((case, prov))
                if other is None:
                    cells.append(f"{'-':>20}")
                else:
                    ratio = f" ({ours.seconds / other.seconds:.2f}x)" if ours else ""
                    cells.append(f"{other.us:12.1f}{ratio:>8}")
            lines.append(" ".join(cells))
    if targets_text:
        lines += ["", targets_text]
    return "\n".join(lines)


def hot_loop_table(preds, gpu_name="H200"):
    """Per peft_ops prediction with a GEMM hot loop: instructions a warp a trip, warps, and
    warp-instructions per weight element (the figures the design budgets are written in)."""
    lines = [f"Hot loops of the costliest GEMM launch per case ({gpu_name}; {LABEL}):",
             f"{'case':<52} {'kernel':<28} {'instr/warp':>10} {'warps':>5} {'instr/elem':>10} {'loop us':>8} "
             f"{'bound':>8} {'us':>9}"]
    for p in preds:
        if p.provider != "peft_ops" or p.gpu.name != gpu_name:
            continue
        cost = hot_loop_of(p)
        if cost is None:
            continue
        d = cost.detail
        lines.append(f"{p.case.label():<52} {d['kernel']:<28} {d['hot_loop_instructions']:>10} {d['warps']:>5} "
                     f"{d['instructions_per_element']:>10.3f} {d['hot_loop_issue_s'] * 1e6:>8.1f} "
                     f"{cost.bound:>8} {cost.seconds * 1e6:>9.1f}")
    return "\n".join(lines)


def bounds_text(model, traced):
    """The sm_90 lowering's bounds (`lowering.verdict`: no spill on 16-bit activations, shared
    memory, tensor cores, a chained launch's wait) over every distinct Triton launch of the
    modelled cases, whose Llama-sized shapes the lowering workload's small ones do not all reach."""
    seen = {}
    for case, provider in traced:
        for e in model.trace(case, provider)[0]:
            if isinstance(e, lowering.Call) and e.launch.key not in seen:
                seen[e.launch.key] = (e.launch, case)
    verdicts = {key: lowering.verdict(launch, model.compiled[key])["verdict"] for key, (launch, _) in seen.items()}
    bad = [f"  {launch.label()} ({case.label()}): {verdicts[key]}" for key, (launch, case) in seen.items()
           if verdicts[key] != "ok"]
    head = f"sm_90 bounds over the {len(seen)} distinct Triton launches of these cases (those of bench.lowering)"
    return head + (": all hold" if not bad else f": {len(bad)} break one\n" + "\n".join(bad))


def run(cases=None, gpus=("H200", "H100"), out_dir=None, workers=2, quick=False, say=print):
    """Predict every case x modelled provider on each GPU; write model.csv, model_launches.csv,
    summary.txt and plots under `out_dir` (when given); returns the predictions."""
    from .suite import _env, write_csv

    t0 = time.perf_counter()
    cases = cases if cases is not None else model_cases(quick)
    model = Model(workers)
    pairs = [(c, p) for c in cases for p in providers_for(c)]
    say(f"static model: tracing {len(pairs)} case x provider pairs on meta tensors ...")
    failures = []
    traced = []
    for c, p in pairs:
        try:
            model.trace(c, p)
            traced.append((c, p))
        except Exception as e:   # a provider that cannot run a case is reported, not hidden
            failures.append((c, p, f"{type(e).__name__}: {e}"[:200]))
    say(f"static model: compiling the distinct Triton launches for sm_90 ...")
    model.prepare(traced)
    preds = []
    for gname in gpus:
        gpu = GPUS[gname]
        for c, p in traced:
            try:
                preds.append(model.predict(c, p, gpu))
            except ModelError as e:
                failures.append((c, p, str(e)))
    env = _env("cpu")
    rows, launches = [], []
    index = {(p.gpu.name, p.case, p.provider): p for p in preds}
    for p in preds:
        ratios = {}
        if p.provider == "peft_ops":
            for other in MODELLED[1:]:
                q = index.get((p.gpu.name, p.case, other))
                if q is not None:
                    ratios[other] = p.seconds / q.seconds
            launches += launch_rows(p)
        rows += rows_for(p, env, ratios)
    targets_text = check_targets(index)
    text = summarize(preds, targets_text)
    text += "\n\n" + hot_loop_table(preds)
    text += "\n\n" + bounds_text(model, traced)
    if failures:
        text += f"\n\nNot modelled ({len(failures)}):\n" + "\n".join(f"  {c.label()} / {p}: {why}" for c, p, why in failures)
    text += f"\n\nConstants (source of each):\n" + "\n".join(
        f"  {g.name}: {k} = {getattr(g, k):.4g} ({src})" for g in (GPUS[n] for n in gpus) for k, src in g.sources.items())
    text += f"\n\n({len(preds)} predictions in {time.perf_counter() - t0:.0f} s, {len(model.compiled.facts)} " \
            f"distinct Triton launches; {lowering.toolchain()})"
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        write_csv(os.path.join(out_dir, "model.csv"), rows)
        import csv
        with open(os.path.join(out_dir, "model_launches.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LAUNCH_FIELDS)
            w.writeheader()
            w.writerows(launches)
        with open(os.path.join(out_dir, "model_summary.txt"), "w") as f:
            f.write(text + "\n")
    say(text)
    return preds


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CI subset (two projections, M 1 / 16 / 4096, r 16)")
    ap.add_argument("--out", help="folder for model.csv, model_launches.csv and model_summary.txt")
    ap.add_argument("--gpus", nargs="+", default=list(GPUS), choices=list(GPUS))
    ap.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    a = ap.parse_args(argv)
    why = lowering.available()
    if why:
        print(f"python -m bench.model: {why}", file=sys.stderr)
        return 2
    run(gpus=a.gpus, out_dir=a.out, workers=a.workers, quick=a.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
