"""Names of an inference artifact's parts: the one place `manifest.json` and the folder names are spelled.
A leaf module (no torch), so light readers and the backends can name the parts without importing `artifacts`.
"""

from __future__ import annotations

MANIFEST_NAME = "manifest.json"
LAYOUT_VERSION = 1
MODEL_DIR, ADAPTER_DIR, MERGED_DIR, TOKENIZER_DIR = "model", "adapter", "merged", "tokenizer"
# The manifest field naming the quantization backend that wrote (and loads) the model.
BACKEND_FIELD = "quant_backend"
