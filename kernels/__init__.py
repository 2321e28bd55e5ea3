"""The int8 products: Triton kernels for CUDA, torch paths and our C kernel for CPUs, the plain-torch
references, and the dispatcher that picks a path per machine (installed as lora_core.kernels)."""
