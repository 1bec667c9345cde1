"""Tokenizers, one module per kind, matching transformers' tokenizer classes."""
