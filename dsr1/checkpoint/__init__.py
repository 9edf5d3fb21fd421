"""Checkpoint I/O: the HF name table, FP8 block quantization, the loader and synthetic checkpoints."""
