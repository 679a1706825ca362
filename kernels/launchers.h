// Launchers of the CUDA kernels in kernels/*.cu: plain C++ signatures (raw pointers, sizes,
// strides in elements, the stream as void*), so the host code in csrc/cuda/ includes no CUDA
// headers from here and the .cu files include no torch headers (CI compiles them with plain nvcc).
// Attention inputs are (batch*frames, heads, tokens, head_dim) with unit head_dim stride and any other
// strides; outputs (out, dq, dk, dv) are contiguous, as the ops' fake kernels declare; lse and delta
// are contiguous fp32 (batch*frames, heads, tokens). dtype: 0 = fp16, 1 = bf16.
// The launchers do not check for launch errors: the caller does (C10_CUDA_KERNEL_LAUNCH_CHECK).
#pragma once

#include <cstdint>

namespace depthvid::cuda {

struct AttentionShape {
  int64_t rows, heads, tokens, head_dim;
  int num_frames;
  float scale;
};

struct AttentionStrides {  // in elements, for one (rows, heads, tokens) tensor with unit head_dim stride
  int64_t row, head, token;
};

// Supported head dims: any <= 160 (padded to 48, 64, 80, 96, 128 or 160 inside the kernels).
constexpr int64_t kMaxHeadDim = 160;
constexpr int kMaxTemporalFrames = 32;

// out: contiguous; q_strides address q only.
void sparse_causal_attn_fwd(int dtype, const void* q, const void* k, const void* v, void* out, float* lse,
                            AttentionShape shape, AttentionStrides q_strides, AttentionStrides kv_strides,
                            void* stream);
// out and grad_out share strides; dq, dk, dv are contiguous. delta is scratch (rows*heads*tokens fp32).
void sparse_causal_attn_bwd(int dtype, const void* grad_out, const void* q, const void* k, const void* v,
                            const void* out, const float* lse, float* delta, void* dq, void* dk, void* dv,
                            AttentionShape shape, AttentionStrides q_strides, AttentionStrides kv_strides,
                            AttentionStrides out_strides, void* stream);

void temporal_attn_fwd(int dtype, const void* q, const void* k, const void* v, void* out, float* lse,
                       AttentionShape shape, AttentionStrides q_strides, AttentionStrides kv_strides, void* stream);
void temporal_attn_bwd(int dtype, const void* grad_out, const void* q, const void* k, const void* v, const float* lse,
                       void* dq, void* dk, void* dv, AttentionShape shape, AttentionStrides q_strides,
                       AttentionStrides kv_strides, AttentionStrides grad_strides, void* stream);

// Pseudo-3D conv prologue/epilogue. x is (B, C, F, H, W) with strides; folded tensors are
// contiguous (B*F, C, H, W). dtype: 0 = fp16, 1 = bf16, 2 = fp32.
struct VideoShape {
  int64_t batch, channels, frames, height, width;
};
struct VideoStrides {
  int64_t b, c, f, h, w;
};

void group_norm_silu_fwd(int dtype, const void* x, VideoShape shape, VideoStrides strides, int groups,
                         const float* gamma, const float* beta, float eps, void* out, float* mean, float* rstd,
                         void* stream);
// dgamma_rows/dbeta_rows: (B*F, C) fp32 partial sums, reduced by the host.
void group_norm_silu_bwd(int dtype, const void* grad, const void* x, VideoShape shape, VideoStrides strides, int groups,
                         const float* gamma, const float* beta, const float* mean, const float* rstd, void* dx,
                         float* dgamma_rows, float* dbeta_rows, void* stream);
// conv (B*F, C, H, W) contiguous -> out (B, C, F, H, W) contiguous; temb (B, C) or (B, F, C) contiguous
// or null; residual (B, C, F, H, W) with strides or null.
void conv_epilogue(int dtype, const void* conv, VideoShape out_shape, const void* temb, bool temb_per_frame,
                   const void* residual, VideoStrides residual_strides, float inv_output_scale, void* out,
                   void* stream);

}  // namespace depthvid::cuda
