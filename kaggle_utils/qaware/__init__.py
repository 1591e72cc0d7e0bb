"""Quantization-aware adapters: group-wise INT4, ApiQ-style init, QA-LoRA / QA-HiRA exact merges, QiD study.

Modules (import them directly; this package imports nothing heavy on its own):
- `int4`: the group-wise asymmetric INT4 format (plain-PyTorch dequantize, loadable on CPU / CUDA / TPU).
- `group_adapters`: adapters whose update is constant within a quantization group, folded into zero points.
- `apiq`: block-by-block activation-preserving initialisation of LoRA (+ clipping) on a quantized base.
- `loftq`: LoftQ initialisation (base and LoRA fitted to the 16-bit weights, `qaware.loftq_iterations` alternating
  steps; single-file or sharded checkpoints; CPU or CUDA).
- `variants`: the variants these add to the registry (`variant_registry.py`).
- `qid_study`: QiD against training tokens, the D^beta fit with a bootstrap interval.
"""
