"""Triton kernel modules: one per kernel family, each with its launchers, autograd Function and reference."""
