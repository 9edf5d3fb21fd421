"""dsr1: a from-scratch PyTorch reference implementation of DeepSeek-R1 (the DeepSeek-V3 architecture)."""

from dsr1.config import GenerationConfig, ModelConfig, ParallelConfig
from dsr1.engine.load import load_model
from dsr1.parallel.placement import expert_placement

__all__ = ["GenerationConfig", "ModelConfig", "ParallelConfig", "expert_placement", "load_model"]
