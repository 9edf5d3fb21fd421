"""The engine: loading a model for a run (one process or expert-parallel), the generation loop, decode steps replayed from CUDA graphs."""
