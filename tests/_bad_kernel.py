"""A deliberately bad kernel for test_gpu_binaries.py: a matrix product by scalar loads through
runtime strides and elementwise multiply-adds (no tl.dot). The static checks must reject it."""
import torch
import triton
import triton.language as tl

from depthvid.triton_kernels._common import Launch


@triton.jit
def _scalar_matmul_kernel(a_ptr, b_ptr, c_ptr, size, stride_a, stride_b, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k in range(0, size):
        a = tl.load(a_ptr + rows * stride_a + k * 3, mask=rows < size, other=0.0)
        b = tl.load(b_ptr + k * stride_b + cols * 3, mask=cols < size, other=0.0)
        acc += a.to(tl.float32)[:, None] * b.to(tl.float32)[None, :]
    tl.store(c_ptr + rows[:, None] * BLOCK + cols[None, :], acc.to(c_ptr.dtype.element_ty))


def gpu_launches() -> list[Launch]:
    a, b, c = (torch.empty(4096, dtype=torch.float16, device="meta") for _ in range(3))
    return [Launch(_scalar_matmul_kernel, (4,), (a, b, c, 100, 301, 301), dict(BLOCK=32, num_warps=4), "scalar-loads")]
