"""Quantization methods and backends, and the inference artifact they produce."""
