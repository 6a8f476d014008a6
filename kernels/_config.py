"""Launch-time facts and helpers shared by the launchers, and the launch chaining kernels start with."""

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


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


@functools.lru_cache(maxsize=None)
def _pdl_capable(device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def _pdl(device) -> bool:
    """Whether launches on `device` chain by programmatic dependent launch: a CUDA GPU of
    compute capability 9.0 or newer, not under the interpreter, unless PEFT_OPS_PDL=0."""
    if interpreting() or device.type != "cuda" or os.environ.get("PEFT_OPS_PDL", "1") == "0":
        return False
    return _pdl_capable(device)


def pdl_args(device) -> dict:
    """The launch arguments of a kernel that starts with `pdl_chain`: its PDL flag, and Triton's
    `launch_pdl` option when it is on (`_pdl`)."""
    return dict(PDL=True, launch_pdl=True) if _pdl(device) else dict(PDL=False)


@triton.jit
def pdl_chain(PDL: tl.constexpr):
    """The first thing a kernel does when launched by programmatic dependent launch (`pdl_args`):
    such a launch may start while the launch before it on the stream still runs, so wait until
    that one has ended and its writes are visible (from here on everything reads as after a plain
    launch), then let the launch after this one start the same way. What overlaps is launch
    latency and ramp-up (the next kernel's programs get resident while this one runs), never work."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
