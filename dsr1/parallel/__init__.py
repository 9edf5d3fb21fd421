"""Expert parallelism: process groups, expert placement and the MoE token dispatchers."""
