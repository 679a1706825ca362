"""The Triton kernels, one file per op: kernels, launcher and autograd.Function.

They run compiled on CUDA and on CPU tensors under TRITON_INTERPRET=1. The CUDA C++ device code of
the depthvid._C extension lives in the top-level kernels/ folder (host side in csrc/).
"""
