"""peft_ops: fused Triton kernels for QLoRA / QDoRA layers on a 4-bit NF4 base.

Public API: `NF4Weight` (bitsandbytes-compatible 4-bit weight), `lora_linear` (fused LoRA/DoRA
linear with autograd), `lora_linear_multi` (the same for a batch whose rows use different
adapters), `dora_row_norm`, the no-grad caches `DoraNormCache` and `MultiAdapterCache`; modules
`NF4Linear` and `LoraLinear`; model surgery `add_lora`, `from_peft`, `merge_adapters`,
`unmerge_adapters`; PEFT-format adapter checkpoints `save_adapter`, `load_adapter`.
"""

from .nf4 import NF4Weight  # noqa: F401
from .functional import DoraNormCache, dora_row_norm, lora_linear  # noqa: F401
from .multi import MultiAdapterCache, lora_linear_multi  # noqa: F401
from .modules import LoraLinear, NF4Linear  # noqa: F401
from .convert import add_lora, from_peft, merge_adapters, unmerge_adapters  # noqa: F401
from .adapter_io import load_adapter, save_adapter  # noqa: F401
