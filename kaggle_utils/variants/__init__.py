"""Variants (orderings and quantization-aware recipes) behind one registry."""
