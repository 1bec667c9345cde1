"""Lean model definitions that load HuggingFace checkpoints (one module per family) and the loading helpers."""
