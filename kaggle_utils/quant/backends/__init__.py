"""Quantization backends behind one registry (`registry.py`): name -> quantize / load_base / load_artifact.

- `bnb`: bitsandbytes LLM.int8 / NF4 (``"bitsandbytes"``) and plain 16-bit weights (``"none"``);
- `int4`: the group-wise asymmetric INT4 of `kaggle_utils.quant.int4`, HQQ or RTN rounding (``"int4"``);
- `gptq`: GPTQ 8-/4-bit through llmcompressor, compressed-tensors checkpoint (``"gptq"``; optional extra).

Importing this package registers them. `artifacts.save_artifact` records the backend of the model it writes
in the manifest (`quant_backend`); `artifacts.load_artifact` dispatches on it.
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
