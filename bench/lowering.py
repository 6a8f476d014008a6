"""What the kernels compile to on a Hopper GPU, read on a machine without one.

    python -m bench.lowering [--out DIR] [--quick]

Runs the real forward and backward of `peft_ops.lora_linear` (LoRA, QLoRA, DoRA, QDoRA, with and
without dropout, in bf16 and fp32, at decode, small and training batch sizes) and the NF4
storage launchers on CPU tensors, with every Triton launch replaced by an ahead-of-time compile
for sm_90. Each distinct launch is
lowered once with Triton's own ptxas and read back with its cuobjdump:

- registers a thread, and the bytes ptxas spilled to local memory (stores plus loads, from its
  own report; the stack frame, which a call such as an IEEE divide also needs, is kept apart),
- shared memory a block needs, against the 227 KiB an sm_90 block may have,
- tensor-core instructions (HGMMA is Hopper's warpgroup MMA, HMMA the older warp MMA).

So the configurations the launchers really pick, with the flags they really pass, are checked
for the two failures that need no timing to see: spills and shared memory a GPU would refuse.
No kernel runs and nothing here is a speed: the results are facts about the code, not the
hardware. `tests/test_gpu_compile.py` asserts the same bounds in CI.

Kernels must be defined with TRITON_INTERPRET unset (or 0); this module refuses to run under the
interpreter, whose kernels cannot be compiled.
"""

import argparse
import contextlib
import csv
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import sass as _sass

HOPPER = GPUTarget("cuda", 90, 32)
H100_SMS = 132
SMEM_LIMIT = 232448   # bytes of shared memory one block may use on sm_90 (227 KiB)
# Launches on fp32 activations run their products as "ieee" FMA dots, which hold whole operand
# rows in registers; a few of them spill a few words at every tile size tried. This bounds them.
# Every launch on 16-bit activations must not spill at all.
FP32_SPILL_BOUND = 64

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
          torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
_LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg", "launch_pdl"}


def _bin(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def available():
    """None when lowering can run here, else why not."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: interpreted kernels cannot be compiled"
    if not os.path.exists(_bin("cuobjdump")):
        return "this triton wheel ships no cuobjdump"
    return None


class Launch:
    """One distinct kernel launch: the kernel, its argument types, constexprs, the JIT's argument
    specialization (16-byte alignment / divisibility, per argument) and the launch options."""

    def __init__(self, kernel, signature, constexprs, options, where, attrs=None):
        self.kernel, self.signature, self.constexprs, self.options = kernel, signature, constexprs, options
        self.attrs = attrs or {}
        self.where = where
        self.count = 1

    @property
    def key(self):
        return (self.kernel.__name__, tuple(self.signature.items()), tuple(self.constexprs.items()),
                tuple(sorted(self.options.items())), tuple(sorted(self.attrs.items())))

    def job(self):
        """What `compile_sass` needs, picklable: (module, kernel name, signature, constexprs,
        options, specialization keys)."""
        return (self.kernel.fn.__module__, self.kernel.fn.__name__, self.signature, self.constexprs,
                self.options, self.attrs)

    def label(self):
        flags = ", ".join(f"{k}={_short(v)}" for k, v in self.constexprs.items())
        return f"{self.kernel.__name__}[{flags}; warps={self.options.get('num_warps', 4)}, " \
               f"stages={self.options.get('num_stages', 3)}]"


def _short(v):
    if isinstance(v, tl.dtype):
        return str(v)
    return v


def _describe(fn, args, kwargs):
    """Signature, constexprs, options and argument specialization of `fn(*args, **kwargs)` exactly
    as Triton's JIT makes them (an int equal to 1 becomes a constexpr; pointers 16-byte aligned and
    ints divisible by 16 are marked so), and the bound arguments by name.

    The specialization matters: with it the compiler vectorizes loads and drops index arithmetic,
    so compiling without it reads slower code than a GPU would run."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    options = {k: v for k, v in kwargs.items() if k in _LAUNCH_OPTIONS}
    bound = inspect.signature(fn.fn).bind(*args, **{k: v for k, v in kwargs.items() if k not in options})
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for param in fn.params:
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        if not isinstance(value, (torch.Tensor, bool, int, float)) and type(value).__name__ != "TensorDescriptor":
            raise TypeError(f"{fn.__name__}: cannot type argument {param.name}={value!r}")
        ty, key = native_specialize_impl(BaseBackend, value, param.is_const, not param.do_not_specialize,
                                         not param.do_not_specialize_on_alignment)
        if ty == "constexpr":
            signature[param.name] = "constexpr"
            constexprs[param.name] = key
            continue
        signature[param.name] = ty
        if isinstance(key, str) and key:
            attrs[param.name] = key
    return signature, constexprs, options, attrs, dict(bound.arguments)


class Call:
    """One launch as made: its distinct `launch`, the grid and the arguments by name."""

    def __init__(self, launch, grid, arguments):
        self.launch, self.arguments = launch, arguments
        grid = tuple(grid(arguments) if callable(grid) else grid)
        self.grid = grid + (1,) * (3 - len(grid))


class Recorder:
    """Collects the distinct launches made while `recording()` is active, and every call in order
    (`calls`; `on_call`, when set, sees each one as it is made)."""

    def __init__(self):
        self.launches = {}
        self.calls = []
        self.on_call = None
        self.where = ""

    def add(self, fn, args, kwargs, grid=(1,)):
        signature, constexprs, options, attrs, arguments = _describe(fn, args, kwargs)
        launch = Launch(fn, signature, constexprs, options, where=self.where, attrs=attrs)
        if launch.key in self.launches:
            self.launches[launch.key].count += 1
            launch = self.launches[launch.key]
        else:
            self.launches[launch.key] = launch
        call = Call(launch, grid, arguments)
        self.calls.append(call)
        if self.on_call is not None:
            self.on_call(call)


@contextlib.contextmanager
def recording(sm_count=H100_SMS):
    """Route peft_ops' ops to the Triton launchers on CPU tensors and record, not run, each launch.

    Outputs of the kernels stay uninitialised: the point is which launches the forward and
    backward make, not their values. `sm_count` stands in for the GPU's SMs in split heuristics, and
    launches chain by programmatic dependent launch, as on sm_90.
    """
    from peft_ops import nf4 as pnf4
    from peft_ops import ops
    from peft_ops.kernels import _config as kconfig
    from peft_ops.kernels import lora as klora

    rec = Recorder()
    saved = (JITFunction.run, ops.use_triton, pnf4._use_triton, klora._sm_count, kconfig._pdl)

    def run(self, *args, grid, warmup, **kwargs):
        rec.add(self, args, kwargs, grid)

    JITFunction.run = run
    ops.use_triton = lambda t: True
    pnf4._use_triton = lambda t: True
    klora._sm_count = lambda device: sm_count
    kconfig._pdl = lambda device: True   # an sm_90 GPU: launches chain (`kernels._config.pdl_args`)
    try:
        yield rec
    finally:
        JITFunction.run, ops.use_triton, pnf4._use_triton, klora._sm_count, kconfig._pdl = saved


# ----------------------------------------------------------------------------------------------
# the workload: what a training step and a decode step launch
# ----------------------------------------------------------------------------------------------

def workload(quick=False):
    """(label, thunk) pairs; each thunk runs one forward (and backward when training)."""
    import peft_ops

    gen = torch.Generator().manual_seed(0)
    N, K = 512, 1024
    weights = {
        "dense": lambda dtype: torch.randn(N, K, generator=gen).to(dtype),
        "nf4": lambda dtype: peft_ops.NF4Weight.quantize(torch.randn(N, K, generator=gen).to(dtype)),
    }
    # K not a multiple of the block size (per-element scales) and odd (bytes straddle rows).
    odd = peft_ops.NF4Weight.quantize(torch.randn(N, 999, generator=gen).to(torch.bfloat16))

    rows = [1, 48, 512] if not quick else [1, 512]
    ranks = [16, 64] if not quick else [16]
    dtypes = [torch.bfloat16, torch.float32] if not quick else [torch.bfloat16]
    jobs = []

    def case(label, weight, dtype, M, r, dora, p, train, bias=False):
        k = weight.shape[1]

        def thunk():
            x = torch.randn(M, k, generator=gen).to(dtype).requires_grad_(train)
            A = torch.randn(r, k, generator=gen).requires_grad_(train)
            B = torch.randn(weight.shape[0], r, generator=gen).requires_grad_(train)
            m = torch.rand(weight.shape[0], generator=gen).requires_grad_(train) if dora else None
            b = torch.randn(weight.shape[0], generator=gen).to(dtype) if bias else None
            with torch.set_grad_enabled(train):
                y = peft_ops.lora_linear(x, weight, A, B, 2.0, bias=b, magnitude=m, dropout=p, training=train)
                if train:
                    y.backward(torch.randn(y.shape, generator=gen).to(y.dtype))
        jobs.append((label, thunk))

    for dtype in dtypes:
        built = {name: make(dtype) for name, make in weights.items()}
        for name, weight in built.items():
            for dora in (False, True):
                op = ("q" if name == "nf4" else "") + ("dora" if dora else "lora")
                for M in rows:
                    train = M > 16
                    for r in ranks:
                        for p in ((0.0, 0.05) if train else (0.0,)):
                            case(f"{op} {str(dtype)[6:]} M={M} r={r} p={p}", weight, dtype, M, r, dora, p, train)
    case("qdora bf16 K=999 M=48 r=16 bias", odd, torch.bfloat16, 48, 16, True, 0.05, True, bias=True)
    case("qlora bf16 K=999 M=1 r=16", odd, torch.bfloat16, 1, 16, False, 0.0, False)
    case("qdora bf16 M=512 r=256", weights["nf4"](torch.bfloat16), torch.bfloat16, 512, 256, True, 0.0, True)
    # decode with the shrink formed in the decode GEMM's programs (K split, at most two ranks a
    # 128-row tile: 4096 rows are 32 tiles), one rank and two a tile, 1 and 64 rows
    wide = peft_ops.NF4Weight.quantize(torch.randn(4096, K, generator=gen).to(torch.bfloat16))
    for M, r in ((1, 32), (64, 64)):
        case(f"qdora bf16 N=4096 M={M} r={r}", wide, torch.bfloat16, M, r, True, 0.0, False)

    # the storage kernels, called the way NF4Weight calls them, and the test-side mask kernel
    from peft_ops.kernels import dropout as kdropout
    from peft_ops.kernels import nf4 as knf4
    dense = torch.randn(N, K, generator=gen).to(torch.bfloat16)
    single = peft_ops.NF4Weight.quantize(dense, double_quant=False)
    for w in (odd, single):
        for dtype in (torch.bfloat16, torch.float32):
            jobs.append((f"nf4 dequantize to {str(dtype)[6:]}", lambda w=w, dtype=dtype: knf4.nf4_dequantize(w, dtype)))
    jobs.append(("nf4 quantize bf16", lambda: knf4.nf4_quantize(dense, 64)))
    jobs.append(("dropout mask", lambda: kdropout.dropout_scale_tensor(7, (48, K), 0.1, "cpu")))

    # mixed-adapter batches (kernels/multi_lora.py): three adapters of ranks 16 / 8 / 64 (DoRA on
    # the first and last when `dora`), rows on each and on the base layer; decode (no grad, M = 1
    # and 16: one tile, split K) and training (sorted rows, the per-adapter reductions)
    def multi(label, weight, dtype, M, dora, p, train):
        k, n = weight.shape[1], weight.shape[0]

        def thunk():
            x = torch.randn(M, k, generator=gen).to(dtype).requires_grad_(train)
            ranks = (16, 8, 64)
            As = [torch.randn(r, k, generator=gen).requires_grad_(train) for r in ranks]
            Bs = [torch.randn(n, r, generator=gen).requires_grad_(train) for r in ranks]
            mags = [torch.rand(n, generator=gen).requires_grad_(train) if dora and e != 1 else None
                    for e in range(len(ranks))]
            idx = torch.randint(-1, len(ranks), (M,), generator=gen)
            with torch.set_grad_enabled(train):
                y = peft_ops.lora_linear_multi(x, weight, As, Bs, [2.0, 1.0, 0.5], idx, magnitude=mags, dropout=p,
                                               training=train)
                if train:
                    y.backward(torch.randn(y.shape, generator=gen).to(y.dtype))
        jobs.append((label, thunk))

    mixed_dtypes = [torch.bfloat16, torch.float32] if not quick else [torch.bfloat16]
    for dtype in mixed_dtypes:
        built = {name: make(dtype) for name, make in weights.items()}
        for name, weight in built.items():
            for dora in (False, True):
                op = "mixed " + ("q" if name == "nf4" else "") + ("dora" if dora else "lora")
                for M in ((1, 16, 512) if dtype == torch.bfloat16 else (16, 48)):
                    train = M > 16
                    for p in ((0.0, 0.05) if train and dtype == torch.bfloat16 else (0.0,)):
                        multi(f"{op} {str(dtype)[6:]} M={M} p={p}", weight, dtype, M, dora, p, train)
    multi("mixed qdora bf16 N=4096 M=16 p=0.0", wide, torch.bfloat16, 16, True, 0.0, False)   # its shrink in the decode
    return jobs


def record(quick=False):
    """Run the workload under `recording()`; returns the distinct launches."""
    jobs = workload(quick)   # weights are quantized here, for real, before recording starts
    with recording() as rec:
        for label, thunk in jobs:
            rec.where = label
            thunk()
    return list(rec.launches.values())


# ----------------------------------------------------------------------------------------------
# lowering and reading the cubin
# ----------------------------------------------------------------------------------------------

def compile_sass(job, ptxas_log=True):
    """Compile one launch `job` (`Launch.job()`) for sm_90; returns the facts read from the cubin, and its SASS under "sass".

    With `ptxas_log` the spill count comes from ptxas' own report, which it prints only when it
    runs, so Triton's cache is bypassed; without, a cached compile is reused and the whole stack
    frame counts as spill (an upper bound)."""
    import importlib
    import io
    from triton import knobs

    from triton.compiler import make_backend

    kernel_module, kernel_name, signature, constexprs, options, attrs = job
    kernel = getattr(importlib.import_module(kernel_module), kernel_name)
    params = [p.name for p in kernel.params]
    backend = make_backend(HOPPER)
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(params.index(k),): v for k, v in constexprs.items()},
                    attrs={(params.index(k),): backend.parse_attr(v) for k, v in attrs.items()})
    opts = dict(options)
    opts.setdefault("num_warps", 4)
    opts.setdefault("num_stages", 3)
    # ptxas' report separates spills from the stack frame a call (an IEEE divide) needs.
    knobs.nvidia.dump_ptxas_log = ptxas_log
    knobs.compilation.always_compile = ptxas_log
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=HOPPER, options=opts)
    seconds = time.perf_counter() - t0
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    stack = int(m.group(2))
    spill = int(spills.group(2)) + int(spills.group(3)) if spills else stack
    return dict(registers=int(m.group(1)), spill_bytes=spill, stack_bytes=stack,
                shared_bytes=compiled.metadata.shared, **_chain_facts(sass),
                hgmma=len(re.findall(r"\bHGMMA\b", sass)), hmma=len(re.findall(r"\bHMMA\b", sass)),
                instructions=len(re.findall(r"/\*[0-9a-f]{4,}\*/", sass)), compile_s=round(seconds, 1),
                sass=sass)


# global-memory instructions (loads, stores, atomics, copy-engine transfers); shared and constant
# memory are the block's own and the launch's arguments
_GLOBAL_MEMORY = {"LD", "LDG", "ST", "STG", "ATOM", "ATOMG", "RED", "LDGSTS", "UBLKCP", "UTMALDG", "UTMASTG",
                  "UTMAPF", "UTMAREDG"}


def _chain_facts(text):
    """What a chained launch needs of its code (`kernels._config.pdl_chain`): whether it waits for
    the launch before it (`griddepcontrol.wait`, SASS ACQBULK), how many global-memory
    instructions come before that wait (none may), and whether it lets the next launch start
    (`griddepcontrol.launch_dependents`, PREEXIT)."""
    ops = [i.opcode.split(".")[0] for ins in _sass.parse(text).values() for i in ins]
    wait = ops.index("ACQBULK") if "ACQBULK" in ops else None
    return dict(waits=wait is not None,
                memory_before_wait=sum(op in _GLOBAL_MEMORY for op in ops[:wait]) if wait is not None else -1,
                launches_dependents="PREEXIT" in ops)


def _lower(job):
    facts = compile_sass(job)
    del facts["sass"]
    return facts


def lower(launches, workers=2):
    """Compile each launch for sm_90; returns one dict a launch (label, where, count, and the
    facts read from its cubin)."""
    jobs = [launch.job() for launch in launches]
    with ProcessPoolExecutor(workers) as ex:
        facts = list(ex.map(_lower, jobs))
    rows = []
    for launch, fact in zip(launches, facts):
        rows.append(dict(kernel=launch.kernel.__name__, config=launch.label(), first_seen_in=launch.where,
                         launches=launch.count, fp32=_is_fp32(launch), chained=bool(launch.options.get("launch_pdl")),
                         **fact, **verdict(launch, fact)))
    return rows


def _is_fp32(launch):
    """True for a launch on fp32 activations (an fp32 GEMM, or a rank kernel reading fp32 x/dy)."""
    if launch.constexprs.get("DOT_DTYPE") == tl.float32 or launch.constexprs.get("RANK_PRECISION") == "ieee":
        return True   # an fp32 GEMM, or an epilogue whose rank products are fp32 FMA dots
    # the rank reductions pair an activation-dtype operand with an fp32 one (gb, xa)
    operands = [launch.signature[name] for name in ("x_ptr", "l_ptr", "r_ptr") if name in launch.signature]
    return bool(operands) and all(t == "*fp32" for t in operands)


def _is_16bit_gemm(launch):
    return launch.constexprs.get("DOT_DTYPE") in (tl.bfloat16, tl.float16)


def verdict(launch, fact):
    """'ok' or the bound a launch breaks (spills, shared memory, a 16-bit GEMM off tensor cores)."""
    problems = []
    spill_bound = FP32_SPILL_BOUND if _is_fp32(launch) else 0
    if fact["spill_bytes"] > spill_bound:
        problems.append(f"spills {fact['spill_bytes']} B (bound {spill_bound})")
    if fact["shared_bytes"] > SMEM_LIMIT:
        problems.append(f"needs {fact['shared_bytes']} B of shared memory (sm_90 allows {SMEM_LIMIT})")
    if _is_16bit_gemm(launch) and fact["hgmma"] + fact["hmma"] == 0:
        problems.append("16-bit GEMM without tensor-core instructions")
    if launch.options.get("launch_pdl") and not (fact["waits"] and fact["memory_before_wait"] == 0):
        problems.append("chained launch touches global memory before it waits for the launch before it")
    return dict(verdict="ok" if not problems else "; ".join(problems))


FIELDS = ["kernel", "config", "first_seen_in", "launches", "fp32", "chained", "registers", "spill_bytes",
          "stack_bytes", "shared_bytes", "hgmma", "hmma", "waits", "memory_before_wait", "launches_dependents",
          "instructions", "compile_s", "verdict"]


def format_table(rows):
    lines = [f"{'kernel':28s} {'regs':>4s} {'spill':>5s} {'smem KiB':>8s} {'HGMMA':>5s} {'HMMA':>4s}  "
             f"first seen in / verdict"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["config"])):
        lines.append(f"{r['kernel']:28s} {r['registers']:4d} {r['spill_bytes']:5d} {r['shared_bytes'] / 1024:8.1f} "
                     f"{r['hgmma']:5d} {r['hmma']:4d}  {r['first_seen_in']} / {r['verdict']}")
    return "\n".join(lines)


def summary(rows):
    """A few lines on what the lowering found, for the bench summary."""
    bad = [r for r in rows if r["verdict"] != "ok"]
    gemms = [r for r in rows if r["kernel"] in ("_fused_linear_kernel", "_fused_linear_dx_kernel",
                                                   "_gemm_forward_kernel", "_gemm_dx_kernel", "_decode_linear_kernel")]
    gemm16 = [r for r in gemms if not r["fp32"]]
    lines = [f"sm_90 lowering (compile-time facts, no kernel ran): {len(rows)} distinct launches of "
             f"{len({r['kernel'] for r in rows})} kernels; most registers {max(r['registers'] for r in rows)} a thread, "
             f"most spilled {max([r['spill_bytes'] for r in rows if not r['fp32']] or [0])} B on 16-bit "
             f"activations and {max([r['spill_bytes'] for r in rows if r['fp32']] or [0])} B on fp32 ones, "
             f"most shared memory {max(r['shared_bytes'] for r in rows) / 1024:.0f} of {SMEM_LIMIT // 1024} KiB; "
             f"16-bit GEMM launches on tensor cores: {sum(r['hgmma'] > 0 for r in gemm16)} on HGMMA and "
             f"{sum(r['hgmma'] == 0 and r['hmma'] > 0 for r in gemm16)} on HMMA (M <= 16) of {len(gemm16)}; "
             f"{len(bad)} break a bound. Lowered with {toolchain()}."]
    lines += [f"  {r['config']} ({r['first_seen_in']}): {r['verdict']}" for r in bad]
    return "\n".join(lines)


def toolchain():
    """Which Triton and ptxas did the lowering: register allocation differs between them."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(HOPPER.arch)
    version = subprocess.run([ptxas.path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return f"triton {triton.__version__}, torch {torch.__version__}, ptxas {version[-1] if version else '?'}"


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows({k: r[k] for k in FIELDS} for r in rows)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.lowering", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder for lowering.csv (default: print only)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and dtypes")
    a = ap.parse_args(argv)
    why = available()
    if why:
        print(f"python -m bench.lowering: {why}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    launches = record(a.quick)
    rows = lower(launches)
    text = (f"{format_table(rows)}\n\n{summary(rows)}\n(lowered in {time.perf_counter() - t0:.0f} s "
            f"on {time.strftime('%Y-%m-%d')})")
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        write_csv(os.path.join(a.out, "lowering.csv"), rows)
        with open(os.path.join(a.out, "summary.txt"), "w") as f:
            f.write(text + "\n")
    return 1 if any(r["verdict"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
