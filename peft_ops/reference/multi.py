"""Mixed-adapter batches as plain PyTorch: each row computed by `reference.lora_linear` with its own
adapter (or as the base layer alone), which is what PEFT's `adapter_names=` batch does one
sub-batch at a time."""

import torch
import torch.nn.functional as F

from .lora import dense_weight, lora_linear


def lora_linear_multi(x, weight, lora_As, lora_Bs, scalings, adapter_index, *, bias=None, magnitudes=None,
                      dropout_scale=None, compute_dtype=torch.float64):
    """Row m of x.reshape(-1, K) uses adapter ``adapter_index[m]`` (a flat integer tensor; -1: the
    base layer alone, ``x Wᵀ + bias``). `magnitudes`: None or one entry per adapter (None for a
    LoRA adapter); `dropout_scale`: None or keep/(1-p) shaped like x. Returns ``[..., N]`` in x's
    dtype; differentiable in x, bias and every adapter tensor."""
    K = x.shape[-1]
    N = lora_Bs[0].shape[0]
    x2 = x.reshape(-1, K)
    d2 = None if dropout_scale is None else dropout_scale.reshape(-1, K)
    idx = torch.as_tensor(adapter_index).reshape(-1).to(x.device)
    magnitudes = magnitudes if magnitudes is not None else [None] * len(lora_As)
    out = torch.zeros(x2.shape[0], N, dtype=x.dtype, device=x.device)
    for e in torch.unique(idx).tolist():
        rows = (idx == e).nonzero().squeeze(1)
        if 0 <= e < len(lora_As):
            y = lora_linear(x2[rows], weight, lora_As[e], lora_Bs[e], scalings[e], bias=bias,
                            magnitude=magnitudes[e], dropout_scale=None if d2 is None else d2[rows],
                            compute_dtype=compute_dtype)
        else:
            c = compute_dtype
            y = F.linear(x2[rows].to(c), dense_weight(weight, c, decode_dtype=x.dtype))
            y = (y if bias is None else y + bias.to(c)).to(x.dtype)
        out = out.index_put((rows,), y)
    return out.reshape(*x.shape[:-1], N)
