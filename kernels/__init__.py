"""Triton int8 kernels and their fast CPU path (issue #3)."""
