"""PyTorch reference implementations: the CPU fallback and the test oracle (one home per op)."""
