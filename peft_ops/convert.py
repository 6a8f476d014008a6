"""Model surgery: add adapters (`add_lora`), make a PEFT model run the fused op (`from_peft`), and
merge / unmerge adapters (`merge_adapters`, `unmerge_adapters`)."""

import logging
import re
import warnings

import torch
from torch import nn

from .functional import cached_norms_allowed
from .modules import (
    LoraLinear,
    NF4Linear,
    bnb_nf4_unsupported_reason,
    check_adapter_args,
    check_alpha,
    check_rank,
    fused_lora_linear,
    fused_lora_linear_multi,
    is_bnb_linear4bit,
    is_conv1d,
    layer_cache,
    names_index,
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
    parameters of the model are frozen; only the adapters train. Every argument and every selected
    module is checked first: on an error (TypeError / ValueError naming it) the model is unchanged.

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
    check_adapter_args(r, lora_alpha, lora_dropout, use_dora, use_rslora)
    for arg, patterns, check in (("rank_pattern", rank_pattern, check_rank),
                                 ("alpha_pattern", alpha_pattern, check_alpha)):
        if patterns is not None and not isinstance(patterns, dict):
            raise TypeError(f"{arg} must be a dict, got {type(patterns).__name__}")
        for key, value in (patterns or {}).items():
            if not isinstance(key, str):
                raise TypeError(f"{arg} keys must be module-name patterns (str), got {key!r}")
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"{arg} key {key!r} is not a valid regular expression: {e}") from None
            check(value, f"{arg}[{key!r}]")
    targets = find_targets(model, target_modules)
    # Validate every layer before touching the model.
    plan = []
    for name, module in targets:
        rank = pattern_value(rank_pattern, name, r)
        alpha = pattern_value(alpha_pattern, name, lora_alpha)
        if is_bnb_linear4bit(module) and bnb_nf4_unsupported_reason(module):
            raise ValueError(f"{name}: {bnb_nf4_unsupported_reason(module)}")
        if type(module).__module__.startswith("bitsandbytes") and not is_bnb_linear4bit(module):
            raise ValueError(f"target_modules selects {name!r}, a bitsandbytes {type(module).__name__}: "
                             "only NF4 Linear4bit bases are supported")
        plan.append((name, module, rank, alpha))

    # Build every layer before changing the model. A construction can still fail (quantizing a
    # weight with NaNs, say); the only thing it changes in the model is a base weight's
    # requires_grad flag (LoraLinear freezes its base), put back before the error propagates.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    layers = []
    try:
        for name, module, rank, alpha in plan:
            base = module
            if quantize == "nf4" and not isinstance(base, NF4Linear) and not is_bnb_linear4bit(base):
                base = NF4Linear.from_linear(base)
                if base.bias is not None:
                    base.bias.requires_grad_(False)
            layers.append((name, LoraLinear(base, r=rank, lora_alpha=alpha, lora_dropout=lora_dropout,
                                            use_dora=use_dora, use_rslora=use_rslora)))
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise

    # Freeze everything but the adapters (those of an earlier add_lora call keep training).
    adapters = {id(p) for layer in model.modules() if isinstance(layer, LoraLinear)
                for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector) if p is not None}
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)
    for name, layer in layers:
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


def _hooks(module):
    """The kinds of hook on `module` that PEFT's forward would run by calling it, as a list."""
    kinds = [kind for kind, hooks in (("forward pre-hook", module._forward_pre_hooks),
                                      ("forward hook", module._forward_hooks),
                                      ("backward pre-hook", module._backward_pre_hooks),
                                      ("backward hook", module._backward_hooks)) if hooks]
    if "forward" in module.__dict__:   # accelerate's hooks (offloading, device alignment) replace it
        kinds.append("replaced forward")
    return kinds


def _hooks_reason(layer, adapter):
    """Which submodules PEFT's forward calls for `adapter` carry hooks, or None.

    The fused op reads their weights instead of calling them, so their hooks (activation capture,
    weight casting or gathering, offloading) would silently not run. Global hooks
    (`register_module_forward_hook`) are not looked at: profilers and module trackers install
    them to watch every module, and watching the fused layer is what they should see."""
    modules = [("base_layer", layer.base_layer), (f"lora_A[{adapter!r}]", layer.lora_A[adapter]),
               (f"lora_B[{adapter!r}]", layer.lora_B[adapter]),
               (f"lora_dropout[{adapter!r}]", layer.lora_dropout[adapter])]
    if adapter in layer.lora_magnitude_vector:
        modules.append((f"lora_magnitude_vector[{adapter!r}]", layer.lora_magnitude_vector[adapter]))
    hooked = []
    for name, module in modules:
        kinds = _hooks(module)
        if kinds:
            hooked.append(f"{name} ({', '.join(kinds)})")
    return f"hooks on {', '.join(hooked)}" if hooked else None


class FusedLoraForward:
    """Mixin put in front of a PEFT LoRA layer's class by `from_peft`: `forward` runs the fused op
    when it computes what PEFT would, and PEFT's own `forward` otherwise. Every other method
    (merge, set_adapter, state dict, ...) is PEFT's.

    A mixed batch (`adapter_names=`, one name a sample) runs as one fused call over every adapter
    it names, LoRA and DoRA alike (PEFT's own path refuses DoRA there), "__base__" samples and
    names this layer lacks getting the base output, as in PEFT. Without grad the layer keeps each
    DoRA adapter's row norm (N floats) until its weights, the base or the scaling change."""

    def forward(self, x, *args, **kwargs):
        if kwargs.get("adapter_names") is not None:
            route, reason = self._peft_ops_mixed_route(x, args, kwargs)
            if route is None:
                if reason:
                    _warn_once(f"peft_ops: falling back to PEFT's unfused LoRA forward: {reason}")
                return super().forward(x, *args, **kwargs)
            return self._peft_ops_mixed_forward(x, kwargs["adapter_names"], route)
        adapter, reason = self._peft_ops_route(x, args, kwargs)
        if adapter is None:
            if reason:
                _warn_once(f"peft_ops: falling back to PEFT's unfused LoRA forward: {reason}")
            return super().forward(x, *args, **kwargs)
        magnitude = self.lora_magnitude_vector[adapter].weight if adapter in self.lora_variant else None
        dropout = self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        cache = layer_cache(self).norm_cache(adapter) if magnitude is not None and cached_norms_allowed() else None
        return fused_lora_linear(x, self.get_base_layer(), self.lora_A[adapter].weight,
                                 self.lora_B[adapter].weight, self.scaling[adapter], magnitude, p, self.training,
                                 norm_cache=cache)

    def _peft_ops_common_reason(self, x, adapters):
        """Why adapters `adapters` cannot run fused on input x (PEFT's path then), or None."""
        for adapter in adapters:
            reason = _adapter_unsupported_reason(self, adapter) or _base_unsupported_reason(self)
            if reason:
                return f"adapter {adapter!r}: {reason}"
            reason = _hooks_reason(self, adapter)
            if reason:
                return reason
        weight = self.get_base_layer().weight
        if isinstance(weight, torch.Tensor) and weight.requires_grad and torch.is_grad_enabled():
            # Unfrozen by the user, or a view of a flat parameter that requires grad (FSDP1 with
            # use_orig_params=True): the fused op gives the base weight no gradient, PEFT's path does.
            return "the base weight requires grad (the fused op trains adapters only)"
        if not getattr(self, "cast_input_dtype_enabled", True):
            return "input dtype casting disabled"
        if not isinstance(x, torch.Tensor):
            return f"input of type {type(x).__name__}"
        if any(self.lora_A[a].weight.device != x.device for a in adapters):
            return "adapter weights on another device than the input (offloading)"
        return None

    def _peft_ops_route(self, x, args, kwargs):
        """(adapter, None) for the fused path; (None, reason) for PEFT's path, reason "" when that
        path is the base layer alone (nothing to fuse)."""
        if self.disable_adapters or self.merged:
            return None, ""
        if args or any(v is not None for v in kwargs.values()):
            return None, f"extra forward arguments {sorted(kwargs)}"
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return None, ""
        if len(active) > 1:
            return None, "several active adapters in one layer"
        adapter = active[0]
        return (None, reason) if (reason := self._peft_ops_common_reason(x, [adapter])) else (adapter, None)

    def _peft_ops_mixed_route(self, x, args, kwargs):
        """(adapters the batch names, None) for the fused mixed-batch path; (None, reason) for
        PEFT's (reason "" where PEFT's path is what to run: the base alone, or PEFT's own error)."""
        names = kwargs["adapter_names"]
        if self.disable_adapters or self.merged:
            return None, ""   # PEFT gives the base output, or raises (adapter_names with merged adapters)
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or not isinstance(names, (list, tuple)) \
                or len(names) != x.shape[0] or not all(isinstance(n, str) for n in names):
            return None, ""   # PEFT's argument check raises its own error
        if args or any(v is not None for k, v in kwargs.items() if k != "adapter_names"):
            return None, f"extra forward arguments {sorted(k for k in kwargs if k != 'adapter_names')}"
        adapters = list(dict.fromkeys(n for n in names if n != "__base__" and n in self.lora_A))
        if not adapters:
            return None, ""
        reason = self._peft_ops_common_reason(x, adapters)
        if reason:
            return None, reason
        if self.training:
            ps = {self.lora_dropout[a].p if isinstance(self.lora_dropout[a], nn.Dropout) else 0.0 for a in adapters}
            if len(ps) > 1:
                return None, ("a training batch over adapters with different lora_dropout (the fused mixed-batch "
                              "op draws one dropout for all rows)")
        return adapters, None

    def _peft_ops_mixed_forward(self, x, names, adapters):
        cache = layer_cache(self)
        cache.keep_only(set(self.lora_A))
        idx = names_index(cache, names, adapters, x)
        mags = [self.lora_magnitude_vector[a].weight if a in self.lora_variant else None for a in adapters]
        dropout = self.lora_dropout[adapters[0]]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        return fused_lora_linear_multi(x, self.get_base_layer(), [self.lora_A[a].weight for a in adapters],
                                       [self.lora_B[a].weight for a in adapters],
                                       [self.scaling[a] for a in adapters], mags, idx, p, self.training,
                                       cache=cache, norm_keys=adapters)


_fused_classes = {}


def _fused_class(cls):
    fused = _fused_classes.get(cls)
    if fused is None:
        name = f"Fused{cls.__name__}"
        if name in globals():
            name = f"Fused_{cls.__module__.replace('.', '_')}_{cls.__name__}"
        fused = type(name, (FusedLoraForward, cls), {"__module__": __name__, "__qualname__": name})
        # A module-level name (the qualname, which pickle looks up) keeps converted models
        # picklable (torch.save of a whole model); `__name__` stays PEFT's, since `repr`,
        # `get_layer_status()` / `get_model_status()` and code that matches class names read it.
        fused.__name__ = cls.__name__
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
    A mixed batch (`model(..., adapter_names=[...])`, `generate(..., adapter_names=[...])`) runs
    fused too, one call over every adapter it names, LoRA and DoRA. At call time a converted layer
    still uses PEFT's path for what the fused op does not compute (several adapters active at once
    in one layer, hooks on the submodules PEFT would call, a base weight that requires grad, a
    training batch mixing adapters of different dropout) and warns once per reason.
    A scaling PEFT holds as a 0-d tensor (`prepare_model_for_compiled_hotswap`) is read as a
    tensor, so hot-swapping a compiled model keeps working. The converted class keeps PEFT's name
    (`repr`, `get_layer_status()`). Calling it again converts layers added since.
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
