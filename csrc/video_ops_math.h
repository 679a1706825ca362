// Per-element math shared by the CPU kernels (csrc/*.cpp) and the CUDA kernels (kernels/*.cu).
//
// Everything here is HOST_DEVICE_INLINE: the CPU tests exercise exactly the code the GPU runs.
// No torch or CUDA headers: kernels/*.cu include this file with plain nvcc.
#pragma once

#include <cmath>
#include <cstdint>
#include <bit>

#if defined(__CUDACC__)
#define HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE_INLINE inline
#endif

namespace depthvid {

// -- exponential ---------------------------------------------------------------------------
// On the GPU the hardware exp2; on the CPU a branch-free polynomial (relative error < 2e-7 on
// [-87, 88]) that the compiler vectorises in `omp simd` loops, where std::exp would stay scalar.
// Arguments below -87 give ~0 (not exactly 0); callers never pass -inf here.
HOST_DEVICE_INLINE float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x * 1.4426950408889634f);
#else
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // x = n * ln2 + r, |r| <= ln2 / 2; exp(x) = 2^n * exp(r). Adding and subtracting 1.5 * 2^23
  // rounds to the nearest integer without a libm call, so the loop stays vectorisable.
  const float n = (x * 1.4426950408889634f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 split hi + lo
  float p = 1.9875691500e-4f;  // Taylor-like minimax coefficients of exp(r)
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n as float bits
  return p * std::bit_cast<float>(bits);
#endif
}

// -- online softmax ------------------------------------------------------------------------
// A row's running state over key blocks: max m and sum l of exp(s - m). Folding in a block with
// row max `block_max` rescales the old sum (and the old output accumulator) by
// exp(m_old - m_new). m starts at -inf, so the first block rescales by exactly 0.
struct OnlineSoftmax {
  float max;
  float sum;
};

HOST_DEVICE_INLINE OnlineSoftmax online_softmax_init() { return {-INFINITY, 0.0f}; }

// Returns the factor that multiplies the old sum and old output; updates state.max.
HOST_DEVICE_INLINE float online_softmax_rescale(OnlineSoftmax& state, float block_max) {
  const float new_max = state.max > block_max ? state.max : block_max;
  const float factor = state.max == -INFINITY ? 0.0f : fast_exp(state.max - new_max);
  state.max = new_max;
  state.sum *= factor;
  return factor;
}

// log-sum-exp of the row: saved by the forward, turns a recomputed score into its probability.
HOST_DEVICE_INLINE float online_softmax_lse(const OnlineSoftmax& state) { return state.max + logf(state.sum); }

// p = exp(scale * q.k - lse): the probability the forward used, recomputed in the backward.
HOST_DEVICE_INLINE float softmax_prob(float scaled_score, float lse) { return fast_exp(scaled_score - lse); }

// dS = P * (dP - delta) with delta = rowsum(dO * O) = rowsum(P * dP): the softmax backward.
HOST_DEVICE_INLINE float softmax_score_grad(float prob, float prob_grad, float delta) {
  return prob * (prob_grad - delta);
}

// -- sparse-causal index arithmetic ---------------------------------------------------------
// Frame f attends to the tokens of frame 0, then of frame f-1 for f >= 2; frames 0 and 1 attend
// to frame 0 once (Tune-A-Video's duplicated frame-0 keys give the same softmax).
HOST_DEVICE_INLINE int sparse_causal_num_key_frames(int frame) { return frame >= 2 ? 2 : 1; }

HOST_DEVICE_INLINE int sparse_causal_key_frame(int frame, int segment) { return segment == 0 ? 0 : frame - 1; }

// The only query frame that reads key frame `key_frame` >= 1 (as its previous frame); frame 0's
// keys are read by every frame. Used to give gradients of frames >= 1 a single writer.
HOST_DEVICE_INLINE int sparse_causal_reader_of(int key_frame) { return key_frame + 1; }

// -- GroupNorm + SiLU prologue ----------------------------------------------------------------
HOST_DEVICE_INLINE float sigmoid(float y) { return 1.0f / (1.0f + fast_exp(-y)); }

HOST_DEVICE_INLINE float silu(float y) { return y * sigmoid(y); }

// d silu(y) / dy = sigmoid(y) * (1 + y * (1 - sigmoid(y)))
HOST_DEVICE_INLINE float silu_grad(float y) {
  const float s = sigmoid(y);
  return s * (1.0f + y * (1.0f - s));
}

// The normalised, affine input of the SiLU: y = (x - mean) * rstd * gamma + beta, written as one
// FMA with per-(frame, channel) scale = rstd * gamma and shift = beta - mean * scale.
HOST_DEVICE_INLINE float group_norm_scale(float rstd, float gamma) { return rstd * gamma; }
HOST_DEVICE_INLINE float group_norm_shift(float mean, float scale, float beta) { return beta - mean * scale; }

HOST_DEVICE_INLINE float group_norm_silu(float x, float scale, float shift) { return silu(x * scale + shift); }

// GroupNorm's input gradient for one element of a group of `count` elements, from
// dz = dL/d(normalised x) and the group sums sum(dz) and sum(dz * z):
// dx = rstd * (dz - mean(dz) - z * mean(dz * z)).
HOST_DEVICE_INLINE float group_norm_input_grad(float dz, float z, float rstd, float mean_dz, float mean_dz_z) {
  return rstd * (dz - mean_dz - z * mean_dz_z);
}

// -- epilogue ---------------------------------------------------------------------------------
// out = (conv + temb + residual) / output_scale, as diffusers' ResnetBlock2D.
HOST_DEVICE_INLINE float conv_epilogue(float conv, float temb, float residual, float inv_output_scale) {
  return (conv + temb + residual) * inv_output_scale;
}

}  // namespace depthvid
