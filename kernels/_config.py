"""Launch-time facts shared by the launchers."""

import os

import torch
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_dtype(dtype: torch.dtype):
    """Operand dtype for `tl.dot` given the activation dtype.

    On a GPU bf16/fp16 operands go to the tensor cores; the interpreter computes bf16 dots
    wrongly (SPEC §5), so there every dot runs in fp32.
    """
    if interpreting() or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype a kernel writes its output in; the interpreter truncates fp32->16-bit casts, so
    there kernels write fp32 and torch rounds afterwards."""
    return torch.float32 if interpreting() else dtype
