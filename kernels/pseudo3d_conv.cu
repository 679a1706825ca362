// The pseudo-3D conv's prologue and epilogue on CUDA (the conv itself is ATen's cuDNN conv2d):
// the same per-element math as the CPU twin csrc/pseudo3d_conv.cpp (csrc/video_ops_math.h).
//
// group_norm_silu_fwd   one block per (b*F + f, group): mean, centred variance (block reductions
//                       in fp32), then silu(x * scale + shift) into the folded (B*F, C, H, W) layout.
// group_norm_silu_bwd   one block per (b*F + f, group): sums of dz and dz*z, per-channel partial
//                       dgamma/dbeta of this frame (reduced over frames by the host), then dx.
// conv_epilogue         elementwise (conv + temb + residual) / output_scale, unfolding the frames.
#include "attention_tiles.cuh"
#include "launchers.h"
#include "video_ops_math.h"

namespace depthvid::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float block_sum(float x, float* scratch) {  // scratch: kThreads / 32 floats
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

struct GroupView {  // the elements of one (frame, group): channel-in-group c, pixel p
  int64_t base;
  VideoStrides s;
  int width, pixels;  // 32-bit in-group indices: 64-bit division is a call that makes ptxas spill
  __device__ int64_t offset(int c, int p) const { return base + c * s.c + (p / width) * s.h + (p % width) * s.w; }
};

__device__ __forceinline__ GroupView group_view(const VideoShape& shape, const VideoStrides& s, int groups,
                                                int64_t frame_row, int group) {
  const int64_t b = frame_row / shape.frames, f = frame_row % shape.frames;
  const int64_t c0 = group * (shape.channels / groups);
  return {b * s.b + f * s.f + c0 * s.c, s, static_cast<int>(shape.width), static_cast<int>(shape.height * shape.width)};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    group_norm_silu_fwd_kernel(const T* __restrict__ x, VideoShape shape, VideoStrides strides, int groups,
                               const float* __restrict__ gamma, const float* __restrict__ beta, float eps,
                               T* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd) {
  __shared__ float scratch[kThreads / 32];
  const int64_t frame_row = blockIdx.x;
  const int group = blockIdx.y, group_size = static_cast<int>(shape.channels / groups);
  const GroupView view = group_view(shape, strides, groups, frame_row, group);
  const int count = group_size * view.pixels;
  float sum = 0.0f;
  for (int e = threadIdx.x; e < count; e += kThreads) sum += to_float(x[view.offset(e / view.pixels, e % view.pixels)]);
  const float group_mean = block_sum(sum, scratch) / count;
  float sq = 0.0f;
  for (int e = threadIdx.x; e < count; e += kThreads) {
    const float centred = to_float(x[view.offset(e / view.pixels, e % view.pixels)]) - group_mean;
    sq += centred * centred;
  }
  const float group_rstd = rsqrtf(block_sum(sq, scratch) / count + eps);
  if (threadIdx.x == 0) {
    mean[frame_row * groups + group] = group_mean;
    rstd[frame_row * groups + group] = group_rstd;
  }
  const int64_t c0 = group * group_size;
  for (int e = threadIdx.x; e < count; e += kThreads) {
    const int c = e / view.pixels, p = e % view.pixels;
    const float scale = group_norm_scale(group_rstd, gamma[c0 + c]);
    const float shift = group_norm_shift(group_mean, scale, beta[c0 + c]);
    out[(frame_row * shape.channels + c0 + c) * view.pixels + p] =
        from_float<T>(group_norm_silu(to_float(x[view.offset(c, p)]), scale, shift));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    group_norm_silu_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ x, VideoShape shape,
                               VideoStrides strides, int groups, const float* __restrict__ gamma,
                               const float* __restrict__ beta, const float* __restrict__ mean,
                               const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ dgamma_rows,
                               float* __restrict__ dbeta_rows) {
  __shared__ float scratch[kThreads / 32];
  const int64_t frame_row = blockIdx.x;
  const int group = blockIdx.y, group_size = static_cast<int>(shape.channels / groups);
  const GroupView view = group_view(shape, strides, groups, frame_row, group);
  const float group_mean = mean[frame_row * groups + group], group_rstd = rstd[frame_row * groups + group];
  const int64_t c0 = group * group_size;
  // -- per channel of the group: dgamma, dbeta partials; group sums of dz and dz * z --
  float sum_dz = 0.0f, sum_dz_z = 0.0f;
  for (int c = 0; c < group_size; ++c) {
    const float scale = group_norm_scale(group_rstd, gamma[c0 + c]);
    const float shift = group_norm_shift(group_mean, scale, beta[c0 + c]);
    float dgamma = 0.0f, dbeta = 0.0f;
    for (int p = threadIdx.x; p < view.pixels; p += kThreads) {
      const float xv = to_float(x[view.offset(c, p)]);
      const float dy = to_float(grad[(frame_row * shape.channels + c0 + c) * view.pixels + p]) * silu_grad(xv * scale + shift);
      const float z = (xv - group_mean) * group_rstd;
      dgamma += dy * z;
      dbeta += dy;
    }
    dgamma = block_sum(dgamma, scratch);
    dbeta = block_sum(dbeta, scratch);
    if (threadIdx.x == 0) {
      dgamma_rows[frame_row * shape.channels + c0 + c] = dgamma;
      dbeta_rows[frame_row * shape.channels + c0 + c] = dbeta;
    }
    sum_dz += dbeta * gamma[c0 + c];  // sum(dz) = gamma * sum(dy)
    sum_dz_z += dgamma * gamma[c0 + c];  // sum(dz * z) = gamma * sum(dy * z)
  }
  const float count = static_cast<float>(group_size * view.pixels);
  const float mean_dz = sum_dz / count, mean_dz_z = sum_dz_z / count;
  // -- dx = rstd * (dz - mean(dz) - z * mean(dz z)) into a contiguous (B, C, F, H, W) --
  const int64_t b = frame_row / shape.frames, f = frame_row % shape.frames;
  for (int e = threadIdx.x; e < group_size * view.pixels; e += kThreads) {
    const int c = e / view.pixels, p = e % view.pixels;
    const float scale = group_norm_scale(group_rstd, gamma[c0 + c]);
    const float shift = group_norm_shift(group_mean, scale, beta[c0 + c]);
    const float xv = to_float(x[view.offset(c, p)]);
    const float dz = to_float(grad[(frame_row * shape.channels + c0 + c) * view.pixels + p]) *
                     silu_grad(xv * scale + shift) * gamma[c0 + c];
    const float z = (xv - group_mean) * group_rstd;
    dx[((b * shape.channels + c0 + c) * shape.frames + f) * view.pixels + p] =
        from_float<T>(group_norm_input_grad(dz, z, group_rstd, mean_dz, mean_dz_z));
  }
}

template <typename T>
__global__ void conv_epilogue_kernel(const T* __restrict__ conv, VideoShape shape, const T* __restrict__ temb,
                                     bool temb_per_frame, const T* __restrict__ residual, VideoStrides res_strides,
                                     float inv_output_scale, T* __restrict__ out) {
  const int64_t pixels = shape.height * shape.width;
  const int64_t total = shape.batch * shape.channels * shape.frames * pixels;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = index % pixels, f = (index / pixels) % shape.frames;
    const int64_t c = (index / (pixels * shape.frames)) % shape.channels;
    const int64_t b = index / (pixels * shape.frames * shape.channels);
    const float t = temb == nullptr ? 0.0f
                                    : to_float(temb_per_frame ? temb[(b * shape.frames + f) * shape.channels + c]
                                                              : temb[b * shape.channels + c]);
    const float r = residual == nullptr
                        ? 0.0f
                        : to_float(residual[b * res_strides.b + c * res_strides.c + f * res_strides.f +
                                            (p / shape.width) * res_strides.h + (p % shape.width) * res_strides.w]);
    const float y = to_float(conv[((b * shape.frames + f) * shape.channels + c) * pixels + p]);
    out[index] = from_float<T>(depthvid::conv_epilogue(y, t, r, inv_output_scale));
  }
}

template <typename Launch>
void by_dtype(int dtype, Launch launch) {
  if (dtype == 0) launch(__half{});
  else if (dtype == 1) launch(__nv_bfloat16{});
  else launch(float{});
}

}  // namespace

void group_norm_silu_fwd(int dtype, const void* x, VideoShape shape, VideoStrides strides, int groups,
                         const float* gamma, const float* beta, float eps, void* out, float* mean, float* rstd,
                         void* stream) {
  const dim3 grid(shape.batch * shape.frames, groups);
  by_dtype(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    group_norm_silu_fwd_kernel<T><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), shape, strides, groups, gamma, beta, eps, static_cast<T*>(out), mean, rstd);
  });
}

void group_norm_silu_bwd(int dtype, const void* grad, const void* x, VideoShape shape, VideoStrides strides, int groups,
                         const float* gamma, const float* beta, const float* mean, const float* rstd, void* dx,
                         float* dgamma_rows, float* dbeta_rows, void* stream) {
  const dim3 grid(shape.batch * shape.frames, groups);
  by_dtype(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    group_norm_silu_bwd_kernel<T><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(grad), static_cast<const T*>(x), shape, strides, groups, gamma, beta, mean, rstd,
        static_cast<T*>(dx), dgamma_rows, dbeta_rows);
  });
}

void conv_epilogue(int dtype, const void* conv, VideoShape out_shape, const void* temb, bool temb_per_frame,
                   const void* residual, VideoStrides residual_strides, float inv_output_scale, void* out,
                   void* stream) {
  const int64_t total = out_shape.batch * out_shape.channels * out_shape.frames * out_shape.height * out_shape.width;
  const int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 65535));
  by_dtype(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    conv_epilogue_kernel<T><<<blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(conv), out_shape, static_cast<const T*>(temb), temb_per_frame,
        static_cast<const T*>(residual), residual_strides, inv_output_scale, static_cast<T*>(out));
  });
}

}  // namespace depthvid::cuda
