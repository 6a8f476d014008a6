"""LoRA and DoRA linear layers as plain PyTorch autograd code (SPEC §3).

Everything is computed in `compute_dtype` (fp64 by default, so the reference is the "true" value
the kernels are judged against) from the exact same inputs, then the output is cast back to
x's dtype; autograd gives the gradients, each cast back to its input's dtype.
"""

import torch
import torch.nn.functional as F

# DoRA divides by the row norm n = ||W + s·B A||; rows with n = 0 would give inf/NaN (as PEFT does).
# We divide by max(n, DORA_EPS) instead: with n = 0 the row of W + s·B A is zero, so its output
# is exactly bias and the magnitude gradient exactly 0, both finite.
DORA_EPS = 1e-12


def dense_weight(weight, dtype, decode_dtype=None):
    """`weight` (dense [N, K] tensor or NF4Weight) as a dense tensor of `dtype`. An NF4 weight is
    first decoded to `decode_dtype` (default: its original dtype), which is where its values
    are rounded: bitsandbytes' matmul decodes to the activation dtype, PEFT's DoRA norm uses the
    original dtype."""
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype)
    from .nf4 import nf4_dequantize

    return nf4_dequantize(weight, decode_dtype or weight.dtype).to(device=weight.packed.device, dtype=dtype)


def dora_row_norm(weight, lora_A, lora_B, scaling, compute_dtype=torch.float64):
    """n_j = ||W_j + s·(B A)_j||_2 per output row, detached (PEFT treats it as a constant)."""
    w = dense_weight(weight, compute_dtype)
    delta = lora_B.detach().to(compute_dtype) @ lora_A.detach().to(compute_dtype)
    return torch.linalg.vector_norm(w + scaling * delta, dim=1)


def lora_linear(x, weight, lora_A, lora_B, scaling, *, bias=None, magnitude=None,
                dropout_scale=None, compute_dtype=torch.float64):
    """Reference LoRA / DoRA linear.

    x: [..., K]; weight: dense [N, K] or NF4Weight (frozen); lora_A: [r, K]; lora_B: [N, r];
    bias: [N] or None; magnitude: [N] (DoRA) or None (LoRA).
    dropout_scale: None (no dropout / eval) or a tensor shaped like x holding keep/(1-p), i.e. the
    already-scaled dropout mask; x ⊙ dropout_scale is the LoRA input.

    LoRA:  y = x Wᵀ + bias + s·(drop(x) Aᵀ) Bᵀ
    DoRA:  no dropout  y = (m/n) ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias
           dropout     y = x Wᵀ + bias + (m/n − 1) ⊙ (drop(x) Wᵀ) + (m/n) ⊙ s·(drop(x) Aᵀ) Bᵀ
    """
    c = compute_dtype
    xc = x.to(c)
    w = dense_weight(weight, c, decode_dtype=x.dtype)
    a, b = lora_A.to(c), lora_B.to(c)
    xd = xc if dropout_scale is None else xc * dropout_scale.to(c)
    lora = F.linear(F.linear(xd, a), b) * scaling
    base = F.linear(xc, w)
    if magnitude is None:
        y = base + lora
    else:
        n = dora_row_norm(weight, lora_A, lora_B, scaling, c)
        mn = magnitude.to(c) / n.clamp_min(DORA_EPS)
        if dropout_scale is None:
            y = mn * (base + lora)
        else:
            y = base + (mn - 1) * F.linear(xd, w) + mn * lora
    if bias is not None:
        y = y + bias.to(c)
    return y.to(x.dtype)
