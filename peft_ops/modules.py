"""Thin `nn.Module`s over the fused op: `NF4Linear` (a frozen NF4 base) and `LoraLinear` (a LoRA /
DoRA adapter over a base layer), with PEFT's constructor names and initialisation (SPEC §3).

The math lives in `peft_ops.functional.lora_linear` (and `peft_ops.multi.lora_linear_multi` for a
mixed `adapter_names` batch); these modules only pick the base weight in the `[N, K]` orientation the
op expects, hold the adapter parameters and the no-grad DoRA norm cache, and merge / unmerge.
"""

import math
import numbers

import torch
from torch import nn

from .functional import cached_norms_allowed, dora_row_norm, lora_linear
from .multi import BASE, MultiAdapterCache, multi_call, row_index
from .nf4 import NF4Weight
from .reference import DORA_EPS

__all__ = ["NF4Linear", "LoraLinear"]


# --- optional third-party layer types ------------------------------------------------------------

def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def _bnb_linear4bit_type():
    try:
        import bitsandbytes as bnb
    except ImportError:  # bitsandbytes is optional
        return None
    return bnb.nn.Linear4bit


def is_conv1d(module):
    """True for a transformers `Conv1D` (GPT-2 style, weight stored `[in, out]`)."""
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_bnb_linear4bit(module):
    """True for a bitsandbytes `Linear4bit` (when bitsandbytes is installed)."""
    linear4bit = _bnb_linear4bit_type()
    return linear4bit is not None and isinstance(module, linear4bit)


def bnb_nf4_unsupported_reason(module):
    """Why a bitsandbytes Linear4bit cannot feed the fused op, or None when it can."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return "bitsandbytes Linear4bit whose weight is not quantized yet"
    if getattr(state, "quant_type", getattr(weight, "quant_type", None)) != "nf4":
        return f"bitsandbytes 4-bit quant_type {state.quant_type!r} (only 'nf4' is fused)"
    return None


class _BnbNF4Cache:
    """An `NF4Weight` view of a bitsandbytes `Params4bit`, rebuilt when the parameter changes.

    Merging, `.to(device)` or loading a state dict replace the Params4bit or its data, so the view is
    keyed on the parameter object and the storages it reads.
    """

    def __init__(self):
        self.key = None
        self.weight = None

    def get(self, params4bit):
        state = params4bit.quant_state
        key = (id(params4bit), params4bit.data_ptr(), id(state), state.absmax.data_ptr(), params4bit.device)
        if key != self.key:
            self.weight = NF4Weight.from_bnb(params4bit)
            self.key = key
        return self.weight


def nf4_of_bnb(module):
    """The bitsandbytes Linear4bit `module`'s weight as an NF4Weight (cached on the module)."""
    cache = module.__dict__.get("_peft_ops_nf4_cache")
    if cache is None:
        cache = module.__dict__["_peft_ops_nf4_cache"] = _BnbNF4Cache()
    return cache.get(module.weight)


def check_rank(r, what="r"):
    """Raise TypeError / ValueError (naming `what`) unless `r` is a positive int."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"{what} must be a positive int, got {type(r).__name__} {r!r}")
    if r <= 0:
        raise ValueError(f"{what} must be a positive int, got {r!r}")


def check_alpha(lora_alpha, what="lora_alpha"):
    """Raise TypeError / ValueError (naming `what`) unless `lora_alpha` is a finite number."""
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real):
        raise TypeError(f"{what} must be a number, got {type(lora_alpha).__name__} {lora_alpha!r}")
    if not math.isfinite(lora_alpha):
        raise ValueError(f"{what} must be finite, got {lora_alpha!r}")


def check_adapter_args(r, lora_alpha, lora_dropout, use_dora, use_rslora, where=""):
    """Validate `LoraLinear`'s hyper-parameters; raise TypeError / ValueError naming the argument
    (after `where`, e.g. the config file they came from)."""
    check_rank(r, f"{where}r")
    check_alpha(lora_alpha, f"{where}lora_alpha")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real):
        raise TypeError(f"{where}lora_dropout must be a number in [0, 1), got {type(lora_dropout).__name__} "
                        f"{lora_dropout!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"{where}lora_dropout must be in [0, 1), got {lora_dropout!r}")
    for name, flag in (("use_dora", use_dora), ("use_rslora", use_rslora)):
        if not isinstance(flag, bool):
            raise TypeError(f"{where}{name} must be a bool, got {type(flag).__name__} {flag!r}")


def base_in_out_features(base):
    """(in_features, out_features) of a supported base layer."""
    if is_conv1d(base):
        in_features, out_features = base.weight.shape
        return in_features, out_features
    return base.in_features, base.out_features


def base_weight_nk(base):
    """The base layer's weight as the fused op takes it: a dense `[N, K]` tensor (a view, never a copy)
    or an NF4Weight."""
    if isinstance(base, NF4Linear):
        return base.weight
    if is_bnb_linear4bit(base):
        return nf4_of_bnb(base)
    if is_conv1d(base):
        return base.weight.t()  # Conv1D stores W as [K, N] (fan_in_fan_out)
    return base.weight


def _in_layer_dtype(x, base, call):
    """`call(x, weight)` in the dtype the unfused layers would compute in.

    Under autocast, `nn.Linear` computes in the autocast dtype; so does one fused call (a dense
    weight is cast like autocast casts it). A bitsandbytes `Linear4bit` with a `compute_dtype`
    casts its input to it (fp32 activations, as `prepare_model_for_kbit_training` leaves them,
    run a bf16 GEMM) and returns its input's dtype; so does the fused call — which then feeds the
    adapter the compute-dtype input too (PEFT feeds it the fp32 one: a difference of one bf16
    rounding of x in the adapter path).
    """
    device_type = x.device.type
    weight = base_weight_nk(base)
    bnb = is_bnb_linear4bit(base)
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    elif bnb and getattr(base, "compute_dtype", None) is not None:
        dtype = base.compute_dtype
    else:
        dtype = x.dtype
    if dtype == x.dtype and not torch.is_autocast_enabled(device_type):
        return call(x, weight)
    if isinstance(weight, torch.Tensor):
        weight = weight.to(dtype)
    with torch.autocast(device_type, enabled=False):
        y = call(x.to(dtype), weight)
    return y.to(x.dtype) if bnb else y


def fused_lora_linear(x, base, lora_A, lora_B, scaling, magnitude, dropout, training, norm_cache=None):
    """`lora_linear` over `base`, in the dtype the unfused layers would compute in (see
    `_in_layer_dtype`); DoRA reads its norm from `norm_cache` without grad."""
    return _in_layer_dtype(x, base, lambda x, weight: lora_linear(
        x, weight, lora_A, lora_B, scaling, bias=base.bias, magnitude=magnitude, dropout=dropout, training=training,
        norm_cache=norm_cache))


def fused_lora_linear_multi(x, base, As, Bs, scalings, magnitudes, idx, dropout, training, cache=None,
                            norm_keys=None):
    """`lora_linear_multi` over `base` (validated per-adapter lists, idx int32 [M] on x's device),
    in the dtype the unfused layers would compute in."""
    return _in_layer_dtype(x, base, lambda x, weight: multi_call(
        x, weight, As, Bs, scalings, magnitudes, idx, bias=base.bias, dropout=dropout, training=training,
        cache=cache, norm_keys=norm_keys))


def layer_cache(module) -> MultiAdapterCache:
    """The no-grad cache (`MultiAdapterCache`: DoRA norms, adapter tables, row indices) a layer
    keeps in its `__dict__`; a copy or an unpickled layer starts with an empty one."""
    cache = module.__dict__.get("_peft_ops_cache")
    if cache is None:
        cache = module.__dict__["_peft_ops_cache"] = MultiAdapterCache()
    return cache


def check_adapter_names(adapter_names, x):
    """PEFT's rule for `adapter_names`: one name (str) per sample of x (its first dimension)."""
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError("adapter_names: expected a list of adapter names (str), one per sample")
    if x.dim() < 2 or len(adapter_names) != x.shape[0]:
        raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(adapter_names)} and {x.shape[0] if x.dim() else 0} respectively.")


def names_index(cache, adapter_names, order, x):
    """int32 [M] row index on x's device for per-sample `adapter_names`: each name's position in
    `order`, -1 for "__base__" and names the layer lacks (PEFT gives those rows the base output);
    kept in `cache` so a decode loop copies it to the device once."""
    key = (tuple(adapter_names), tuple(order), tuple(x.shape[:-1]), x.device)

    def build():
        position = {name: e for e, name in enumerate(order)}
        per_sample = [position.get(name, BASE) for name in adapter_names]
        return row_index(torch.tensor(per_sample, dtype=torch.int32), x, len(order))
    return cache.index(key, build)


# --- NF4Linear -----------------------------------------------------------------------------------

class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (bitsandbytes-compatible bytes, SPEC §2).

    `weight` is a `peft_ops.NF4Weight` (not a Parameter: it never trains); `bias` is an ordinary
    Parameter or None. Its state dict uses bitsandbytes' `Linear4bit` keys (`weight`,
    `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
    `weight.quant_state.bitsandbytes__nf4`, `bias`), so it loads what a bitsandbytes 4-bit model
    saves and the other way round.

    `.to(device)` moves the NF4 bytes; dtype casts (`.half()`, `.to(torch.bfloat16)`) touch only the
    bias: the packed weight and its fp32 statistics keep their dtype, and the output always has the
    input's dtype.

    For FSDP2 / DDP the NF4 tensors are also frozen parameters (`requires_grad=False`, never in the
    state dict under these names): `nf4_packed` `[N, K/2]` and `nf4_absmax` `[N, K/blocksize]` (1-D
    when K is odd or not a multiple of the block size), and with double quantization
    `nf4_nested_absmax`. `fully_shard` then cuts packed bytes and absmax at the same rows, so a shard
    holds whole quantization blocks, and gathers them before the forward; `weight` is an `NF4Weight`
    view of whatever tensors the module holds at that moment.

    Args:
        in_features, out_features: sizes, as `nn.Linear`.
        bias: whether the layer has a bias.
        blocksize: NF4 block size (32 ... 4096).
        double_quant: quantize the absmax statistics too (bitsandbytes `compress_statistics`).
        dtype: the dtype the weight dequantizes to (bitsandbytes' `quant_state.dtype`).
        device: where to allocate.
    """

    def __init__(self, in_features, out_features, bias=True, *, blocksize=64, double_quant=True,
                 dtype=None, device=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        dtype = torch.get_default_dtype() if dtype is None else dtype
        # All-zero blocks quantize to absmax 0 (SPEC §2); a state dict or from_linear fills real values.
        self.weight = NF4Weight.quantize(torch.zeros(out_features, in_features, dtype=dtype, device=device),
                                         blocksize=blocksize, double_quant=double_quant)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear, blocksize=64, double_quant=True):
        """Quantize an `nn.Linear` (or a transformers `Conv1D`, whose weight is stored transposed)
        into an NF4Linear; the bias is copied (same dtype and requires_grad)."""
        if is_conv1d(linear):
            weight = linear.weight.detach().t()
        elif isinstance(linear, nn.Linear) and not is_bnb_linear4bit(linear):
            weight = linear.weight.detach()
        else:
            raise TypeError(f"linear must be an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        out_features, in_features = weight.shape
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = in_features, out_features
        layer.weight = NF4Weight.quantize(weight.contiguous(), blocksize=blocksize, double_quant=double_quant)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        else:
            layer.register_parameter("bias", None)
        return layer

    @classmethod
    def from_bnb(cls, linear4bit):
        """Wrap a bitsandbytes NF4 `Linear4bit` (its bytes are shared, not copied)."""
        if not is_bnb_linear4bit(linear4bit):
            raise TypeError(f"linear4bit must be a bitsandbytes Linear4bit, got {type(linear4bit).__name__}")
        reason = bnb_nf4_unsupported_reason(linear4bit)
        if reason is not None:
            raise ValueError(f"linear4bit: {reason}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear4bit.in_features, linear4bit.out_features
        layer.weight = NF4Weight.from_bnb(linear4bit.weight)
        if linear4bit.bias is not None:
            layer.bias = nn.Parameter(linear4bit.bias.detach(), requires_grad=linear4bit.bias.requires_grad)
        else:
            layer.register_parameter("bias", None)
        return layer

    # --- the NF4 tensors as frozen parameters (see the class docstring) ---

    _NF4_PARAMS = ("nf4_packed", "nf4_absmax", "nf4_nested_absmax")
    _NF4_BUFFERS = ("nf4_code", "nf4_nested_code", "nf4_offset")

    @property
    def weight(self):
        """The frozen weight as an `NF4Weight` over the module's current NF4 tensors (FSDP2 swaps
        them between sharded and gathered)."""
        shape, dtype, blocksize, nested_blocksize, offset = self._nf4_meta
        return NF4Weight._wrap(self.nf4_packed, self.nf4_absmax, shape, dtype, blocksize,
                               nested_absmax=self.nf4_nested_absmax, nested_code=self.nf4_nested_code,
                               offset=offset, offset_tensor=self.nf4_offset, code=self.nf4_code,
                               nested_blocksize=nested_blocksize)

    @weight.setter
    def weight(self, weight):
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        N, K = weight.shape
        packed, absmax = weight.packed, weight.absmax
        if K % 2 == 0:
            packed = packed.view(N, K // 2)            # rows of whole bytes: FSDP2 shards by rows
            if K % weight.blocksize == 0:
                absmax = absmax.view(N, K // weight.blocksize)
        for name, t in zip(self._NF4_PARAMS, (packed, absmax, weight.nested_absmax)):
            self.register_parameter(name, None if t is None else nn.Parameter(t, requires_grad=False))
        for name, t in (("nf4_code", weight.code), ("nf4_nested_code", weight.nested_code),
                        ("nf4_offset", weight.offset_tensor)):
            self.register_buffer(name, t, persistent=False)
        self._nf4_meta = (weight.shape, weight.dtype, weight.blocksize, weight.nested_blocksize, weight.offset)

    @property
    def device(self):
        """Device of the NF4 bytes."""
        return self.nf4_packed.device

    def forward(self, x):
        """`x Wᵀ + bias` through the fused NF4 GEMM (W decoded in registers, never materialised):
        the fused op with a zero rank-1 adapter, whose cost is a rank-16 tile in the epilogue."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        zero_A = torch.zeros(1, self.in_features, dtype=torch.float32, device=x.device)
        zero_B = torch.zeros(self.out_features, 1, dtype=torch.float32, device=x.device)
        return lora_linear(x, self.weight, zero_A, zero_B, 0.0, bias=bias)

    def _apply(self, fn, recurse=True):
        # Move the NF4 tensors by probing where `fn` sends a tensor on the weight's device; dtype casts
        # are deliberately not applied to them (Module._apply would cast the fp32 statistics).
        weight = self.weight
        for name in self._NF4_PARAMS:
            self._parameters.pop(name, None)
        for name in self._NF4_BUFFERS:
            self._buffers.pop(name, None)
        try:
            super()._apply(fn, recurse)
        finally:
            target = fn(torch.empty(0, device=weight.device)).device
            self.weight = weight.to(target)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # bitsandbytes' keys only: the bias, then the weight's entries (not the nf4_* parameters).
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination.update(self.weight.state_dict(prefix))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for name in self._NF4_PARAMS:   # stored under bitsandbytes' keys, read below
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
        wkey = prefix + "weight"
        ours = [k for k in state_dict if k == wkey or k.startswith(wkey + ".")]
        for k in ours:
            if k in unexpected_keys:
                unexpected_keys.remove(k)
        if wkey not in state_dict:
            missing_keys.append(wkey)
            return
        try:
            weight = NF4Weight.from_state_dict(state_dict, prefix)
        except (KeyError, ValueError, TypeError) as e:
            error_msgs.append(f"{prefix}weight: cannot read the NF4 weight ({e})")
            return
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            error_msgs.append(f"size mismatch for {wkey}: the checkpoint holds an NF4 weight of shape "
                              f"{tuple(weight.shape)}, the layer expects {expected}")
            return
        self.weight = weight.to(self.device)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nf4")


# --- LoraLinear ----------------------------------------------------------------------------------

class LoraLinear(nn.Module):
    """A LoRA / DoRA adapter over a base layer, computed by the fused `lora_linear`.

    `y = x Wᵀ + bias + s·(drop(x) Aᵀ) Bᵀ` (LoRA), or PEFT's DoRA with the magnitude vector (SPEC §3).

    Args:
        base_layer: an `nn.Linear`, a `peft_ops.NF4Linear`, a bitsandbytes NF4 `Linear4bit`, or a
            transformers `Conv1D` (stored transposed; handled as `fan_in_fan_out`). Kept as the
            submodule `base_layer`; its weight is frozen here (the fused op trains adapters
            only), its bias keeps its `requires_grad`.
        r: rank (positive int).
        lora_alpha: scaling numerator: `s = lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
        lora_dropout: dropout probability on the LoRA input, in [0, 1).
        use_dora: add the DoRA magnitude vector `lora_magnitude_vector`, initialised to the row
            norms of the base weight (which equal ‖W + s·B A‖ since B starts at zero).
        use_rslora: rank-stabilised scaling.
        init_lora_weights: True: A kaiming-uniform (a=√5, as `nn.Linear`), B zero, as PEFT;
            "gaussian": A ~ N(0, 1/r); False: B random too (a non-identity start, for tests).
        dtype: adapter dtype (fp32 by default, as PEFT; activations may be bf16/fp16).

    Parameters: `lora_A` `[r, in_features]`, `lora_B` `[out_features, r]`, and with DoRA
    `lora_magnitude_vector` `[out_features]`; all trainable.

    `forward(x, adapter_names=[...])` takes PEFT's mixed-batch argument: one name a sample (x's
    first dimension); samples naming this layer's adapter (`adapter_name`, "default" as PEFT's)
    use it, those naming "__base__" (or any other name, as a PEFT layer without that adapter does)
    get the base output, in one fused call. Without grad, DoRA's row norm is computed once and
    kept (N floats) until the base weight, A, B, the scaling or the magnitude change.
    """

    adapter_name = "default"

    def __init__(self, base_layer, r=8, lora_alpha=8, lora_dropout=0.0, use_dora=False, use_rslora=False,
                 init_lora_weights=True, *, dtype=torch.float32):
        super().__init__()
        if not isinstance(base_layer, nn.Module) or not (
            isinstance(base_layer, (nn.Linear, NF4Linear)) or is_conv1d(base_layer)
        ):
            raise TypeError("base_layer must be an nn.Linear, a peft_ops.NF4Linear, a bitsandbytes Linear4bit "
                            f"or a transformers Conv1D, got {type(base_layer).__name__}")
        if isinstance(base_layer, LoraLinear):
            raise TypeError("base_layer is already a LoraLinear")
        if is_bnb_linear4bit(base_layer):
            reason = bnb_nf4_unsupported_reason(base_layer)
            if reason is not None:
                raise ValueError(f"base_layer: {reason}")
        elif isinstance(base_layer, nn.Linear) and type(base_layer).__module__.startswith("bitsandbytes"):
            raise TypeError(f"base_layer: bitsandbytes {type(base_layer).__name__} is not supported "
                            "(only NF4 Linear4bit)")
        check_adapter_args(r, lora_alpha, lora_dropout, use_dora, use_rslora)
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")

        self.base_layer = base_layer
        if isinstance(getattr(base_layer, "weight", None), nn.Parameter):
            base_layer.weight.requires_grad_(False)
        self.in_features, self.out_features = base_in_out_features(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_dora = use_dora
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.merged = False
        self._merge_state = None  # what unmerge needs (DoRA norm, pre-merge NF4 weight)

        device = base_device(base_layer)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=dtype, device=device))
        self.reset_lora_parameters(init_lora_weights)
        if self.use_dora:
            magnitude = dora_row_norm(base_weight_nk(base_layer), self.lora_A, self.lora_B, self.scaling)
            self.lora_magnitude_vector = nn.Parameter(magnitude.to(dtype))
        else:
            self.register_parameter("lora_magnitude_vector", None)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights=True):
        """PEFT's initialisation: A kaiming-uniform (or gaussian), B zero (random when False)."""
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.normal_(self.lora_B, std=1 / self.r)
        else:
            nn.init.zeros_(self.lora_B)

    @property
    def weight(self):
        """The base weight in its stored form (transformers code sometimes reads `.weight`)."""
        return self.base_layer.weight

    @property
    def bias(self):
        """The base layer's bias (or None)."""
        return self.base_layer.bias

    def forward(self, x, adapter_names=None):
        """`base(x) + s·(drop(x) Aᵀ) Bᵀ` (LoRA) or PEFT's DoRA output, through the fused op;
        the base alone once merged. With `adapter_names`, per sample as PEFT's mixed batch."""
        if adapter_names is not None:
            return self._mixed_forward(x, adapter_names)
        if self.merged:
            return self.base_layer(x)
        cache = layer_cache(self).norm_cache(self.adapter_name) if self.use_dora and cached_norms_allowed() else None
        return fused_lora_linear(x, self.base_layer, self.lora_A, self.lora_B, self.scaling,
                                 self.lora_magnitude_vector, self.lora_dropout, self.training, norm_cache=cache)

    def _mixed_forward(self, x, adapter_names):
        check_adapter_names(adapter_names, x)
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")
        uses = [name == self.adapter_name for name in adapter_names]
        if not any(uses):
            return self.base_layer(x)
        if all(uses):
            return self.forward(x)
        cache = layer_cache(self)
        idx = names_index(cache, adapter_names, [self.adapter_name], x)
        return fused_lora_linear_multi(x, self.base_layer, [self.lora_A], [self.lora_B], [self.scaling],
                                       [self.lora_magnitude_vector], idx, self.lora_dropout, self.training,
                                       cache=cache, norm_keys=[self.adapter_name])

    # --- merge / unmerge ---

    def _delta_weight(self):
        """s·B A in fp32, `[N, K]`."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        """Fold the adapter into the base weight; afterwards `forward` runs the base alone.

        Dense bases are updated in place (`W += s·B A`; DoRA `W = (m/n) ⊙ (W + s·B A)`, n cached for
        unmerge). NF4 bases are dequantized, merged in fp32 and requantized with the same block size
        and double quantization; the pre-merge NF4 weight is kept so that `unmerge` restores it
        exactly. Returns the relative Frobenius error the requantization added,
        ‖deq(quant(W')) − W'‖ / ‖W'‖ with W' the exact merged weight (0.0 for dense bases).
        """
        if self.merged:
            raise ValueError("the adapter is already merged")
        base = self.base_layer
        w_nk = base_weight_nk(base)
        delta = self._delta_weight()
        scale = None
        if self.use_dora:
            norm = dora_row_norm(w_nk, self.lora_A, self.lora_B, self.scaling).float()
            scale = (self.lora_magnitude_vector.detach().float() / norm.clamp_min(DORA_EPS))[:, None]
        if isinstance(w_nk, torch.Tensor):
            merged = w_nk.float() + delta
            if scale is not None:
                merged = scale * merged
            w_nk.copy_(merged.to(w_nk.dtype))  # a view for Conv1D: writes through to [K, N] storage
            self._merge_state = {"scale": scale}
            error = 0.0
        else:
            merged = w_nk.dequantize(torch.float32) + delta
            if scale is not None:
                merged = scale * merged
            self._merge_state = {"scale": scale, "weight": base.weight}
            new = self._requantize_base(merged.to(w_nk.dtype), w_nk)
            error = float(torch.linalg.vector_norm(new.dequantize(torch.float32) - merged)
                          / torch.linalg.vector_norm(merged).clamp_min(1e-30))
        self.merged = True
        return error

    @torch.no_grad()
    def unmerge(self):
        """Undo `merge`. NF4 bases get their pre-merge weight back exactly; dense bases subtract the
        delta again (exact up to the rounding of the base dtype)."""
        if not self.merged:
            raise ValueError("the adapter is not merged")
        base = self.base_layer
        state = self._merge_state
        if "weight" in state:
            base.weight = state["weight"]
        else:
            w_nk = base_weight_nk(base)
            w = w_nk.float()
            if state["scale"] is not None:
                w = w / state["scale"]
            w_nk.copy_((w - self._delta_weight()).to(w_nk.dtype))
        self._merge_state = None
        self.merged = False

    def _requantize_base(self, dense, old):
        """Quantize `dense` with `old`'s settings into the base; returns the new NF4Weight."""
        base = self.base_layer
        if isinstance(base, NF4Linear):
            base.weight = NF4Weight.quantize(dense, blocksize=old.blocksize, double_quant=old.double_quant)
            return base.weight
        # bitsandbytes Linear4bit: let bitsandbytes quantize a fresh Params4bit, as PEFT's merge does,
        # with the parameter's own settings (a weight bitsandbytes repacked for its CPU kernel reads
        # back single-quantized, but the layer still asks for double quantization).
        import bitsandbytes as bnb

        weight = base.weight
        base.weight = bnb.nn.Params4bit(
            dense.to("cpu"), requires_grad=False, quant_type="nf4", blocksize=old.blocksize,
            compress_statistics=weight.compress_statistics, quant_storage=weight.quant_storage, module=base,
        ).to(weight.device)
        return nf4_of_bnb(base)

    def extra_repr(self):
        kind = "DoRA" if self.use_dora else "LoRA"
        return (f"{kind}: r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"use_rslora={self.use_rslora}, merged={self.merged}")


def base_device(base):
    """Device the base layer's weight lives on."""
    if isinstance(base, NF4Linear):
        return base.device
    return base.weight.device
