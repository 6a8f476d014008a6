"""Plain, obviously-correct PyTorch definitions that the tests and the bench compare against.

Nothing here is fast or fused; everything here is meant to be read next to SPEC §2 and §3.
"""

from .lora import DORA_EPS, dense_weight, dora_row_norm, lora_linear  # noqa: F401
from .multi import lora_linear_multi  # noqa: F401
from .nf4 import nf4_dequantize, nf4_quantize  # noqa: F401
