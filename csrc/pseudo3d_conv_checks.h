// Argument checks shared by the pseudo-3D conv prologue/epilogue ops' CPU and CUDA entry points
// (dtypes are checked by each device: the CPU also takes fp64, CUDA fp32/fp16/bf16).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace depthvid {

// x (B, C, F, H, W); GroupNorm weight and bias (C,) or absent, on x's device.
inline void check_group_norm(const char* op, const at::Tensor& x, int64_t num_groups,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 5, op, ": x must be (B, C, F, H, W), got ", x.sizes());
  TORCH_CHECK(num_groups >= 1 && x.size(1) % num_groups == 0, op, ": num_groups=", num_groups,
              " must divide the channels ", x.size(1));
  for (const auto* param : {&weight, &bias}) {
    TORCH_CHECK(!param->has_value() || ((*param)->dim() == 1 && (*param)->size(0) == x.size(1)), op,
                ": GroupNorm weight and bias must be (C,) = (", x.size(1), ",)");
    TORCH_CHECK(!param->has_value() || (*param)->device() == x.device(), op,
                ": GroupNorm weight and bias must be on x's device ", x.device(), ", got ", (*param)->device());
  }
}

// The backward's grad (B*F, C, H, W) and the forward's mean, rstd (B*F, num_groups), on x's device.
inline void check_group_norm_grad(const char* op, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                  const at::Tensor& rstd, int64_t num_groups) {
  const int64_t frames_total = x.size(0) * x.size(2);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({frames_total, x.size(1), x.size(3), x.size(4)}), op,
              ": grad must be (B*F, C, H, W), got ", grad.sizes());
  for (const auto* stats : {&mean, &rstd}) {
    TORCH_CHECK(stats->sizes() == at::IntArrayRef({frames_total, num_groups}), op, ": mean and rstd must be (B*F, ",
                "num_groups) = (", frames_total, ", ", num_groups, "), got ", stats->sizes());
  }
  for (const at::Tensor* t : {&grad, &mean, &rstd}) {
    TORCH_CHECK(t->device() == x.device(), op, ": grad, mean and rstd must be on x's device ", x.device(), ", got ",
                t->device());
  }
}

// conv (B*F, C, H, W); temb (B, C) or (B, F, C); residual (B, C, F, H, W); all on conv's device.
inline void check_conv_epilogue(const at::Tensor& conv, int64_t num_frames, const std::optional<at::Tensor>& temb,
                                const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(conv.dim() == 4 && num_frames >= 1 && conv.size(0) % num_frames == 0,
              "conv_epilogue: conv must be (B*F, C, H, W) with num_frames=", num_frames, " dividing B*F, got ",
              conv.sizes());
  const int64_t batch = conv.size(0) / num_frames, channels = conv.size(1);
  if (temb.has_value()) {
    const bool ok = (temb->dim() == 2 && temb->sizes() == at::IntArrayRef({batch, channels})) ||
                    (temb->dim() == 3 && temb->sizes() == at::IntArrayRef({batch, num_frames, channels}));
    TORCH_CHECK(ok, "conv_epilogue: temb must be (B, C_out) or (B, F, C_out) = (", batch, ", ", num_frames, ", ",
                channels, "), got ", temb->sizes());
    TORCH_CHECK(temb->device() == conv.device(), "conv_epilogue: temb must be on conv's device ", conv.device(),
                ", got ", temb->device());
  }
  if (residual.has_value()) {
    const std::vector<int64_t> video_shape = {batch, channels, num_frames, conv.size(2), conv.size(3)};
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(video_shape), "conv_epilogue: residual must be ",
                at::IntArrayRef(video_shape), ", got ", residual->sizes());
    TORCH_CHECK(residual->device() == conv.device(), "conv_epilogue: residual must be on conv's device ",
                conv.device(), ", got ", residual->device());
  }
}

}  // namespace depthvid
