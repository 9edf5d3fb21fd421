"""The DeepSeek-V3/R1 network, written for one device; expert parallelism enters only through the MoE dispatcher."""
