"""Model surgery: add adapters (`add_lora`), make a PEFT model run the fused op (`from_peft`), and
merge / unmerge adapters (`merge_adapters`, `unmerge_adapters`)."""

import logging
import re
import warnings

import torch
from torch import nn

from .modules import (
    LoraLinear,
    NF4Linear,
    bnb_nf4_unsupported_reason,
    fused_lora_linear,
    is_bnb_linear4bit,
    is_conv1d,
)

__all__ = ["add_lora", "from_peft", "merge_adapters", "unmerge_adapters"]

logger = logging.getLogger("peft_ops")


# --- target matching (PEFT's rules) --------------------------------------------------------------

def _is_linear_like(module):
    return isinstance(module, (nn.Linear, NF4Linear)) or is_conv1d(module)


def _output_layer_names(model):
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return {name for name, m in model.named_modules() if out is not None and m is out}


def _matches(target_modules, name):
    """PEFT's `check_target_module_exists`: a string is a full-match regex; a list matches a name
    equal to an entry or ending in `.entry`."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def pattern_value(patterns, name, default):
    """PEFT's `get_pattern_key`: the first key of `patterns` matching `(.*\\.)?(key)$` wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def find_targets(model, target_modules):
    """[(name, module)] of the modules `target_modules` selects (PEFT's matching; "all-linear" takes
    every linear layer but the output layer). Raises ValueError naming a selected module that cannot
    take an adapter, or when nothing matches."""
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules must not be empty")
    elif isinstance(target_modules, (list, tuple, set)):
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError("target_modules must be a non-empty list of module names")
        target_modules = list(target_modules)
    else:
        raise TypeError(f"target_modules must be a str or a list of str, got {type(target_modules).__name__}")

    inside_lora = set()
    targets = []
    all_linear = target_modules == "all-linear"
    skip = _output_layer_names(model) if all_linear else set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside_lora):
            continue
        if isinstance(module, LoraLinear):
            inside_lora.add(name)
        if all_linear:
            selected = _is_linear_like(module) and name not in skip and not isinstance(module, LoraLinear)
        else:
            selected = _matches(target_modules, name)
        if not selected:
            continue
        if isinstance(module, LoraLinear):
            raise ValueError(f"target_modules selects {name!r}, which already has an adapter")
        if not _is_linear_like(module):
            raise ValueError(f"target_modules selects {name!r}, a {type(module).__name__}: only nn.Linear, "
                             "NF4Linear, bitsandbytes Linear4bit and transformers Conv1D can take an adapter")
        targets.append((name, module))
    if not targets:
        raise ValueError(f"target_modules={target_modules!r} matches no module of the model")
    return targets


def _set_submodule(model, name, module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# --- add_lora ------------------------------------------------------------------------------------

def add_lora(model, target_modules, r=8, lora_alpha=8, lora_dropout=0.0, use_dora=False, use_rslora=False,
             quantize=None, rank_pattern=None, alpha_pattern=None):
    """Add a LoRA / DoRA adapter to the selected linear layers of `model`, in place; returns `model`.

    Every selected module is replaced by a `LoraLinear` wrapping it (as `base_layer`), so parameter
    names follow PEFT's layout (`<path>.base_layer.weight`, `<path>.lora_A`, ...). All other
    parameters of the model are frozen; only the adapters train.

    Args:
        model: any `nn.Module`.
        target_modules: as PEFT: a regex string (full match on the module name), a list of names
            (a module is selected when its name equals an entry or ends with `.entry`), or
            "all-linear" (every linear layer except the output layer).
        r, lora_alpha, lora_dropout, use_dora, use_rslora: as PEFT's LoraConfig.
        quantize: None, or "nf4" to turn each selected dense base into an `NF4Linear`
            (block size 64, double quantization) before adding the adapter.
        rank_pattern, alpha_pattern: {key: value} overriding `r` / `lora_alpha` for modules whose
            name matches `(.*\\.)?(key)$`, as PEFT.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    for arg, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if patterns is not None and not isinstance(patterns, dict):
            raise TypeError(f"{arg} must be a dict, got {type(patterns).__name__}")
    targets = find_targets(model, target_modules)
    # Validate every layer's arguments before touching the model.
    plan = []
    for name, module in targets:
        rank = pattern_value(rank_pattern, name, r)
        alpha = pattern_value(alpha_pattern, name, lora_alpha)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"r for {name!r} must be a positive int, got {rank!r}")
        if is_bnb_linear4bit(module) and bnb_nf4_unsupported_reason(module):
            raise ValueError(f"{name}: {bnb_nf4_unsupported_reason(module)}")
        if type(module).__module__.startswith("bitsandbytes") and not is_bnb_linear4bit(module):
            raise ValueError(f"target_modules selects {name!r}, a bitsandbytes {type(module).__name__}: "
                             "only NF4 Linear4bit bases are supported")
        plan.append((name, module, rank, alpha))
    if not (isinstance(lora_dropout, (int, float)) and 0.0 <= lora_dropout < 1.0):
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")

    # Freeze everything but the adapters (those of an earlier add_lora call keep training).
    adapters = {id(p) for layer in model.modules() if isinstance(layer, LoraLinear)
                for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector) if p is not None}
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)
    for name, module, rank, alpha in plan:
        base = module
        if quantize == "nf4" and not isinstance(base, NF4Linear) and not is_bnb_linear4bit(base):
            base = NF4Linear.from_linear(base)
            if base.bias is not None:
                base.bias.requires_grad_(False)
        layer = LoraLinear(base, r=rank, lora_alpha=alpha, lora_dropout=lora_dropout, use_dora=use_dora,
                           use_rslora=use_rslora)
        _set_submodule(model, name, layer)
    return model


def lora_layers(model):
    """[(name, LoraLinear)] in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


# --- merge / unmerge -----------------------------------------------------------------------------

def merge_adapters(model):
    """Merge every `LoraLinear` of `model` into its base weight (LoRA and DoRA; dense and NF4 bases).

    NF4 bases are requantized with the same block size and double quantization. Returns
    {module name: relative Frobenius error the requantization added} for the NF4 modules (see
    `LoraLinear.merge`), and logs the largest one at INFO level on the "peft_ops" logger. Dense
    bases merge exactly up to their dtype's rounding and are not listed.

    For a PEFT model use PEFT's own `merge_adapter()` / `merge_and_unload()`; after `from_peft` they
    keep working.
    """
    layers = _our_layers_or_raise(model, "merge_adapters")
    already = [n for n, m in layers if m.merged]
    if already:
        raise ValueError(f"adapters already merged in: {', '.join(already)}")
    errors = {}
    for name, layer in layers:
        error = layer.merge()
        if not isinstance(layer.base_layer.weight, torch.Tensor) or is_bnb_linear4bit(layer.base_layer):
            errors[name] = error
    if errors:
        worst = max(errors, key=errors.get)
        logger.info("merge into NF4 added a relative error of up to %.3g (%s)", errors[worst], worst)
    return errors


def unmerge_adapters(model):
    """Undo `merge_adapters`: NF4 bases get their pre-merge weight back exactly, dense bases
    subtract the merged delta again."""
    layers = _our_layers_or_raise(model, "unmerge_adapters")
    for _, layer in layers:
        if layer.merged:
            layer.unmerge()
    return model


def _our_layers_or_raise(model, what):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = lora_layers(model)
    if not layers:
        if _peft_lora_layers(model):
            raise TypeError(f"{what}: model holds PEFT LoRA layers; use PEFT's merge_adapter() / "
                            "unmerge_adapter() (they keep working after from_peft)")
        raise ValueError(f"{what}: model has no peft_ops LoraLinear layer")
    return layers


# --- from_peft -----------------------------------------------------------------------------------

_warned = set()


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _peft_lora_layers(model):
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _peft_classes():
    from peft.tuners.lora import layer as lora_layer

    classes = [lora_layer.Linear]
    try:
        from peft.tuners.lora import bnb as lora_bnb

        if hasattr(lora_bnb, "Linear4bit"):
            classes.append(lora_bnb.Linear4bit)
    except ImportError:  # bitsandbytes missing
        pass
    return classes


def _dora_variant_type():
    from peft.tuners.lora.variants import DoraLinearVariant

    return DoraLinearVariant


def _base_unsupported_reason(layer):
    """Why the base of PEFT layer `layer` cannot feed the fused op, or None."""
    if isinstance(layer.base_layer, nn.Module) and hasattr(layer.base_layer, "base_layer"):
        return "nested adapter layers"
    base = layer.get_base_layer()
    if is_bnb_linear4bit(base):
        return bnb_nf4_unsupported_reason(base)
    if is_conv1d(base):
        return None if layer.fan_in_fan_out else "Conv1D base with fan_in_fan_out=False"
    if type(base).__module__.startswith("bitsandbytes"):
        return f"bitsandbytes {type(base).__name__} base (only NF4 Linear4bit is fused)"
    if isinstance(base, nn.Linear) and not layer.fan_in_fan_out:
        return None
    return f"{type(base).__name__} base"


def _adapter_unsupported_reason(layer, adapter):
    """Why adapter `adapter` of PEFT layer `layer` must run PEFT's own path, or None."""
    if layer.lora_bias.get(adapter, False):
        return "lora_bias=True"
    variant = layer.lora_variant.get(adapter)
    if variant is not None and type(variant) is not _dora_variant_type():
        return f"LoRA variant {type(variant).__name__}"
    dropout = layer.lora_dropout[adapter]
    if not isinstance(dropout, (nn.Identity, nn.Dropout)):
        return f"lora_dropout module {type(dropout).__name__}"
    return None


class FusedLoraForward:
    """Mixin put in front of a PEFT LoRA layer's class by `from_peft`: `forward` runs the fused op
    when it computes what PEFT would, and PEFT's own `forward` otherwise. Every other method
    (merge, set_adapter, state dict, ...) is PEFT's."""

    def forward(self, x, *args, **kwargs):
        adapter, reason = self._peft_ops_route(x, args, kwargs)
        if adapter is None:
            if reason:
                _warn_once(f"peft_ops: falling back to PEFT's unfused LoRA forward: {reason}")
            return super().forward(x, *args, **kwargs)
        magnitude = self.lora_magnitude_vector[adapter].weight if adapter in self.lora_variant else None
        dropout = self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        return fused_lora_linear(x, self.get_base_layer(), self.lora_A[adapter].weight,
                                 self.lora_B[adapter].weight, self.scaling[adapter], magnitude, p, self.training)

    def _peft_ops_route(self, x, args, kwargs):
        """(adapter, None) for the fused path; (None, reason) for PEFT's path, reason "" when that
        path is the base layer alone (nothing to fuse)."""
        if self.disable_adapters or self.merged:
            return None, ""
        if kwargs.get("adapter_names") is not None:
            return None, "mixed-batch adapter_names"
        if args or any(v is not None for v in kwargs.values()):
            return None, f"extra forward arguments {sorted(kwargs)}"
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return None, ""
        if len(active) > 1:
            return None, "several active adapters in one layer"
        adapter = active[0]
        reason = _adapter_unsupported_reason(self, adapter) or _base_unsupported_reason(self)
        if reason:
            return None, f"adapter {adapter!r}: {reason}"
        if not getattr(self, "cast_input_dtype_enabled", True):
            return None, "input dtype casting disabled"
        if not isinstance(x, torch.Tensor):
            return None, f"input of type {type(x).__name__}"
        if self.lora_A[adapter].weight.device != x.device:
            return None, "adapter weights on another device than the input (offloading)"
        return adapter, None


_fused_classes = {}


def _fused_class(cls):
    fused = _fused_classes.get(cls)
    if fused is None:
        name = f"Fused{cls.__name__}"
        if name in globals():
            name = f"Fused_{cls.__module__.replace('.', '_')}_{cls.__name__}"
        fused = type(name, (FusedLoraForward, cls), {"__module__": __name__, "__qualname__": name})
        # A module-level name keeps converted models picklable (torch.save of a whole model).
        globals()[name] = fused
        _fused_classes[cls] = fused
    return fused


def from_peft(model):
    """Make the LoRA / DoRA layers of a PEFT model run the fused op, in place; returns `model`.

    Each convertible layer keeps its object, parameters, names, requires_grad flags, adapters and
    merge state; only its class gains a `forward` that calls `peft_ops.lora_linear` (the class is
    swapped for a subclass of PEFT's, so everything else, including `save_pretrained`, `set_adapter`,
    `disable_adapter()`, merging and an optimizer built before the call, works as before).

    Converted: `peft.tuners.lora.Linear` over `nn.Linear` or transformers `Conv1D`
    (fan_in_fan_out), and PEFT's bitsandbytes `Linear4bit` (NF4) layers; LoRA and DoRA adapters.
    Everything else (embeddings, convolutions, 8-bit and other quantized bases, other LoRA
    variants, lora_bias) keeps PEFT's path and is listed, with the reason, in one warning.
    At call time a converted layer still uses PEFT's path for what the fused op does not compute
    (mixed-batch `adapter_names`, several adapters active at once in one layer) and warns once
    per reason. Calling it again converts layers added since.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = _peft_lora_layers(model)
    if not layers:
        raise ValueError("model has no PEFT LoRA layer (build it with peft.get_peft_model first)")
    classes = _peft_classes()
    skipped = []
    converted = 0
    for name, layer in layers:
        if isinstance(layer, FusedLoraForward):
            continue
        if type(layer) not in classes:
            skipped.append(f"{name} ({type(layer).__module__}.{type(layer).__name__}: no fused kernel)")
            continue
        reason = _base_unsupported_reason(layer)
        if reason:
            skipped.append(f"{name} ({reason})")
            continue
        for adapter in layer.lora_A:
            reason = _adapter_unsupported_reason(layer, adapter)
            if reason:
                skipped.append(f"{name} adapter {adapter!r} ({reason}; converted, but this adapter runs "
                               "PEFT's path)")
                # Announced here; do not warn again when it falls back at call time.
                _warned.add(f"peft_ops: falling back to PEFT's unfused LoRA forward: adapter {adapter!r}: {reason}")
        layer.__class__ = _fused_class(type(layer))
        converted += 1
    if skipped:
        warnings.warn(f"peft_ops.from_peft: {len(skipped)} LoRA module(s) keep PEFT's unfused path: "
                      + "; ".join(skipped), stacklevel=2)
    logger.info("from_peft: %d LoRA layer(s) now run the fused op", converted)
    return model
