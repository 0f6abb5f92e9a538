"""Shared runtime: the pipeline registry, the GPU gate and device helpers."""
