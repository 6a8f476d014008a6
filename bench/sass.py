"""Reading sm_90 SASS without a GPU: instructions, the loops they form, and the SM resources each
instruction takes.

`cuobjdump -sass` prints one instruction a line, ``/*addr*/  [@P] OPCODE operands ;``. A loop is a
backward branch: a ``BRA`` whose target address is at or before its own; its body is every
instruction from the target to the branch. Loops nest by address range. Only this structure is
read here; how many times each loop runs is a fact of the launch (its arguments and grid), which
`bench.model` supplies.

Each instruction is put in one execution class with a per-SM throughput (lanes a clock). The
figures are the CUDA C++ Programming Guide's arithmetic-instruction throughput table for compute
capability 9.0 where it has one, and assumptions (said so) where it has not:

    fma     FFMA / FMUL / FADD / HFMA2 / FSEL ...   128 lanes a clock (4 warp-instructions)
    imad    IMAD (integer multiply-add)              64 (2)
    alu     integer, logic, shift, compare, select,
            byte permute, packed float->16-bit
            conversion (F2FP)                        64 (2)
    xu      MUFU, F2F / I2F / F2I conversions        16 (0.5)
    shfl    SHFL                                      32 (1)
    lsu     loads, stores, atomics (global, shared,
            local; one instruction a clock an SM,
            an assumption) and their bytes at the
            L1 / shared memory's 128 B a clock        32 (1)
    tensor  HGMMA / HMMA: timed by their FLOPs (bench.model), issue slot only here
    uniform U* (the uniform datapath), control (BRA, BAR, EXIT, ...), other: issue slot only

Every warp-instruction also takes one issue slot of its scheduler (4 schedulers an SM).
"""

import re
from collections import Counter
from dataclasses import dataclass, field

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)", re.M)
_TARGET = re.compile(r"0x([0-9a-f]+)")

# lanes an SM completes a clock, per execution class (see the module docstring)
LANES = {"fma": 128, "imad": 64, "alu": 64, "xu": 16, "shfl": 32, "lsu": 32}
SHARED_BYTES_PER_CLOCK = 128

_FMA = ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSET", "FSETP", "HFMA2", "HMUL2", "HADD2", "HSET2",
        "HSETP2", "HMNMX2", "FCHK", "FSWZADD", "DFMA", "DADD", "DMUL")
_ALU = ("IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "LEA", "ISETP", "ISCADD", "SEL", "PRMT",
        "IMNMX", "IABS", "POPC", "FLO", "BREV", "BMSK", "PLOP3", "P2R", "R2P", "VIADD", "VIMNMX",
        "IDP", "F2FP", "MOV", "CS2R", "S2R", "S2UR", "VOTE", "IMNMX", "I2IP", "BFE", "BFI", "SGXT",
        "LEPC", "ICMP")
_XU = ("MUFU", "F2F", "I2F", "F2I", "FRND", "I2I", "F2IP")
_LSU = ("LDG", "STG", "LDS", "STS", "LDL", "STL", "LD", "ST", "LDGSTS", "LDSM", "STSM", "ATOM", "ATOMS",
        "ATOMG", "RED", "REDG", "LDC", "LDGDEPBAR", "UBLKCP", "UTMALDG", "UTMASTG", "UTMAPF", "SYNCS",
        "LDTRAM", "MATCH", "REDUX", "CCTL")
_TENSOR = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA", "DMMA", "HMNMX")
_MMA = re.compile(r"^(HGMMA|HMMA|QGMMA|IGMMA)\.(\d+)x?(\d+)?x?(\d+)?\.?")


@dataclass(frozen=True)
class Instruction:
    index: int
    address: int
    predicate: str
    opcode: str            # with modifiers, e.g. "HGMMA.64x128x16.F32.BF16"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def klass(self) -> str:
        return execution_class(self.opcode)


def execution_class(opcode: str) -> str:
    base = opcode.split(".")[0]
    if base in _TENSOR:
        return "tensor"
    if base == "SHFL":
        return "shfl"
    if base == "IMAD":
        return "imad"
    if base in _LSU:
        return "lsu"
    if base.startswith("U") and base not in ("UBLKCP", "UTMALDG", "UTMASTG", "UTMAPF"):
        return "uniform"
    if base in _FMA:
        return "fma"
    if base in _XU:
        return "xu"
    if base in _ALU:
        return "alu"
    if base in ("BRA", "BRX", "JMP", "CALL", "RET", "EXIT", "BAR", "BSSY", "BSYNC", "WARPSYNC", "NOP",
                "YIELD", "DEPBAR", "WARPGROUP", "MEMBAR", "FENCE", "ERRBAR", "BPT", "ELECT", "ACQBULK",
                "NANOSLEEP", "KILL", "BMOV", "PREEXIT", "ENDCOLLECTIVE", "ACQSHMINIT", "WARPGROUPSET"):
        return "control"
    return "other"


def memory_bytes(instr: Instruction) -> int:
    """Bytes a lane moves for a load or store (width modifier .64 / .128, else 4), 0 otherwise."""
    if instr.klass != "lsu":
        return 0
    mods = instr.opcode.split(".")[1:]
    for width, size in (("128", 16), ("64", 8), ("U8", 1), ("S8", 1), ("U16", 2), ("S16", 2)):
        if width in mods:
            return size
    return 4


def mma_flops(opcode: str):
    """(FLOPs one warp's instruction contributes, operand type) for an MMA opcode, else None.

    HGMMA is a warpgroup instruction (its m x n x k is shared by the group's 4 warps, each of
    which issues it); HMMA.16816 is one warp's 16 x 8 x 16."""
    m = _MMA.match(opcode)
    if not m:
        return None
    kind, a, b, c = m.groups()
    mods = opcode.split(".")
    operand = next((t for t in ("BF16", "F16", "TF32", "E4M3", "E5M2", "S8") if t in mods), "F16")
    if kind == "HMMA":
        digits = a
        if len(digits) == 5:        # 16816 -> 16 x 8 x 16
            mm, nn, kk = int(digits[:2]), int(digits[2]), int(digits[3:])
        elif len(digits) == 4:      # 1688 -> 16 x 8 x 8
            mm, nn, kk = int(digits[:2]), int(digits[2]), int(digits[3])
        else:
            return None
        return 2 * mm * nn * kk, operand
    shape = re.match(r"^[A-Z]+\.(\d+)x(\d+)x(\d+)", opcode)
    if not shape:
        return None
    mm, nn, kk = map(int, shape.groups())
    return 2 * mm * nn * kk // 4, operand


def parse(sass: str) -> dict:
    """{function name: [Instruction]} from `cuobjdump -sass` output."""
    functions = {}
    starts = [(m.start(), m.group(1)) for m in _FUNCTION.finditer(sass)]
    for i, (pos, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(sass)
        instrs = []
        for m in _LINE.finditer(sass, pos, end):
            pred = (m.group(2) or "").strip()
            instrs.append(Instruction(len(instrs), int(m.group(1), 16), pred, m.group(3), m.group(4).strip()))
        functions[name] = instrs
    return functions


@dataclass
class Loop:
    """Instructions first..last (indices, inclusive); the last is the backward branch."""
    first: int
    last: int
    children: list = field(default_factory=list)
    own: Counter = field(default_factory=Counter)       # execution class -> count, children excluded
    own_mma: list = field(default_factory=list)         # MMA opcodes in the body, children excluded
    own_bytes: int = 0                                  # bytes a lane moves in the body, children excluded

    @property
    def size(self) -> int:
        """Instructions in the body, children included (what one trip issues, children once)."""
        return self.last - self.first + 1

    @property
    def own_size(self) -> int:
        return sum(self.own.values())

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()


def find_loops(instrs) -> list:
    """The loop forest of a function: top-level loops in address order, each with its children.

    Not loops: a branch to itself (the trap after EXIT that ends every function); the out-of-line
    slow paths ptxas puts after the last EXIT, whose branches lead back into the code they left
    (a barrier wait that retries); and a wait that spins on one instruction (`SYNCS ... TRYWAIT`
    branching back to itself)."""
    by_address = {ins.address: ins.index for ins in instrs}
    exits = [ins.index for ins in instrs if ins.base == "EXIT"]
    end = exits[-1] if exits else len(instrs)
    spans = []
    for ins in instrs:
        if ins.base != "BRA" or ins.index > end:
            continue
        t = _TARGET.search(ins.operands)
        if not t:
            continue
        target = int(t.group(1), 16)
        if target < ins.address and target in by_address:
            first = by_address[target]
            body = instrs[first:ins.index]
            if len(body) <= 2 and any(b.base == "SYNCS" for b in body):
                continue
            spans.append((first, ins.index))
    # Several back edges to one header are one loop (its widest span).
    widest = {}
    for first, last in spans:
        widest[first] = max(widest.get(first, last), last)
    loops = sorted((Loop(f, l) for f, l in widest.items()), key=lambda lp: (lp.first, -lp.last))
    roots, stack = [], []
    for lp in loops:
        while stack and not (stack[-1].first <= lp.first and lp.last <= stack[-1].last):
            stack.pop()
        (stack[-1].children if stack else roots).append(lp)
        stack.append(lp)
    for root in roots:
        _fill(root, instrs)
    return roots


def _fill(loop: Loop, instrs):
    inner = set()
    for c in loop.children:
        _fill(c, instrs)
        inner.update(range(c.first, c.last + 1))
    for i in range(loop.first, loop.last + 1):
        if i in inner:
            continue
        ins = instrs[i]
        loop.own[ins.klass] += 1
        loop.own_bytes += memory_bytes(ins)
        if ins.klass == "tensor":
            loop.own_mma.append(ins.opcode)


def outside(instrs, roots):
    """(Counter of execution classes, MMA opcodes, lane bytes) of the instructions in no loop."""
    inside = set()
    for r in roots:
        inside.update(range(r.first, r.last + 1))
    mix, mma, nbytes = Counter(), [], 0
    for ins in instrs:
        if ins.index in inside:
            continue
        mix[ins.klass] += 1
        nbytes += memory_bytes(ins)
        if ins.klass == "tensor":
            mma.append(ins.opcode)
    return mix, mma, nbytes
