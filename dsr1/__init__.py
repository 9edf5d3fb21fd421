"""dsr1: a from-scratch PyTorch reference implementation of DeepSeek-R1 (the DeepSeek-V3 architecture)."""

from dsr1.checkpoint.loader import load_model
from dsr1.config import ModelConfig
from dsr1.parallel.placement import expert_placement

__all__ = ["ModelConfig", "expert_placement", "load_model"]
