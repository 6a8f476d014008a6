"""Save and load `LoraLinear` adapters in PEFT's checkpoint format (SPEC §3), so that PEFT loads
what we save and we load what PEFT saves.

A checkpoint is a directory with `adapter_config.json` and `adapter_model.safetensors` (safetensors
only: pickle-based `.bin` files can run code when loaded). Tensor keys are
`base_model.model.<module path>.lora_A.weight` `[r, K]`, `...lora_B.weight` `[N, r]` and, for DoRA,
`...lora_magnitude_vector` `[N]`, stored in fp32.
"""

import json
import os
from collections import Counter

import torch
from torch import nn

from .convert import add_lora, find_targets, lora_layers, pattern_value
from .modules import check_adapter_args, check_alpha, check_rank

__all__ = ["save_adapter", "load_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_SUFFIXES = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "lora_magnitude_vector"}

# Config fields whose non-default values change the computation in ways LoraLinear does not model.
_UNSUPPORTED = {
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "trainable_token_indices": (None, {}, []),
    "target_parameters": (None, []),
    "use_bdlora": (None, False),
    "use_qalora": (None, False),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "velora_config": (None,),
    "monteclora_config": (None,),
    "kasa_config": (None,),
    "layer_replication": (None,),
}


def _single(values, what):
    values = set(values)
    if len(values) != 1:
        raise ValueError(f"save_adapter: PEFT's config holds one {what} for all layers, the model mixes {sorted(values)}")
    return values.pop()


def save_adapter(model, save_directory, *, base_model_name_or_path=None):
    """Write the `LoraLinear` adapters of `model` as a PEFT checkpoint in `save_directory`.

    `PeftModel.from_pretrained(base_model, save_directory)` loads it onto the same base model and
    gives the same outputs. Per-layer ranks and alphas are written as `rank_pattern` /
    `alpha_pattern` entries keyed by full module names; `target_modules` lists the full module names.
    Raises ValueError if the model has no adapter, or mixes settings PEFT's config cannot express
    (DoRA on some layers only, different dropouts or rsLoRA flags).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a path, got {type(save_directory).__name__}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no peft_ops LoraLinear layer to save (for a PEFT model use save_pretrained)")
    merged = [n for n, m in layers if m.merged]
    if merged:
        raise ValueError(f"save_adapter: adapters are merged in {', '.join(merged)}; unmerge them first")
    use_dora = _single((m.use_dora for _, m in layers), "use_dora")
    use_rslora = _single((m.use_rslora for _, m in layers), "use_rslora")
    dropout = _single((m.lora_dropout for _, m in layers), "lora_dropout")
    fan_in_fan_out = _single((m.fan_in_fan_out for _, m in layers), "fan_in_fan_out (Conv1D and Linear bases)")
    r = Counter(m.r for _, m in layers).most_common(1)[0][0]
    alpha = Counter(m.lora_alpha for _, m in layers).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(n for n, _ in layers),
        "rank_pattern": {n: m.r for n, m in layers if m.r != r},
        "alpha_pattern": {n: m.lora_alpha for n, m in layers if m.lora_alpha != alpha},
        "use_dora": use_dora,
        "use_rslora": use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }
    tensors = {}
    for name, m in layers:
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()
        if m.use_dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach().float().cpu().contiguous()

    from safetensors.torch import save_file

    os.makedirs(save_directory, exist_ok=True)
    with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})


def _read_checkpoint(path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a directory path, got {type(path).__name__}")
    config_path = os.path.join(path, CONFIG_NAME)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(config_path):
        raise ValueError(f"path: no {CONFIG_NAME} in {path}")
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise ValueError(f"path: {path} holds adapter_model.bin; only safetensors checkpoints are loaded")
        raise ValueError(f"path: no {WEIGHTS_NAME} in {path}")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    _check_config(config, config_path)
    from safetensors.torch import load_file

    tensors = load_file(weights_path)
    for key, tensor in tensors.items():
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{weights_path}: {key} holds {tensor.dtype} values; LoRA weights are floats")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{weights_path}: {key} holds NaN or Inf values")
    return config, tensors


_DEFAULTS = {"lora_dropout": 0.0, "use_dora": False, "use_rslora": False}


def _setting(config, key):
    """config[key], or PEFT's default when the key is absent or null."""
    value = config.get(key)
    return _DEFAULTS[key] if value is None else value


def _check_config(config, config_path):
    """Raise ValueError / TypeError naming `config_path` and the key for a config LoraLinear cannot
    be built from, before anything is created or copied."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{CONFIG_NAME}: peft_type {config.get('peft_type')!r} is not 'LORA'")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{CONFIG_NAME}: bias={config['bias']!r} is not supported (only 'none')")
    for key, defaults in _UNSUPPORTED.items():
        value = config.get(key)
        if value not in defaults and not (value is None and None in defaults):
            raise ValueError(f"{CONFIG_NAME}: {key}={value!r} is not supported by peft_ops")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ValueError(f"{config_path}: no {key!r} key (PEFT's LoraConfig writes it)")
    where = f"{config_path}: "
    check_adapter_args(config["r"], config["lora_alpha"], _setting(config, "lora_dropout"),
                       _setting(config, "use_dora"), _setting(config, "use_rslora"), where)
    for key, check in (("rank_pattern", check_rank), ("alpha_pattern", check_alpha)):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise TypeError(f"{where}{key} must be an object, got {type(patterns).__name__}")
        for name, value in patterns.items():
            check(value, f"{where}{key}[{name!r}]")


def _group_by_module(tensors):
    grouped = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"checkpoint key {key!r} does not start with {PREFIX!r}")
        rest = key[len(PREFIX):]
        for suffix, field in _SUFFIXES.items():
            if rest.endswith("." + suffix):
                grouped.setdefault(rest[: -len(suffix) - 1], {})[field] = tensor
                break
        else:
            raise ValueError(f"checkpoint key {key!r} is not a LoRA tensor (lora_A.weight, lora_B.weight, "
                             "lora_magnitude_vector)")
    return grouped


def _expected(config, name, in_features, out_features):
    r = pattern_value(config.get("rank_pattern"), name, config["r"])
    shapes = {"lora_A": (r, in_features), "lora_B": (out_features, r)}
    if _setting(config, "use_dora"):
        shapes["lora_magnitude_vector"] = (out_features,)
    return r, shapes


def load_adapter(model, path):
    """Load a PEFT LoRA / DoRA checkpoint (a directory, as `save_pretrained` writes) into `model`.

    If `model` has no `LoraLinear` yet, the layers are created first from the checkpoint's config
    (`target_modules`, r, lora_alpha, rank/alpha patterns, use_dora, use_rslora, lora_dropout) with
    `add_lora`. Otherwise its existing layers must be exactly the checkpoint's modules, with the same
    scaling. Every name and shape is checked before anything is created or copied; a mismatch
    raises ValueError naming the module. Returns `model`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config, tensors = _read_checkpoint(path)
    grouped = _group_by_module(tensors)
    existing = dict(lora_layers(model))
    use_dora = _setting(config, "use_dora")

    if existing:
        modules = {n: (m.in_features, m.out_features) for n, m in existing.items()}
        for name, m in existing.items():
            r, _ = _expected(config, name, m.in_features, m.out_features)
            alpha = pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
            rslora = _setting(config, "use_rslora")
            if m.use_dora != use_dora:
                raise ValueError(f"module {name}: the checkpoint has use_dora={use_dora}, the layer {m.use_dora}")
            if (m.r, m.lora_alpha, m.use_rslora) != (r, alpha, rslora):
                raise ValueError(f"module {name}: the checkpoint has r={r}, lora_alpha={alpha}, use_rslora={rslora}; "
                                 f"the layer has r={m.r}, lora_alpha={m.lora_alpha}, use_rslora={m.use_rslora}")
    else:
        targets = config.get("target_modules")
        if not targets:
            raise ValueError(f"{CONFIG_NAME}: target_modules is empty")
        if config.get("exclude_modules"):
            raise ValueError(f"{CONFIG_NAME}: exclude_modules is not supported when creating layers")
        from .modules import base_in_out_features

        modules = {n: base_in_out_features(m) for n, m in find_targets(model, targets)}

    missing, shape_errors = [], []
    for name, (in_features, out_features) in modules.items():
        r, shapes = _expected(config, name, in_features, out_features)
        found = grouped.get(name, {})
        for field, shape in shapes.items():
            if field not in found:
                missing.append(f"{PREFIX}{name}.{'lora_magnitude_vector' if field == 'lora_magnitude_vector' else field + '.weight'}")
            elif tuple(found[field].shape) != shape:
                shape_errors.append(f"module {name}: {field} has shape {tuple(found[field].shape)} in the checkpoint, "
                                    f"the layer expects {shape} (r={r})")
        extra = set(found) - set(shapes)
        if extra:
            shape_errors.append(f"module {name}: unexpected {sorted(extra)} in the checkpoint "
                                f"(use_dora={use_dora} in its config)")
    unexpected = sorted(set(grouped) - set(modules))
    if unexpected:
        raise ValueError(f"checkpoint has LoRA weights for module(s) the model has no adapter on: {', '.join(unexpected)}")
    if shape_errors:
        raise ValueError("; ".join(shape_errors))
    if missing:
        raise ValueError(f"checkpoint is missing key(s): {', '.join(missing)}")

    if not existing:
        add_lora(model, list(modules), r=config["r"], lora_alpha=config["lora_alpha"],
                 lora_dropout=_setting(config, "lora_dropout"), use_dora=use_dora,
                 use_rslora=_setting(config, "use_rslora"),
                 rank_pattern=config.get("rank_pattern") or None, alpha_pattern=config.get("alpha_pattern") or None)
        existing = dict(lora_layers(model))
    with torch.no_grad():
        for name, found in grouped.items():
            layer = existing[name]
            for field, tensor in found.items():
                param = getattr(layer, field)
                param.copy_(tensor.to(device=param.device, dtype=param.dtype))
    return model
