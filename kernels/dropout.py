"""Dropout without stored masks: the keep decision for element (m, k) of the LoRA input is
`tl.rand(seed, m * K + k) >= p`, so forward and backward regenerate the same mask from one seed.

`peft_ops.ops.dropout_scale` has a PyTorch twin of the same Philox stream, so CPU, interpreter
and GPU draw identical masks for the same seed.
"""

import torch
import triton
import triton.language as tl



@triton.jit
def dropout_scale(seed, idx, p, inv_keep):
    """keep/(1-p) for the elements at logical flat indices `idx` (int64) of the LoRA input."""
    return tl.where(tl.rand(seed, idx) >= p, inv_keep, 0.0)


@triton.jit
def round_to(v, ROUND: tl.constexpr, BITWISE_BF16: tl.constexpr):
    """Round fp32 `v` to bf16 (ROUND=1) or fp16 (ROUND=2) and back; ROUND=0 leaves it.

    The interpreter truncates fp32 -> bf16 casts (SPEC §5), so there bf16 rounding to nearest
    even is done on the bits (exact for finite values).
    """
    if ROUND == 1:
        if BITWISE_BF16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
        else:
            v = v.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _dropout_scale_kernel(out_ptr, seed, numel, p, inv_keep, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + idx, dropout_scale(seed, idx, p, inv_keep), mask=idx < numel)


def dropout_scale_tensor(seed: int, shape, p: float, device) -> torch.Tensor:
    """The fp32 tensor keep/(1-p) the kernels use for a LoRA input of `shape` (for tests and
    references; the fused kernels never materialise it)."""
    numel = 1
    for s in shape:
        numel *= s
    out = torch.empty(shape, dtype=torch.float32, device=device)
    BLOCK = 1024
    _dropout_scale_kernel[(triton.cdiv(numel, BLOCK),)](out, seed, numel, p, 1.0 / (1.0 - p), BLOCK=BLOCK,
                                                        enable_fp_fusion=False)
    return out
