"""Symmetric INT8 quantization: per-channel weights, per-token activations, and the linear layers."""
