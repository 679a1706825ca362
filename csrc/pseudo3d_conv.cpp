// The pseudo-3D conv's fused prologue and epilogue on the CPU; the 3x3 conv itself is ATen's
// (oneDNN) conv2d on the frames folded into the batch.
//
// group_norm_silu        x (B, C, F, H, W), any strides -> silu(group_norm(x)) written straight
//                        into the conv's (B*F, C, H, W) input layout (the frame fold is free),
//                        plus mean/rstd per (b*F + f, group) for the backward. A task is one
//                        (frame, group): two passes for the statistics (centred variance), one to write.
// group_norm_silu_bwd    dx (B, C, F, H, W) and per-(frame, channel) partial dgamma/dbeta from the
//                        recomputed normalised input: no activation is saved besides x.
// conv_epilogue          (conv + temb + residual) / output_scale, unfolding (B*F, C, H, W) back
//                        to (B, C, F, H, W) in the same pass.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "pseudo3d_conv_checks.h"
#include "video_ops_math.h"

namespace depthvid {
namespace {

// x (B, C, F, H, W) addressed by its five strides.
template <typename scalar_t>
struct Video {
  const scalar_t* data;
  int64_t stride_b, stride_c, stride_f, stride_h, stride_w;
  explicit Video(const at::Tensor& t)
      : data(t.data_ptr<scalar_t>()),
        stride_b(t.stride(0)),
        stride_c(t.stride(1)),
        stride_f(t.stride(2)),
        stride_h(t.stride(3)),
        stride_w(t.stride(4)) {}
  const scalar_t* plane(int64_t b, int64_t c, int64_t f) const { return data + b * stride_b + c * stride_c + f * stride_f; }
};

at::Tensor affine_or(const std::optional<at::Tensor>& param, int64_t channels, float fill) {
  return param.has_value() ? param->to(at::kFloat).contiguous() : at::full({channels}, fill, at::kFloat);
}

template <typename scalar_t>
void group_norm_silu_fwd(const at::Tensor& x, int64_t num_groups, const at::Tensor& gamma, const at::Tensor& beta,
                         double eps, at::Tensor& out, at::Tensor& mean, at::Tensor& rstd) {
  const int64_t batch = x.size(0), channels = x.size(1), frames = x.size(2), height = x.size(3), width = x.size(4);
  const int64_t group_size = channels / num_groups, pixels = height * width;
  const Video<scalar_t> X(x);
  const float *gamma_data = gamma.data_ptr<float>(), *beta_data = beta.data_ptr<float>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  float *mean_data = mean.data_ptr<float>(), *rstd_data = rstd.data_ptr<float>();
  at::parallel_for(0, batch * frames * num_groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task % num_groups, frame_row = task / num_groups;  // frame_row = b * F + f
      const int64_t b = frame_row / frames, f = frame_row % frames, c0 = group * group_size;
      // -- mean, then the variance of centred values (no E[x^2] - E[x]^2 cancellation) --
      double sum = 0.0;
      for (int64_t c = c0; c < c0 + group_size; ++c)
        for (int64_t h = 0; h < height; ++h) {
          const scalar_t* line = X.plane(b, c, f) + h * X.stride_h;
          float line_sum = 0.0f;
#pragma omp simd reduction(+ : line_sum)
          for (int64_t w = 0; w < width; ++w) line_sum += static_cast<float>(line[w * X.stride_w]);
          sum += line_sum;
        }
      const float group_mean = static_cast<float>(sum / (group_size * pixels));
      double sq_sum = 0.0;
      for (int64_t c = c0; c < c0 + group_size; ++c)
        for (int64_t h = 0; h < height; ++h) {
          const scalar_t* line = X.plane(b, c, f) + h * X.stride_h;
          float line_sum = 0.0f;
#pragma omp simd reduction(+ : line_sum)
          for (int64_t w = 0; w < width; ++w) {
            const float centred = static_cast<float>(line[w * X.stride_w]) - group_mean;
            line_sum += centred * centred;
          }
          sq_sum += line_sum;
        }
      const float group_rstd = 1.0f / std::sqrt(static_cast<float>(sq_sum / (group_size * pixels)) + static_cast<float>(eps));
      mean_data[task] = group_mean;
      rstd_data[task] = group_rstd;
      // -- silu(x * scale + shift) into the folded (B*F, C, H, W) output --
      for (int64_t c = c0; c < c0 + group_size; ++c) {
        const float scale = group_norm_scale(group_rstd, gamma_data[c]);
        const float shift = group_norm_shift(group_mean, scale, beta_data[c]);
        scalar_t* dst = out_data + (frame_row * channels + c) * pixels;
        for (int64_t h = 0; h < height; ++h) {
          const scalar_t* line = X.plane(b, c, f) + h * X.stride_h;
#pragma omp simd
          for (int64_t w = 0; w < width; ++w)
            dst[h * width + w] = static_cast<scalar_t>(group_norm_silu(static_cast<float>(line[w * X.stride_w]), scale, shift));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(const at::Tensor& x, int64_t num_groups,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias, double eps) {
  check_group_norm("group_norm_silu", x, num_groups, weight, bias);
  const int64_t batch = x.size(0), channels = x.size(1), frames = x.size(2);
  at::Tensor out = at::empty({batch * frames, channels, x.size(3), x.size(4)}, x.options());
  at::Tensor mean = at::empty({batch * frames, num_groups}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  const at::Tensor gamma = affine_or(weight, channels, 1.0f), beta = affine_or(bias, channels, 0.0f);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_silu", [&] {
    group_norm_silu_fwd<scalar_t>(x, num_groups, gamma, beta, eps, out, mean, rstd);
  });
  return {out, mean, rstd};
}

template <typename scalar_t>
void group_norm_silu_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                         int64_t num_groups, const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& dx,
                         at::Tensor& dgamma_rows, at::Tensor& dbeta_rows) {
  const int64_t batch = x.size(0), channels = x.size(1), frames = x.size(2), height = x.size(3), width = x.size(4);
  const int64_t group_size = channels / num_groups, pixels = height * width;
  const Video<scalar_t> X(x);
  const scalar_t* grad_data = grad.data_ptr<scalar_t>();  // (B*F, C, H, W) contiguous
  scalar_t* dx_data = dx.data_ptr<scalar_t>();              // (B, C, F, H, W) contiguous
  const float *gamma_data = gamma.data_ptr<float>(), *beta_data = beta.data_ptr<float>();
  const float *mean_data = mean.data_ptr<float>(), *rstd_data = rstd.data_ptr<float>();
  float *dgamma_data = dgamma_rows.data_ptr<float>(), *dbeta_data = dbeta_rows.data_ptr<float>();  // (B*F, C)
  at::parallel_for(0, batch * frames * num_groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(pixels), dz(pixels);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task % num_groups, frame_row = task / num_groups;
      const int64_t b = frame_row / frames, f = frame_row % frames, c0 = group * group_size;
      const float group_mean = mean_data[task], group_rstd = rstd_data[task];
      // -- pass 1: group sums of dz and dz * z, per-channel dgamma/dbeta of this frame --
      double sum_dz = 0.0, sum_dz_z = 0.0;
      for (int64_t c = c0; c < c0 + group_size; ++c) {
        const float scale = group_norm_scale(group_rstd, gamma_data[c]);
        const float shift = group_norm_shift(group_mean, scale, beta_data[c]);
        const scalar_t* g = grad_data + (frame_row * channels + c) * pixels;
        float dgamma = 0.0f, dbeta = 0.0f, channel_dz = 0.0f, channel_dz_z = 0.0f;
        for (int64_t h = 0; h < height; ++h) {
          const scalar_t* line = X.plane(b, c, f) + h * X.stride_h;
#pragma omp simd reduction(+ : dgamma, dbeta, channel_dz, channel_dz_z)
          for (int64_t w = 0; w < width; ++w) {
            const float xv = static_cast<float>(line[w * X.stride_w]);
            const float dy = static_cast<float>(g[h * width + w]) * silu_grad(xv * scale + shift);
            const float zv = (xv - group_mean) * group_rstd;
            dgamma += dy * zv;
            dbeta += dy;
            channel_dz += dy * gamma_data[c];
            channel_dz_z += dy * gamma_data[c] * zv;
          }
        }
        dgamma_data[frame_row * channels + c] = dgamma;
        dbeta_data[frame_row * channels + c] = dbeta;
        sum_dz += channel_dz;
        sum_dz_z += channel_dz_z;
      }
      const float count = static_cast<float>(group_size * pixels);
      const float mean_dz = static_cast<float>(sum_dz) / count, mean_dz_z = static_cast<float>(sum_dz_z) / count;
      // -- pass 2: dx = rstd * (dz - mean(dz) - z * mean(dz z)) --
      for (int64_t c = c0; c < c0 + group_size; ++c) {
        const float scale = group_norm_scale(group_rstd, gamma_data[c]);
        const float shift = group_norm_shift(group_mean, scale, beta_data[c]);
        const scalar_t* g = grad_data + (frame_row * channels + c) * pixels;
        scalar_t* dst = dx_data + ((b * channels + c) * frames + f) * pixels;
        for (int64_t h = 0; h < height; ++h) {
          const scalar_t* line = X.plane(b, c, f) + h * X.stride_h;
#pragma omp simd
          for (int64_t w = 0; w < width; ++w) {
            const float xv = static_cast<float>(line[w * X.stride_w]);
            const float dzv = static_cast<float>(g[h * width + w]) * silu_grad(xv * scale + shift) * gamma_data[c];
            const float zv = (xv - group_mean) * group_rstd;
            dst[h * width + w] = static_cast<scalar_t>(group_norm_input_grad(dzv, zv, group_rstd, mean_dz, mean_dz_z));
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  check_group_norm("group_norm_silu_bwd", x, num_groups, weight, bias);
  const int64_t batch = x.size(0), channels = x.size(1), frames = x.size(2);
  check_group_norm_grad("group_norm_silu_bwd", grad_in, x, mean, rstd, num_groups);
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dgamma_rows = at::empty({batch * frames, channels}, x.options().dtype(at::kFloat));
  at::Tensor dbeta_rows = at::empty_like(dgamma_rows);
  const at::Tensor gamma = affine_or(weight, channels, 1.0f), beta = affine_or(bias, channels, 0.0f);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_silu_bwd", [&] {
    group_norm_silu_bwd<scalar_t>(grad, x, mean.contiguous(), rstd.contiguous(), num_groups, gamma, beta, dx,
                                  dgamma_rows, dbeta_rows);
  });
  // absent affine parameters get empty gradients (the Python side maps them to None)
  at::Tensor dweight = weight.has_value() ? dgamma_rows.sum(0).to(weight->scalar_type()) : at::empty({0}, x.options());
  at::Tensor dbias = bias.has_value() ? dbeta_rows.sum(0).to(bias->scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias};
}

template <typename scalar_t>
void conv_epilogue_kernel(const at::Tensor& conv, int64_t frames, const std::optional<at::Tensor>& temb,
                          const std::optional<at::Tensor>& residual, float inv_output_scale, at::Tensor& out) {
  const int64_t batch = out.size(0), channels = out.size(1), height = out.size(3), width = out.size(4);
  const int64_t pixels = height * width;
  const scalar_t* conv_data = conv.data_ptr<scalar_t>();  // (B*F, C, H, W) contiguous
  scalar_t* out_data = out.data_ptr<scalar_t>();           // (B, C, F, H, W) contiguous
  const scalar_t* temb_data = temb.has_value() ? temb->data_ptr<scalar_t>() : nullptr;
  const bool temb_per_frame = temb.has_value() && temb->dim() == 3;  // (B, F, C) instead of (B, C)
  std::optional<Video<scalar_t>> res;
  if (residual.has_value()) res.emplace(*residual);
  at::parallel_for(0, batch * channels * frames, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {  // one (b, c, f) plane
      const int64_t f = task % frames, c = (task / frames) % channels, b = task / (frames * channels);
      const float temb_value =
          temb_data == nullptr ? 0.0f
                               : static_cast<float>(temb_per_frame ? temb_data[(b * frames + f) * channels + c]
                                                                   : temb_data[b * channels + c]);
      const scalar_t* src = conv_data + ((b * frames + f) * channels + c) * pixels;
      scalar_t* dst = out_data + task * pixels;
      if (!res.has_value()) {
#pragma omp simd
        for (int64_t p = 0; p < pixels; ++p)
          dst[p] = static_cast<scalar_t>(conv_epilogue(static_cast<float>(src[p]), temb_value, 0.0f, inv_output_scale));
        continue;
      }
      for (int64_t h = 0; h < height; ++h) {
        const scalar_t* line = res->plane(b, c, f) + h * res->stride_h;
#pragma omp simd
        for (int64_t w = 0; w < width; ++w)
          dst[h * width + w] = static_cast<scalar_t>(conv_epilogue(
              static_cast<float>(src[h * width + w]), temb_value, static_cast<float>(line[w * res->stride_w]),
              inv_output_scale));
      }
    }
  });
}

at::Tensor conv_epilogue_cpu(const at::Tensor& conv_in, int64_t num_frames, const std::optional<at::Tensor>& temb_in,
                             const std::optional<at::Tensor>& residual, double output_scale) {
  check_conv_epilogue(conv_in, num_frames, temb_in, residual);
  const int64_t batch = conv_in.size(0) / num_frames, channels = conv_in.size(1);
  const std::vector<int64_t> video_shape = {batch, channels, num_frames, conv_in.size(2), conv_in.size(3)};
  std::optional<at::Tensor> temb, res;
  if (temb_in.has_value()) temb = temb_in->to(conv_in.scalar_type()).contiguous();
  if (residual.has_value()) res = residual->to(conv_in.scalar_type());
  const at::Tensor conv = conv_in.contiguous();
  at::Tensor out = at::empty(video_shape, conv.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, conv.scalar_type(), "conv_epilogue", [&] {
    conv_epilogue_kernel<scalar_t>(conv, num_frames, temb, res, static_cast<float>(1.0 / output_scale), out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(depthvid, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("group_norm_silu_bwd", &group_norm_silu_bwd_cpu);
  m.impl("conv_epilogue", &conv_epilogue_cpu);
}

}  // namespace depthvid
