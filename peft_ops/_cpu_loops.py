"""The CPU path's native loops: `csrc/cpu_loops.c`, built at first use with this machine's C compiler.

Two loops of the CPU twins are elementwise chains that PyTorch can run only as separate passes
over memory: the dropout keep mask (Philox4x32-10 in int64 arithmetic, about a hundred passes a
counter) and the NF4 decode (a gather, a multiply, a cast). Compiled, each is one pass. They
compute what the twins compute, bit for bit (tests hold them to it), and the twins stay the
reference and the fallback.

Built like Triton builds its own launchers: the system C compiler (`$CC`, else `cc`, `gcc` or
`clang`), here with `-O3 -march=native`, so the loops use the vector instructions of the CPU they
run on, read at run time; the library is cached per source, compiler and CPU under
`$PEFT_OPS_CACHE_DIR` (default `~/.cache/peft_ops`; the temp folder where that cannot be written). Called through ctypes, which releases the
GIL, in pieces of rows that up to `torch.get_num_threads()` threads take in turn.

`PEFT_OPS_CPU_LOOPS` picks: `auto` (the default) uses the native loops when they build and warns
once, naming why, when they do not; `native` raises instead; `torch` always runs the PyTorch passes.
"""

import concurrent.futures
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import torch

CHOICES = ("auto", "native", "torch")
# (stored as, rounded to) pairs the decode writes: fp32, fp32 holding bf16 values, bf16
DECODES = ((torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16))
SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "cpu_loops.c")
_FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC")
# Threads take a loop's pieces in turn. A piece holds at least this many elements (below it,
# handing a piece to another thread costs more than it saves), and there are at most this many
# pieces a thread: each costs a lock, a ctypes call and a wake-up (a 1024 x 1024 decode in 32
# pieces on two threads took 1.0 ms, in 8 pieces 0.53, on one thread 0.64, on the 2-core EPYC),
# and a few a thread still let a thread that gets the CPU late take fewer.
MIN_ELEMENTS_A_PIECE = 1 << 16
PIECES_A_THREAD = 4


class BuildError(RuntimeError):
    """The native loops could not be built or loaded (no compiler, a failed compile, ...)."""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def choice() -> str:
    """`PEFT_OPS_CPU_LOOPS`, checked."""
    value = os.environ.get("PEFT_OPS_CPU_LOOPS", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"PEFT_OPS_CPU_LOOPS: expected one of {CHOICES}, got {value!r}")
    return value


def find_compiler():
    """The C compiler the loops are built with: `$CC`, else `cc`, `gcc` or `clang` on PATH (a
    path), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def _compiler() -> str:
    found = find_compiler()
    if found is None:
        raise BuildError("no C compiler found ($CC, cc, gcc, clang)")
    return found


def _cache_dirs() -> list:
    """Where the library is cached: `$PEFT_OPS_CACHE_DIR`, else the user's cache folder, and the
    temp folder after either (a read-only home must not cost the native loops)."""
    root = os.environ.get("PEFT_OPS_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "peft_ops")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return [root, os.path.join(tempfile.gettempdir(), f"peft_ops-{uid}")]


def _compile(cc, flags, path):
    """Compile SOURCE to `path` (written whole: processes building at once each publish a complete
    file). Returns the compiler's error, or None."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, SOURCE, "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode:
            return done.stderr.strip()[-400:] or f"exit status {done.returncode}"
        os.replace(tmp, path)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(archs=(("-march=native",), ())) -> tuple:
    """(library, description): compiled and loaded, or BuildError. `archs`: the target flags to try
    in turn (tests build the portable variant, with none, to check the loops without vectors)."""
    cc = _compiler()
    with open(SOURCE, "rb") as f:
        source = f.read()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{cc} --version failed: {e}") from e
    errors = []
    # -march=native first; a compiler that lacks it (or a CPU it does not know) builds portable code
    for arch in archs:
        flags = _FLAGS + arch
        key = hashlib.sha256(b"\0".join([source, cc.encode(), version, " ".join(flags).encode(),
                                          platform.machine().encode(),
                                          " ".join(sorted(cpu_flags())).encode()])).hexdigest()[:20]
        name = f"cpu_loops-{key}.so"
        path = next((os.path.join(d, name) for d in _cache_dirs() if os.path.exists(os.path.join(d, name))), None)
        if path is None:
            failure = None
            for directory in _cache_dirs():
                path = os.path.join(directory, name)
                try:
                    failure = _compile(cc, flags, path)
                    break   # compiled, or the compiler refused: another folder would not help
                except (OSError, subprocess.SubprocessError) as e:
                    failure, path = f"{directory}: {e}", None
            if failure is not None or path is None:
                errors.append(f"{' '.join(flags)}: {failure}")
                continue
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            errors.append(f"loading {os.path.basename(path)}: {e}")
            continue
        lib.peft_ops_dropout_keep.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int64, ctypes.c_int64,
                                              ctypes.c_int64, ctypes.c_uint32, ctypes.c_void_p]
        lib.peft_ops_dropout_keep.restype = None
        decode_args = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64]
        lib.peft_ops_nf4_decode_f32.argtypes = decode_args + [ctypes.c_int, ctypes.c_void_p]
        lib.peft_ops_nf4_decode_bf16.argtypes = decode_args + [ctypes.c_void_p]
        lib.peft_ops_nf4_decode_f32.restype = lib.peft_ops_nf4_decode_bf16.restype = None
        return lib, f"{os.path.basename(cc)} {' '.join(flags[:1] + arch)}"
    raise BuildError(f"{os.path.basename(cc)} failed: " + "; ".join(errors))


_state = {}   # "lib" and "description" once built, or "reason" once it failed
_build_lock = threading.Lock()


def _library():
    """The loaded library, or None where the PyTorch passes run (warned once, with the reason)."""
    mode = choice()
    if mode == "torch":
        return None
    if not _state:
        with _build_lock:   # (threads calling at once build once)
            if not _state:
                try:
                    lib, description = _build()
                    _state.update(lib=lib, description=description)
                except BuildError as e:
                    _state["reason"] = str(e)
    if "lib" in _state:
        return _state["lib"]
    if mode == "native":
        raise RuntimeError(f"PEFT_OPS_CPU_LOOPS=native, but the native CPU loops did not build: {_state['reason']}")
    if not _state.get("warned"):
        _state["warned"] = True
        warnings.warn("peft_ops: the CPU path's native loops did not build, so its dropout masks and NF4 decode "
                      f"run as PyTorch passes, several times slower: {_state['reason']} "
                      "(PEFT_OPS_CPU_LOOPS=torch chooses that and silences this)", stacklevel=4)
    return None


def describe() -> str:
    """What the CPU path's loops run as, for the bench: `native (<compiler> <flags>)` or `torch (<why>)`."""
    try:
        lib = _library()
    except RuntimeError as e:
        return f"error ({e})"
    if lib is not None:
        return f"native ({_state['description']})"
    return "torch (PEFT_OPS_CPU_LOOPS=torch)" if choice() == "torch" else f"torch (fallback: {_state['reason']})"


def available() -> bool:
    """True when the native loops run (built here, not switched off)."""
    return _library() is not None


_pools = {}


def _pool():
    """This process's worker threads (a forked child, e.g. a DataLoader worker, makes its own: the
    parent's threads do not exist there)."""
    pid = os.getpid()
    if pid not in _pools:
        _pools.clear()
        _pools[pid] = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) - 1),
                                                            thread_name_prefix="peft_ops_cpu")
    return _pools[pid]


def _split(count: int, per_item: int) -> list:
    """[(lo, hi)] pieces of `count` items (rows, blocks) of `per_item` elements each: one on one
    thread; else up to PIECES_A_THREAD a thread, of at least MIN_ELEMENTS_A_PIECE elements."""
    threads = torch.get_num_threads()
    cap = 1 if threads == 1 else PIECES_A_THREAD * threads
    pieces = max(1, min(count, count * per_item // MIN_ELEMENTS_A_PIECE, cap))
    edges = [count * t // pieces for t in range(pieces + 1)]
    return [(lo, hi) for lo, hi in zip(edges, edges[1:]) if hi > lo]


def _run(calls):
    """Run the zero-argument callables (the pieces of one loop) on this thread and up to
    `torch.get_num_threads() - 1` pool threads, each taking the next piece until none is left.
    Returns once every piece is done, without waiting for a helper that has not started: on a
    machine whose other cores are busy, this thread then does all the work itself."""
    helpers = min(torch.get_num_threads(), len(calls)) - 1
    if helpers <= 0:
        for c in calls:
            c()
        return
    pieces = iter(calls)
    lock, finished = threading.Lock(), threading.Condition()
    state = {"done": 0, "error": None}

    def work():
        while True:
            with lock:
                call = next(pieces, None)
            if call is None:
                return
            try:
                call()
            except BaseException as e:   # (re-raised on the calling thread)
                state["error"] = e
            with finished:
                state["done"] += 1
                finished.notify_all()

    for _ in range(helpers):
        _pool().submit(work)
    work()
    with finished:
        finished.wait_for(lambda: state["done"] == len(calls))
    if state["error"] is not None:
        raise state["error"]


def dropout_keep(seed: int, M: int, K: int, threshold: int) -> torch.Tensor:
    """bool [M, K] on the CPU: `peft_ops.ops.dropout_keep`'s mask of an [M, K] input."""
    lib = _library()
    out = torch.empty((M, K), dtype=torch.bool)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    base = out.data_ptr()
    _run([functools.partial(lib.peft_ops_dropout_keep, k0, k1, lo, hi, K, threshold, base + lo * K)
          for lo, hi in _split(M, K)])
    return out


def nf4_decode(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
               start: int, stop: int, out: torch.Tensor, rounded_to: torch.dtype = None) -> torch.Tensor:
    """Elements [start, stop) of an NF4 weight into `out` (contiguous, fp32 or bf16, stop - start
    elements): code[nibble] * absmax[block] in fp32, rounded once to bf16 when `out` is bf16 or
    `rounded_to` is bf16 (an fp32 `out` then holds the bf16 values exactly). `start` is a block's
    first element; `packed` (uint8), `absmax` and `code` (fp32) are contiguous CPU tensors."""
    lib = _library()
    rounded_to = out.dtype if rounded_to is None else rounded_to
    if start % blocksize or not out.is_contiguous() or out.numel() != stop - start or \
            (out.dtype, rounded_to) not in DECODES:
        raise ValueError("nf4_decode: start on a block; out contiguous, stop - start elements, fp32 (rounded "
                         "to fp32 or bf16) or bf16")
    # (the fp32 loop takes one more argument before `out`: whether to round to bf16)
    decode, extra = ((lib.peft_ops_nf4_decode_bf16, ()) if out.dtype == torch.bfloat16 else
                     (lib.peft_ops_nf4_decode_f32, (int(rounded_to == torch.bfloat16),)))
    item = out.element_size()
    blocks = -(-(stop - start) // blocksize)
    calls = []
    for lo, hi in _split(blocks, blocksize):
        e0, e1 = start + lo * blocksize, min(stop, start + hi * blocksize)
        calls.append(functools.partial(decode, packed.data_ptr(), absmax.data_ptr(), code.data_ptr(),
                                       blocksize, e0, e1, *extra, out.data_ptr() + (e0 - start) * item))
    _run(calls)
    return out


if __name__ == "__main__":   # `python -m peft_ops._cpu_loops`: build now and say what runs
    print(describe())
    sys.exit(0 if available() else 1)
