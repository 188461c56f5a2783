"""Fused Triton kernels with PyTorch references (kernels_nbs/)."""
