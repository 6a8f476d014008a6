"""Small Triton kernels of known loop structure for tests/test_model.py (not a test module).

`nested_then_flat`: a loop over `n` holding a loop over `m` that loads, then a second loop over
`n` of plain arithmetic. `decode_lean` / `decode_wasteful`: the same NF4-style decode loop, the
second one looking every code up twice and scaling it twice (the same result, more work).
"""

import triton
import triton.language as tl


@triton.jit
def nested_then_flat(x_ptr, out_ptr, n, m, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, n):
        for j in range(0, m):
            acc += tl.load(x_ptr + (i * m + j) * BLOCK + offs)
    for i in range(0, n):
        acc = acc * 0.5 + 1.0
    tl.store(out_ptr + tl.program_id(0) * BLOCK + offs, acc)


@triton.jit
def decode_lean(packed_ptr, code_ptr, scale_ptr, out_ptr, trips, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(0, trips):
        byte = tl.load(packed_ptr + (pid * trips + t) * BLOCK + offs).to(tl.int32)
        acc += tl.load(code_ptr + (byte & 0xF)) * tl.load(scale_ptr + pid * trips + t)
    tl.store(out_ptr + pid * BLOCK + offs, acc)


@triton.jit
def decode_wasteful(packed_ptr, code_ptr, scale_ptr, out_ptr, trips, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(0, trips):
        byte = tl.load(packed_ptr + (pid * trips + t) * BLOCK + offs).to(tl.int32)
        first = tl.load(code_ptr + (byte & 0xF)) * tl.load(scale_ptr + pid * trips + t)
        again = tl.load(code_ptr + 16 + (byte & 0xF)) * tl.load(scale_ptr + pid * trips + t)
        acc += 0.5 * first + 0.5 * again
    tl.store(out_ptr + pid * BLOCK + offs, acc)
