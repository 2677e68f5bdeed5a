"""Triton kernels, launchers and launch heuristics. Imported lazily: only when a kernel is needed."""
