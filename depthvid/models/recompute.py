"""Selective gradient checkpointing: keep the outputs that are dear to recompute, recompute the rest.

diffusers checkpoints each resnet and transformer block, and by default recomputes all of its
forward in backward: at paper scale (8 x 512x512, full-size SD2-depth) that is 5.6 of the step's
22.6 TFLOP. Most of it is a few ops whose outputs are small next to their cost: self-attention
(4 x keys FLOPs per output element: 16,384 at 64x64 latents) and 3x3 convs (18 x input channels:
11,520 and up from 640 channels). Linears (2 x in-features: 640 for most of them at 64x64
latents, where most activations are) and the norms and activations between them are cheap per
element kept, and they are what makes a block's activations large (the feed-forward's hidden
layer alone is 8x a block's input), so they are not counted. An attention or conv output is kept
when recomputing it costs at least :data:`KEEP_FLOPS_PER_ELEMENT`, through torch's selective
checkpointing (``torch.utils.checkpoint.create_selective_checkpoint_contexts``).

Measured at paper scale, fp32, 2 CPU cores (benchmarks/README.md): the model-only step's CPU
time 460-486 s -> 402 s, its peak 6.74 -> 7.43 GiB.

Only ops that pass through the dispatcher are seen: aten's convs and SDPA kernels (CPU and CUDA)
and depthvid's sparse-causal forwards (depthvid._C's, and the Triton kernel's, registered as an op
for this). The Triton pseudo-3D conv is launched from an autograd Function and is recomputed.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

aten = torch.ops.aten

# an output is kept when its recomputation costs at least this many FLOPs per element. For
# SD2-depth at 8 x 512x512: the self-attention at 64x64 latents and the 3x3 convs with 640 input
# channels or more; no linear, norm or 1x1 conv
KEEP_FLOPS_PER_ELEMENT = 8192

# SDPA kernels: (q, k, v, ...) -> out, ...; 2 matmuls of keys x head_dim per output element
_ATTENTION_OPS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}

# depthvid's sparse-causal forwards, (q, k, v, num_frames, scale) -> out, lse: depthvid._C's
# (CPU and CUDA) and the Triton kernel's
_SPARSE_CAUSAL_OPS = {"depthvid.sparse_causal_attn_fwd.default", "depthvid_triton.sparse_causal_attn_fwd.default"}


def recompute_flops_per_element(op, args) -> float:
    """FLOPs per output element of recomputing ``op(*args)``; 0 for ops not worth counting."""
    if op in _ATTENTION_OPS:
        q, k, v = args[:3]
        return 4.0 * k.shape[-2] * q.shape[-1] / v.shape[-1]  # 2 matmuls: scores, then P @ V
    if op is aten.convolution.default and not args[6]:  # not transposed
        weight = args[1]
        return 2.0 * weight[0].numel()  # in_channels / groups x kernel taps
    if str(op) in _SPARSE_CAUSAL_OPS:
        return 4.0 * 2 * args[1].shape[-2]  # keys: frame 0's tokens and frame f-1's
    return 0.0


def keep_dear_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The selective-checkpointing policy: keep what costs >= KEEP_FLOPS_PER_ELEMENT to recompute."""
    if recompute_flops_per_element(op, args) >= KEEP_FLOPS_PER_ELEMENT:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint(module, *args):
    """diffusers' ``gradient_checkpointing_func``: non-reentrant checkpointing with the policy."""
    return checkpoint(module.__call__, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, keep_dear_outputs))
