"""The one autograd-aware collective frame parallelism needs: all_to_all along dim 0.

torch.distributed.all_to_all_single does the communication (gloo on CPU, NCCL on CUDA, uneven
and empty splits included); this module only gives it a backward. torch ships the same adjoint
in torch.distributed.nn.functional.all_to_all_single, but that wrapper warns on every call
(deprecated) and its replacement lives in a private module.

Every rank must reach the backward of every all_to_all it ran in forward, in the same order:
callers feed the result into tensors every rank uses (an empty result included).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class AllToAllFunction(torch.autograd.Function):
    """Forward: rows ``send[sum(send_counts[:d]) : ... + send_counts[d]]`` go to rank d.
    Backward: the same exchange reversed (the adjoint of a permutation of rows is its inverse)."""

    @staticmethod
    def forward(ctx, send, send_counts, recv_counts, group):
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        return _exchange(send, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx, grad_received):
        return _exchange(grad_received, ctx.recv_counts, ctx.send_counts, ctx.group), None, None, None


def _exchange(send: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    received = send.new_empty((sum(recv_counts), *send.shape[1:]))
    dist.all_to_all_single(received, send.contiguous(), recv_counts, send_counts, group=group)
    return received


def all_to_all(send: torch.Tensor, send_counts: list[int], recv_counts: list[int], group=None) -> torch.Tensor:
    """Differentiable all_to_all along dim 0.

    Args:
        send: (sum(send_counts), ...) — rows for rank 0, then rank 1, ...
        send_counts: rows this rank sends to each rank (may be 0).
        recv_counts: rows this rank receives from each rank (must match the senders' counts).

    Returns:
        (sum(recv_counts), ...) — rows from rank 0, then rank 1, ...
    """
    return AllToAllFunction.apply(send, list(send_counts), list(recv_counts), group)
