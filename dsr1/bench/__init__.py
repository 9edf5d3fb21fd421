"""Benchmarks: dsr1 against transformers on the same random weights, and the memory-bandwidth floor."""
