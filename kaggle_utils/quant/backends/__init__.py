"""Quantization backends behind one registry (`registry.py`): bitsandbytes and plain 16-bit (`bnb`),
group-wise INT4 (`int4`), GPTQ (`gptq`, optional extra). Importing this package registers them; a new
backend is one module ending in `register_backend(...)` plus its name in the import line below.
"""

from kaggle_utils.quant.backends import bnb, gptq, int4
from kaggle_utils.quant.backends.registry import (
    BACKEND_FIELD,
    BACKENDS,
    LoadOptions,
    QuantBackend,
    backend_for_manifest,
    backend_for_model,
    get_backend,
    register_backend,
)

__all__ = [
    "BACKEND_FIELD",
    "BACKENDS",
    "LoadOptions",
    "QuantBackend",
    "backend_for_manifest",
    "backend_for_model",
    "get_backend",
    "register_backend",
    "bnb",
    "gptq",
    "int4",
]
