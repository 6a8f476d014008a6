"""NF4Weight: a frozen weight stored as 4-bit NormalFloat, byte-compatible with bitsandbytes.

The storage layout, the dequantization arithmetic and the state-dict keys are bitsandbytes'
(SPEC §2), so a 4-bit checkpoint written by transformers / bitsandbytes loads here and ours
loads there. CUDA tensors (and any tensor under ``TRITON_INTERPRET=1``) run the Triton kernels
of ``peft_ops.kernels.nf4``; plain CPU tensors run the PyTorch twins below.

Double quantization's nested 8-bit step (quantizing the per-block absmax) runs in torch on every
backend: its offset is ``absmax.mean()``, and only torch's own reduction order reproduces
bitsandbytes' fp32 offset to the last bit (bitsandbytes calls the same ``mean``); the step
touches one value per 64 weights, so a kernel would buy nothing.
"""

import functools
import json
import math

import torch

from . import _cpu_loops
from .kernels import nf4 as _k
from .kernels._config import interpreting

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAMED_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__"


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    # Magnitudes 10^(e-6) * (means of an fp32 linspace(0.1, 1, 2^e + 1)) for e = 0..6, both
    # signs, plus 0 and 1: 256 values, built with bitsandbytes' fp32 arithmetic so they match
    # its `create_dynamic_map()` bit for bit.
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        magnitudes = (10 ** (e - 6)) * ((edges[:-1] + edges[1:]) / 2.0)
        values += magnitudes.tolist() + (-magnitudes).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted fp32 values), the code of the nested
    absmax. A fresh tensor each call: safetensors refuses tensors that share storage."""
    return _dynamic_map_cpu().to(device, copy=True)


def _nf4_code(device) -> torch.Tensor:
    return torch.tensor(_k.NF4_CODE, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=1)
def _nf4_code_cpu() -> torch.Tensor:
    return _nf4_code("cpu")   # (read by the native decode, never written)


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or interpreting()


# --- PyTorch twins (plain CPU tensors) ---------------------------------------------------------

def _quantize_torch(weight: torch.Tensor, blocksize: int):
    """Twin of ``kernels.nf4.nf4_quantize``: packed codes and fp32 absmax, same bytes."""
    flat = weight.reshape(-1).float()
    numel = flat.numel()
    full = numel - numel % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * absmax.clamp(min=1e-38).reciprocal()[:, None]).reshape(-1)
    if full < numel:
        # The partial last block: division, and its absmax stored clamped (as bitsandbytes).
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, flat[full:] / tail_absmax])
    midpoints = _k.nf4_midpoints(flat.device)
    codes = torch.bucketize(scaled.clamp(-1.0, 1.0), midpoints, out_int32=True).to(torch.uint8)
    if numel % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    return (codes[0::2] << 4) | codes[1::2], absmax


def _quantize_nested(absmax: torch.Tensor):
    """Double quantization of fp32 `absmax`: (uint8 codes, fp32 nested absmax, fp32 offset).

    Blocks of 256 centred values are scaled by x * (1 / max(nested_absmax, 1e-38)), clamped to
    [-1, 1] and given the nearest dynamic-map code by its fp32 midpoints, an exact midpoint
    taking the lower code (bitsandbytes' torch rule). bitsandbytes' CPU library looks codes up
    in a table that picks the farther neighbour near midpoints and near 0 (see tests).
    """
    offset = absmax.mean()
    centred = absmax - offset
    numel = centred.numel()
    n_nested = math.ceil(numel / NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(centred, (0, n_nested * NESTED_BLOCKSIZE - numel))
    blocks = padded.view(n_nested, NESTED_BLOCKSIZE)
    nested_absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * nested_absmax.clamp(min=1e-38).reciprocal()[:, None]).reshape(-1)[:numel]
    code = dynamic_map(absmax.device)
    midpoints = (code[:-1] + code[1:]) / 2
    codes = torch.bucketize(scaled.clamp(-1.0, 1.0), midpoints, out_int32=True).to(torch.uint8)
    return codes, nested_absmax, offset


def _decode_absmax(w: "NF4Weight") -> torch.Tensor:
    """fp32 absmax per block; nested codes decode as code8[q] * nested_absmax + offset, two
    roundings (multiply, then add), as bitsandbytes."""
    if not w.double_quant:
        return w.absmax
    n_blocks = w.absmax.numel()
    nested = w.nested_absmax.repeat_interleave(w.nested_blocksize)[:n_blocks]
    return torch.index_select(w.nested_code, 0, w.absmax.int()) * nested + w.offset_tensor


@functools.lru_cache(maxsize=8)
def _byte_table(device: torch.device) -> torch.Tensor:
    # For each byte value, the NF4 values of its high and low nibble, two fp32 stored as one
    # 8-byte word: decoding is then one 1-D gather (several times faster on CPU than gathering
    # [256, 2] rows).
    code = _nf4_code(device)
    byte = torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).view(torch.int64).view(-1)


# Weight elements a twin's GEMMs take at a time (`ops._chunk_rows`): a chunk of W decoded (4 MiB
# in fp32) stays in the last-level cache for the GEMMs that read it, and no dense copy of a large
# weight is made; a weight of up to a million elements is one chunk.
DECODE_CHUNK = 1 << 20

# Elements a decode gathers at a time, into two scratch buffers it reuses (the bytes as int32 and
# their values as fp32 pairs: 3 MiB). Fresh temporaries as large as the whole output are what the
# allocator returns to the OS and faults in again page by page: a 1024 x 1024 decode to bf16 read
# 1.4 ms or 5 ms by the allocator's state that way (the 2-core EPYC). Smaller pieces pay torch's
# per-call cost: pieces of 2¹⁶ took 2.4 ms, of 2¹⁹ 1.7 (one thread, medians).
DECODE_PIECE = 1 << 19


def decode_rows(w: "NF4Weight", row0: int, row1: int, absmax: torch.Tensor = None,
                dtype: torch.dtype = torch.float32, store: torch.dtype = None) -> torch.Tensor:
    """Rows [row0, row1) of `w` in `dtype`: fp32 code * fp32 absmax rounded once to `dtype`, as
    bitsandbytes rounds them (twins only), held in `store` (default `dtype`: a wider `store`
    holds the rounded values exactly). A fresh contiguous [row1 - row0, K] tensor, perhaps a view
    into a few blocks more (blocks straddle rows when K % blocksize != 0). `absmax` is
    `_decode_absmax(w)`, which a caller walking the rows in chunks decodes once. On the CPU the
    native loop (`peft_ops._cpu_loops`) decodes in one pass where it is built; the PyTorch passes
    compute the same bits everywhere else."""
    N, K = w.shape
    bs, numel = w.blocksize, N * K
    store = dtype if store is None else store
    absmax = _decode_absmax(w) if absmax is None else absmax
    # Whole blocks; a block starts at an even element, so on a byte boundary.
    first, last = row0 * K // bs, -(-row1 * K // bs)
    start, stop = first * bs, min(last * bs, numel)
    if w.device.type == "cpu" and _cpu_loops.available():
        # it writes fp32 (perhaps rounded to bf16) or bf16; fp16 is the fp32 product cast once
        direct = (store, dtype) in _cpu_loops.DECODES
        flat = torch.empty(stop - start, dtype=store if direct else torch.float32)
        _cpu_loops.nf4_decode(w.packed.contiguous(), absmax.to(torch.float32).contiguous(), _nf4_code_cpu(),
                              bs, start, stop, flat, rounded_to=dtype if direct else torch.float32)
        if not direct:
            flat = flat.to(dtype).to(store)
    else:
        flat = _decode_blocks_torch(w, start, stop, absmax, dtype).to(store)
    skip = row0 * K - start
    return flat[skip:skip + (row1 - row0) * K].view(row1 - row0, K)


def _decode_blocks_torch(w: "NF4Weight", start: int, stop: int, absmax: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
    """Elements [start, stop) (whole blocks) of `w` in `dtype`, by PyTorch passes a piece at a time."""
    bs = w.blocksize
    last = -(-stop // bs)
    flat = torch.empty(stop - start, dtype=dtype, device=w.device)
    table = _byte_table(w.device)
    piece = max(bs, DECODE_PIECE // bs * bs)
    n_bytes = (min(piece, stop - start) + 1) // 2
    index = torch.empty(n_bytes, dtype=torch.int32, device=w.device)
    words = torch.empty(n_bytes, dtype=torch.int64, device=w.device)
    for lo in range(start, stop, piece):
        hi = min(stop, lo + piece)
        nb = (hi - lo + 1) // 2      # (an odd element count ends on a padded byte)
        index[:nb].copy_(w.packed[lo // 2:lo // 2 + nb])
        values = torch.index_select(table, 0, index[:nb], out=words[:nb]).view(torch.float32)
        dest = flat[lo - start:hi - start]
        # (fp32 products, then one cast: a multiply that writes 16 bits at once is slower on CPU)
        prod = dest if dtype == torch.float32 else values[:hi - lo]
        full = (hi - lo) // bs * bs
        block = lo // bs
        torch.mul(values[:full].view(-1, bs), absmax[block:block + full // bs, None],
                  out=prod[:full].view(-1, bs))
        if full < hi - lo:           # the partial last block of the tensor
            torch.mul(values[full:hi - lo], absmax[last - 1], out=prod[full:])
        if prod is not dest:
            dest.copy_(prod)
    return flat


def _dequantize_torch(w: "NF4Weight", dtype: torch.dtype) -> torch.Tensor:
    """Twin of ``kernels.nf4.nf4_dequantize``: fp32 code * fp32 absmax, cast once to `dtype`."""
    return decode_rows(w, 0, w.shape[0], dtype=dtype)   # (all rows: exactly the output's storage)


# --- validation at the public boundary ---------------------------------------------------------

def _check_blocksize(blocksize, name="blocksize"):
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{name} must be an int, got {type(blocksize).__name__}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{name} must be one of {BLOCKSIZES} (what bitsandbytes allows), got {blocksize}")


def _check_float_dtype(dtype, name):
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"{name} must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")


def _check_tensor(t, name, length=None, dtypes=None, expected=""):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {expected}, got {t.dtype}")
    if length is not None and t.numel() != length:
        raise ValueError(f"{name} must have {length} elements for this shape and blocksize, "
                         f"got {t.numel()}")


def _check_shape(shape):
    try:
        shape = torch.Size(shape)
    except (TypeError, ValueError):
        raise TypeError(f"shape must be a sequence of two ints, got {shape!r}") from None
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"shape must be two positive ints [out_features, in_features], got {tuple(shape)}")
    return shape


class NF4Weight:
    """A 2-D weight quantized to NF4 in bitsandbytes' byte layout (SPEC §2).

    Attributes (read by the fused kernels; treat as read-only):
        packed: uint8 [(numel + 1) // 2], two codes a byte, the even element in the high nibble.
        absmax: fp32 [n_blocks], or uint8 codes [n_blocks] with double quantization.
        nested_absmax: fp32 [ceil(n_blocks / nested_blocksize)] or None.
        nested_code: fp32 [256], bitsandbytes' dynamic map, or None.
        offset: python float (an exact fp32 value) or None; offset_tensor: the same as an fp32
            0-d tensor, or None.
        code: fp32 [16], the NF4 values.
        shape (torch.Size [N, K]), dtype (the original dtype), blocksize, double_quant,
        nested_blocksize, device, nbytes.

    Build one with :meth:`quantize`, :meth:`from_bnb` or :meth:`from_state_dict`; the
    constructor takes the tensors as stored and checks they fit together.
    """

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape, dtype: torch.dtype,
                 blocksize: int = 64, *, nested_absmax: torch.Tensor = None,
                 nested_code: torch.Tensor = None, offset=None,
                 nested_blocksize: int = NESTED_BLOCKSIZE):
        shape = _check_shape(shape)
        _check_float_dtype(dtype, "dtype")
        _check_blocksize(blocksize)
        numel = shape[0] * shape[1]
        n_blocks = math.ceil(numel / blocksize)
        _check_tensor(packed, "packed", (numel + 1) // 2, (torch.uint8,), "uint8")
        device = packed.device

        double_quant = nested_absmax is not None
        if double_quant:
            if nested_code is None or offset is None:
                raise ValueError("double quantization needs nested_absmax, nested_code and offset together")
            if isinstance(nested_blocksize, bool) or not isinstance(nested_blocksize, int) \
                    or nested_blocksize <= 0:
                raise ValueError(f"nested_blocksize must be a positive int, got {nested_blocksize!r}")
            _check_tensor(absmax, "absmax", n_blocks, (torch.uint8,),
                          "uint8 codes, as double quantization stores them")
            _check_tensor(nested_absmax, "nested_absmax", math.ceil(n_blocks / nested_blocksize),
                          (torch.float32,), "float32")
            _check_tensor(nested_code, "nested_code", 256, (torch.float32,), "float32")
            if isinstance(offset, torch.Tensor):
                if offset.numel() != 1:
                    raise ValueError(f"offset must hold one value, got {offset.numel()}")
                offset = offset.item()
            if not isinstance(offset, (int, float)) or not math.isfinite(offset):
                raise ValueError(f"offset must be a finite number, got {offset!r}")
            offset_tensor = torch.tensor(offset, dtype=torch.float32, device=device)
            offset = offset_tensor.item()
        else:
            if nested_code is not None or offset is not None:
                raise ValueError("nested_code and offset need nested_absmax (double quantization)")
            _check_tensor(absmax, "absmax", n_blocks, tuple(_DTYPE_NAMES), "float32 (or fp16/bf16)")
            absmax = absmax.float()
            offset_tensor = None
        for name, t in (("absmax", absmax), ("nested_absmax", nested_absmax), ("nested_code", nested_code)):
            if t is not None and t.device != device:
                raise ValueError(f"{name} is on {t.device} but packed is on {device}; move them together")

        self.packed = packed.reshape(-1).contiguous()
        self.absmax = absmax.reshape(-1).contiguous()
        self.nested_absmax = nested_absmax.reshape(-1).contiguous() if double_quant else None
        self.nested_code = nested_code.reshape(-1).contiguous() if double_quant else None
        self.offset = offset
        self.offset_tensor = offset_tensor
        self.code = _nf4_code(device)
        self.shape = shape
        self.dtype = dtype
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.nested_blocksize = nested_blocksize

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def _wrap(cls, packed, absmax, shape, dtype, blocksize, *, nested_absmax, nested_code, offset,
              offset_tensor, code, nested_blocksize) -> "NF4Weight":
        """An NF4Weight around tensors a constructor already checked (no validation, no copies;
        row views of the bytes and statistics are read flat). torch.compile traces this, and the
        FSDP2-gathered tensors of an NF4Linear come back through it."""
        weight = cls.__new__(cls)
        double_quant = nested_absmax is not None
        weight.__dict__.update(
            packed=packed.reshape(-1), absmax=absmax.reshape(-1), nested_absmax=nested_absmax,
            nested_code=nested_code, offset=offset if double_quant else None,
            offset_tensor=offset_tensor if double_quant else None, code=code, shape=torch.Size(shape),
            dtype=dtype, blocksize=blocksize, double_quant=double_quant, nested_blocksize=nested_blocksize)
        return weight

    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> "NF4Weight":
        """Quantize a 2-D float tensor (fp32 / fp16 / bf16) to NF4, as bitsandbytes does.

        Args:
            weight: [out_features, in_features], finite values; any shape (blocks straddle rows
                when in_features is not a multiple of `blocksize`).
            blocksize: elements per absmax block, one of 32, 64, ..., 4096.
            double_quant: also quantize the absmax to 8 bits (bitsandbytes'
                ``compress_statistics=True``).
        """
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
        _check_float_dtype(weight.dtype, "weight.dtype")
        if weight.numel() == 0:
            raise ValueError(f"weight must have elements, got shape {tuple(weight.shape)}")
        if weight.is_meta:
            raise ValueError("weight is a meta tensor: it has a shape but no values to quantize "
                             "(materialise it first, e.g. with module.to_empty() and real weights)")
        _check_blocksize(blocksize)
        if not isinstance(double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
        weight = weight.detach()
        if not torch.isfinite(weight).all():
            raise ValueError("weight has NaN or Inf values; NF4 can only store finite weights")

        if _use_triton(weight):
            packed, absmax = _k.nf4_quantize(weight, blocksize)
        else:
            packed, absmax = _quantize_torch(weight, blocksize)
        if not double_quant:
            return cls(packed, absmax, weight.shape, weight.dtype, blocksize)
        codes, nested_absmax, offset = _quantize_nested(absmax)
        return cls(packed, codes, weight.shape, weight.dtype, blocksize,
                   nested_absmax=nested_absmax, nested_code=dynamic_map(weight.device), offset=offset)

    @classmethod
    def from_bnb(cls, packed, quant_state=None) -> "NF4Weight":
        """Wrap bitsandbytes NF4 storage: ``(packed, quant_state)`` as returned by
        ``bitsandbytes.functional.quantize_4bit``, or a quantized ``Params4bit`` alone.

        The tensors are shared, not copied (a packed storage dtype other than uint8 is viewed
        as bytes). bitsandbytes' ``quant_map`` is not read: NF4 decoding uses the fixed table.
        Nothing of `packed` or `quant_state` is changed: a weight bitsandbytes repacked for its
        CPU kernel is read into new tensors (see ``_from_bnb_cpu_packed``).
        """
        if quant_state is None:
            if not hasattr(packed, "quant_state"):
                raise TypeError("from_bnb needs (packed, quant_state) or a bitsandbytes Params4bit, "
                                f"got {type(packed).__name__} alone")
            quant_state = packed.quant_state
            if quant_state is None:
                raise ValueError("the Params4bit is not quantized yet (quant_state is None); "
                                 "move it to a device first")
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
        for attr in ("quant_type", "absmax", "shape", "dtype", "blocksize"):
            if not hasattr(quant_state, attr):
                raise TypeError(f"quant_state must be a bitsandbytes QuantState (no .{attr}), "
                                f"got {type(quant_state).__name__}")
        if quant_state.quant_type != "nf4":
            raise ValueError(f"quant_state.quant_type must be 'nf4', got {quant_state.quant_type!r}")
        if quant_state.shape is None:
            raise ValueError("quant_state.shape is None; the weight's shape is needed")
        packed = packed.detach().as_subclass(torch.Tensor)
        if getattr(quant_state, "packing_format_for_cpu", False):
            return cls._from_bnb_cpu_packed(packed, quant_state)
        if packed.dtype != torch.uint8:
            packed = packed.contiguous().view(torch.uint8)
        if not getattr(quant_state, "nested", False):
            return cls(packed, quant_state.absmax, quant_state.shape, quant_state.dtype,
                       quant_state.blocksize)
        state2 = quant_state.state2
        return cls(packed, quant_state.absmax, quant_state.shape, quant_state.dtype,
                   quant_state.blocksize, nested_absmax=state2.absmax, nested_code=state2.code,
                   offset=quant_state.offset, nested_blocksize=state2.blocksize)

    @classmethod
    def _from_bnb_cpu_packed(cls, packed, quant_state) -> "NF4Weight":
        """A copy of a weight bitsandbytes repacked for its AVX512-BF16 CPU kernel.

        bitsandbytes repacks `weight.data` and rewrites `quant_state` in place on the first
        eval + no-grad forward of a `Linear4bit` on such a CPU (0.50.x). Its inverse rewrites the
        live `quant_state` again while the module keeps the repacked bytes, so it is never called
        here: this reads both and writes only new tensors.

        Repacked layout: `packed` is [N, K/2]; for every 32-row group and column pair j, 32 bytes
        hold the 64 codes (row b, columns 2j and 2j + 1) at positions 2b and 2b + 1, position t in
        the low nibble of byte t and position 32 + t in its high nibble. `absmax` is bf16
        [K / blocksize, N] (the transposed block grid) and the nested codes are gone: the repack
        decoded them and rounded the scales to bf16. So the weight read back is the one the
        module now computes with: single-quantized, with those bf16 scales held in fp32.
        """
        N, K = quant_state.shape
        blocksize = quant_state.blocksize
        group = 32
        if packed.dim() != 2 or tuple(packed.shape) != (N, K // 2) or N % group or K % 2 or K % blocksize:
            raise ValueError(f"packed: a bitsandbytes CPU-repacked weight of shape {tuple(quant_state.shape)} "
                             f"must be [{N}, {K // 2}] uint8 with N a multiple of {group} and K of the "
                             f"blocksize {blocksize}, got {tuple(packed.shape)}")
        raw = packed.reshape(-1, group)
        positions = torch.cat([raw & 0xF, raw >> 4], dim=1)              # [N/32 * K/2, 64] codes
        codes = (positions.reshape(N // group, K // 2, group, 2).transpose(1, 2).reshape(-1))
        repacked = ((codes[0::2] << 4) | codes[1::2]).contiguous()         # bitsandbytes' flat order
        absmax = quant_state.absmax.t().reshape(-1).to(torch.float32)      # a new tensor
        dtype = getattr(quant_state, "original_dtype", quant_state.dtype)
        return cls(repacked, absmax, quant_state.shape, dtype, blocksize)

    @classmethod
    def from_state_dict(cls, state_dict, prefix: str = "") -> "NF4Weight":
        """Read the weight of a bitsandbytes ``Linear4bit`` saved at `prefix` (e.g.
        ``"model.layers.0.self_attn.q_proj."``): keys ``weight``, ``weight.absmax``,
        ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map`` and
        ``weight.quant_state.bitsandbytes__nf4`` (JSON), as transformers checkpoints store them."""
        blobs = [k for k in state_dict if k.startswith(prefix + _QUANT_STATE_KEY)]
        if len(blobs) != 1:
            raise ValueError(f"state_dict must hold exactly one '{prefix}{_QUANT_STATE_KEY}<type>' "
                             f"entry (a bitsandbytes 4-bit weight), found {blobs}")
        meta = json.loads(bytes(state_dict[blobs[0]].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"quant_type must be 'nf4', got {meta.get('quant_type')!r} in {blobs[0]}")
        dtype = _NAMED_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise TypeError(f"dtype must be one of {sorted(_NAMED_DTYPES)}, got {meta.get('dtype')!r} in {blobs[0]}")

        def tensor(key):
            if prefix + key not in state_dict:
                raise ValueError(f"state_dict has no '{prefix}{key}' entry")
            return state_dict[prefix + key]

        packed = tensor("weight")
        if isinstance(packed, torch.Tensor) and packed.dtype != torch.uint8:
            packed = packed.contiguous().view(torch.uint8)
        if "nested_offset" not in meta and prefix + "weight.nested_absmax" not in state_dict:
            return cls(packed, tensor("weight.absmax"), meta.get("shape"), dtype, meta.get("blocksize"))
        if meta.get("nested_dtype", "float32") != "float32":
            raise TypeError(f"nested_dtype must be 'float32', got {meta['nested_dtype']!r} in {blobs[0]}")
        return cls(packed, tensor("weight.absmax"), meta.get("shape"), dtype, meta.get("blocksize"),
                   nested_absmax=tensor("weight.nested_absmax"),
                   nested_code=tensor("weight.nested_quant_map"),
                   offset=meta.get("nested_offset"),
                   nested_blocksize=meta.get("nested_blocksize", NESTED_BLOCKSIZE))

    # --- use ---------------------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype = None) -> torch.Tensor:
        """Dense [N, K] tensor in `dtype` (default: the original dtype), bit-exact with
        ``bitsandbytes.functional.dequantize_4bit``: fp32 code * fp32 absmax, cast once."""
        dtype = self.dtype if dtype is None else dtype
        _check_float_dtype(dtype, "dtype")
        if _use_triton(self.packed):
            return _k.nf4_dequantize(self, dtype)
        return _dequantize_torch(self, dtype)

    def to(self, device) -> "NF4Weight":
        """This weight on `device` (self when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        move = (lambda t: None if t is None else t.to(device))
        return type(self)(move(self.packed), move(self.absmax), self.shape, self.dtype,
                          self.blocksize, nested_absmax=move(self.nested_absmax),
                          nested_code=move(self.nested_code), offset=self.offset,
                          nested_blocksize=self.nested_blocksize)

    def to_bnb(self):
        """``(packed, quant_state)`` for ``bitsandbytes.functional.dequantize_4bit``; the packed
        bytes are a ``[(numel + 1) // 2, 1]`` view sharing storage with this weight."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code,
                                blocksize=self.nested_blocksize, dtype=torch.float32)
        quant_state = QuantState(absmax=self.absmax, shape=self.shape, code=self.code,
                                 blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype,
                                 offset=self.offset_tensor, state2=state2)
        return self.packed.view(-1, 1), quant_state

    def state_dict(self, prefix: str = "") -> dict:
        """The entries a bitsandbytes ``Linear4bit`` at `prefix` saves for its weight (bias not
        included), in its order, with the same ``quant_state.bitsandbytes__nf4`` JSON."""
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _DTYPE_NAMES[self.dtype],
                "shape": list(self.shape)}
        out = {prefix + "weight": self.packed.view(-1, 1), prefix + "weight.absmax": self.absmax,
               prefix + "weight.quant_map": self.code.clone()}
        if self.double_quant:
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=self.offset)
            out[prefix + "weight.nested_absmax"] = self.nested_absmax
            # A copy: safetensors refuses entries that share storage.
            out[prefix + "weight.nested_quant_map"] = self.nested_code.clone()
        blob = json.dumps(meta).encode("utf-8")
        out[prefix + _QUANT_STATE_KEY + "nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    # --- description -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Device of the packed bytes (all tensors live together)."""
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, absmax and the nested statistics and code tables."""
        tensors = (self.packed, self.absmax, self.nested_absmax, self.nested_code, self.code)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device}, nbytes={self.nbytes})")
