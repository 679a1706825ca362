// Temporal attention on CUDA, on the native (batch*frames, heads, tokens, head_dim) layout: one warp
// per (video, head, token) gathers the F strided rows (lanes over head_dim, fp32), does the F x F
// softmax with the shared math (csrc/video_ops_math.h) and writes the F output rows in place.
// The products are F x F x head_dim (F <= 32): too small for tensor-core tiles, FMA + warp
// shuffles instead. The backward recomputes P from lse; every gradient of a token is its warp's.
#include "attention_tiles.cuh"
#include "launchers.h"
#include "video_ops_math.h"

namespace depthvid::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kPerLane = (kMaxHeadDim + 31) / 32;  // head_dim elements per lane

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T>
__device__ __forceinline__ void load_row(float (&dst)[kPerLane], const T* src, int head_dim, int lane) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    dst[i] = d < head_dim ? to_float(src[d]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store_row(T* dst, const float (&src)[kPerLane], int head_dim, int lane, float factor) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < head_dim) dst[d] = from_float<T>(src[i] * factor);
  }
}

__device__ __forceinline__ float dot(const float (&a)[kPerLane], const float (&b)[kPerLane]) {
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) sum += a[i] * b[i];
  return warp_sum(sum);
}

struct TokenRows {  // offsets of the F rows of one (video, head, token)
  int64_t first, frame_step;
};

__device__ __forceinline__ bool token_of_warp(const AttentionShape& shape, int64_t& video, int64_t& head,
                                              int64_t& token) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32;
  token = index % shape.tokens;
  head = (index / shape.tokens) % shape.heads;
  video = index / (shape.tokens * shape.heads);
  return video < shape.rows / shape.num_frames;
}

__device__ __forceinline__ TokenRows rows_of(const AttentionStrides& s, int64_t video, int64_t head, int64_t token,
                                             int frames) {
  return {video * frames * s.row + head * s.head + token * s.token, s.row};
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    temporal_attn_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                             T* __restrict__ out, float* __restrict__ lse, AttentionShape shape,
                             AttentionStrides q_strides, AttentionStrides kv_strides) {
  int64_t video, head, token;
  if (!token_of_warp(shape, video, head, token)) return;
  const int lane = threadIdx.x % 32, frames = shape.num_frames, head_dim = static_cast<int>(shape.head_dim);
  const TokenRows qr = rows_of(q_strides, video, head, token, frames), kr = rows_of(kv_strides, video, head, token, frames);
  for (int f = 0; f < frames; ++f) {
    float qf[kPerLane], acc[kPerLane] = {}, scores[kMaxTemporalFrames];
    load_row(qf, q + qr.first + f * qr.frame_step, head_dim, lane);
    float row_max = -INFINITY;
    for (int g = 0; g < frames; ++g) {
      float kg[kPerLane];
      load_row(kg, k + kr.first + g * kr.frame_step, head_dim, lane);
      scores[g] = shape.scale * dot(qf, kg);
      row_max = fmaxf(row_max, scores[g]);
    }
    OnlineSoftmax state = online_softmax_init();
    online_softmax_rescale(state, row_max);
    for (int g = 0; g < frames; ++g) {
      const float p = fast_exp(scores[g] - state.max);
      state.sum += p;
      float vg[kPerLane];
      load_row(vg, v + kr.first + g * kr.frame_step, head_dim, lane);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] += p * vg[i];
    }
    // out is contiguous (q may be a strided view: its strides only address q)
    const int64_t out_row = (((video * frames + f) * shape.heads + head) * shape.tokens + token) * shape.head_dim;
    store_row(out + out_row, acc, head_dim, lane, 1.0f / state.sum);
    if (lane == 0) lse[((video * frames + f) * shape.heads + head) * shape.tokens + token] = online_softmax_lse(state);
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    temporal_attn_bwd_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
                             const T* __restrict__ v, const float* __restrict__ lse, T* __restrict__ dq,
                             T* __restrict__ dk, T* __restrict__ dv, AttentionShape shape, AttentionStrides q_strides,
                             AttentionStrides kv_strides, AttentionStrides grad_strides) {
  int64_t video, head, token;
  if (!token_of_warp(shape, video, head, token)) return;
  const int lane = threadIdx.x % 32, frames = shape.num_frames, head_dim = static_cast<int>(shape.head_dim);
  const TokenRows qr = rows_of(q_strides, video, head, token, frames), kr = rows_of(kv_strides, video, head, token, frames);
  const TokenRows gr = rows_of(grad_strides, video, head, token, frames);
  // dq, dk, dv are contiguous (batch*frames, heads, tokens, head_dim)
  const int64_t grad_first = ((video * frames * shape.heads + head) * shape.tokens + token) * shape.head_dim;
  const int64_t grad_step = shape.heads * shape.tokens * shape.head_dim;
  // dQ_f = scale * sum_g dS[f,g] K_g; keeps delta_f = sum_g P[f,g] dP[f,g] for dK/dV below
  float deltas[kMaxTemporalFrames];
  for (int f = 0; f < frames; ++f) {
    float qf[kPerLane], dof[kPerLane], dq_acc[kPerLane] = {}, probs[kMaxTemporalFrames], prob_grads[kMaxTemporalFrames];
    load_row(qf, q + qr.first + f * qr.frame_step, head_dim, lane);
    load_row(dof, grad_out + gr.first + f * gr.frame_step, head_dim, lane);
    const float row_lse = lse[((video * frames + f) * shape.heads + head) * shape.tokens + token];
    float delta = 0.0f;
    for (int g = 0; g < frames; ++g) {
      float kg[kPerLane], vg[kPerLane];
      load_row(kg, k + kr.first + g * kr.frame_step, head_dim, lane);
      load_row(vg, v + kr.first + g * kr.frame_step, head_dim, lane);
      probs[g] = softmax_prob(shape.scale * dot(qf, kg), row_lse);
      prob_grads[g] = dot(dof, vg);
      delta += probs[g] * prob_grads[g];
    }
    deltas[f] = delta;
    for (int g = 0; g < frames; ++g) {
      float kg[kPerLane];
      load_row(kg, k + kr.first + g * kr.frame_step, head_dim, lane);
      const float ds = shape.scale * softmax_score_grad(probs[g], prob_grads[g], delta);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) dq_acc[i] += ds * kg[i];
    }
    store_row(dq + grad_first + f * grad_step, dq_acc, head_dim, lane, 1.0f);
  }
  // dK_g and dV_g accumulate over the query frames f: loop g outside, f inside (P recomputed per pair).
  for (int g = 0; g < frames; ++g) {
    float kg[kPerLane], vg[kPerLane], dk_acc[kPerLane] = {}, dv_acc[kPerLane] = {};
    load_row(kg, k + kr.first + g * kr.frame_step, head_dim, lane);
    load_row(vg, v + kr.first + g * kr.frame_step, head_dim, lane);
    for (int f = 0; f < frames; ++f) {
      float qf[kPerLane], dof[kPerLane];
      load_row(qf, q + qr.first + f * qr.frame_step, head_dim, lane);
      load_row(dof, grad_out + gr.first + f * gr.frame_step, head_dim, lane);
      const float row_lse = lse[((video * frames + f) * shape.heads + head) * shape.tokens + token];
      const float p = softmax_prob(shape.scale * dot(qf, kg), row_lse);
      const float ds = shape.scale * softmax_score_grad(p, dot(dof, vg), deltas[f]);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        dv_acc[i] += p * dof[i];
        dk_acc[i] += ds * qf[i];
      }
    }
    store_row(dk + grad_first + g * grad_step, dk_acc, head_dim, lane, 1.0f);
    store_row(dv + grad_first + g * grad_step, dv_acc, head_dim, lane, 1.0f);
  }
}

int64_t blocks_for(const AttentionShape& shape) {
  return (shape.rows / shape.num_frames * shape.heads * shape.tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
}

}  // namespace

void temporal_attn_fwd(int dtype, const void* q, const void* k, const void* v, void* out, float* lse,
                       AttentionShape shape, AttentionStrides q_strides, AttentionStrides kv_strides, void* stream) {
  auto launch = [&](auto type_tag) {
    using T = decltype(type_tag);
    temporal_attn_fwd_kernel<T><<<blocks_for(shape), kWarpsPerBlock * 32, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(out), lse,
        shape, q_strides, kv_strides);
  };
  if (dtype == 0) launch(__half{});
  else launch(__nv_bfloat16{});
}

void temporal_attn_bwd(int dtype, const void* grad_out, const void* q, const void* k, const void* v, const float* lse,
                       void* dq, void* dk, void* dv, AttentionShape shape, AttentionStrides q_strides,
                       AttentionStrides kv_strides, AttentionStrides grad_strides, void* stream) {
  auto launch = [&](auto type_tag) {
    using T = decltype(type_tag);
    temporal_attn_bwd_kernel<T><<<blocks_for(shape), kWarpsPerBlock * 32, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(grad_out), static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
        lse, static_cast<T*>(dq), static_cast<T*>(dk), static_cast<T*>(dv), shape, q_strides, kv_strides,
        grad_strides);
  };
  if (dtype == 0) launch(__half{});
  else launch(__nv_bfloat16{});
}

}  // namespace depthvid::cuda
