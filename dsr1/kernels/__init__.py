"""Fast paths behind one interface: the Triton W8A16 kernel, the routing kernel, FP8 matmul backends; each computes what the plain PyTorch path in dsr1/model computes."""
