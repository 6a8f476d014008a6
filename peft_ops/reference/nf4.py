"""NF4 quantization and dequantization written out step by step (SPEC §2).

Slow and plain on purpose: one block at a time, one rule per line. The fast paths (the Triton
kernels and the PyTorch twin in ``peft_ops.nf4``) must agree with this bit for bit.

``nf4_quantize`` returns a namespace with the same attribute names as ``peft_ops.NF4Weight``,
and ``nf4_dequantize`` reads any object with those attributes (an ``NF4Weight`` included).
"""

from types import SimpleNamespace

import torch

from ..kernels.nf4 import NF4_CODE
from ..nf4 import dynamic_map

NESTED_BLOCKSIZE = 256


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) / 2


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted `code`: the number of fp32 midpoints strictly
    below each value, so a value exactly on a midpoint takes the lower code."""
    return (scaled[:, None] > _midpoints(code)[None, :]).sum(dim=1)


def _quantize_blocks(flat: torch.Tensor, blocksize: int, code: torch.Tensor,
                     clamp_partial_absmax: bool):
    """Blockwise absmax quantization of the fp32 vector `flat` against `code`.

    A full block is scaled by the reciprocal, x * (1 / absmax); the partial last block by
    division, x / absmax, as bitsandbytes does. Scaling uses max(absmax, 1e-38), so an all-zero
    block scales to zeros. `clamp_partial_absmax` also stores that clamped value for the partial
    block (bitsandbytes' 4-bit quantizer does; its nested 8-bit one does not).
    """
    codes, absmax = [], []
    for start in range(0, flat.numel(), blocksize):
        block = flat[start:start + blocksize]
        block_absmax = block.abs().max()
        safe_absmax = block_absmax.clamp(min=1e-38)
        if block.numel() == blocksize:
            scaled = block * (1.0 / safe_absmax)
        else:
            scaled = block / safe_absmax
            if clamp_partial_absmax:
                block_absmax = safe_absmax
        codes.append(_nearest(scaled.clamp(-1.0, 1.0), code))
        absmax.append(block_absmax)
    return torch.cat(codes), torch.stack(absmax)


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    """Quantize a 2-D float `weight` to NF4; returns a namespace shaped like ``NF4Weight``."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    flat = weight.detach().cpu().reshape(-1).float()

    # 1-3. absmax per block, scale into [-1, 1], nearest NF4 value.
    codes, absmax = _quantize_blocks(flat, blocksize, code, clamp_partial_absmax=True)

    # 4. Pack two codes a byte, the even element in the high nibble; an odd count pads with 7
    #    (the code of 0.0).
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.tensor([7])])
    packed = (codes[0::2] * 16 + codes[1::2]).to(torch.uint8)

    out = SimpleNamespace(
        packed=packed, absmax=absmax, code=code, shape=torch.Size(weight.shape),
        dtype=weight.dtype, blocksize=blocksize, double_quant=double_quant,
        nested_absmax=None, nested_code=None, offset=None, nested_blocksize=NESTED_BLOCKSIZE,
    )
    if double_quant:
        # 5. Double quantization: centre absmax on its mean, quantize blocks of 256 against the
        #    signed 8-bit dynamic map.
        offset = absmax.mean()
        nested_code = dynamic_map()
        q, nested_absmax = _quantize_blocks(absmax - offset, NESTED_BLOCKSIZE, nested_code,
                                            clamp_partial_absmax=False)
        out.absmax = q.to(torch.uint8)
        out.nested_absmax = nested_absmax
        out.nested_code = nested_code
        out.offset = offset.item()
    return out


def nf4_dequantize(w, dtype: torch.dtype = None) -> torch.Tensor:
    """Dense tensor of shape `w.shape` in `dtype` (default `w.dtype`) from any NF4Weight-like `w`."""
    dtype = w.dtype if dtype is None else dtype
    numel = w.shape[0] * w.shape[1]
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    packed = w.packed.cpu().reshape(-1).long()

    # Per-block scale in fp32; with double quantization two roundings, multiply then add.
    if w.double_quant:
        q = w.absmax.cpu().long()
        block = torch.arange(q.numel())
        nested = w.nested_absmax.cpu()[block // w.nested_blocksize]
        offset = torch.tensor(w.offset, dtype=torch.float32)
        absmax = (w.nested_code.cpu()[q] * nested) + offset
    else:
        absmax = w.absmax.cpu().float()

    element = torch.arange(numel)
    nibble = torch.where(element % 2 == 0, packed[element // 2] // 16, packed[element // 2] % 16)
    values = code[nibble] * absmax[element // w.blocksize]
    return values.reshape(w.shape).to(dtype)
