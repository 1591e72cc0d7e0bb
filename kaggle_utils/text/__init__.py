"""Frames to token ids: the prompt template, truncation, the A/B swap, tokenizers, batching."""
