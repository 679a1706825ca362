// CUDA implementations of the depthvid ops: argument checks and output allocation around the
// launchers of kernels/*.cu (which see no torch types). Built only for a CUDA build of depthvid._C.
// The attention kernels take fp16/bf16 (tensor-core tiles); fp32 attention is rejected with a message
// naming what to use. The prologue/epilogue take fp32, fp16 and bf16.
// Every entry point: checks (shapes, dtypes, one device for all tensors: the kernels get raw
// pointers), a device guard, outputs allocated contiguous (as the fake kernels declare), the launch
// on the current stream of that device, then a launch-error check. Empty tensors launch nothing (a
// zero-sized grid is a launch error).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attention_checks.h"
#include "launchers.h"
#include "pseudo3d_conv_checks.h"

namespace depthvid {
namespace {

cuda::AttentionStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// The current stream of the current device: call after the CUDAGuard has made the inputs' device current.
void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int attention_dtype(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": the CUDA kernels take fp16 or bf16 q, k, v (tensor cores), got ", q.scalar_type(),
              "; use autocast or backend=\"triton\"/\"torch\" for fp32");
  return q.scalar_type() == at::kHalf ? 0 : 1;
}

cuda::AttentionShape attention_shape(const at::Tensor& q, int64_t num_frames, double scale, const char* op) {
  TORCH_CHECK(q.size(3) <= cuda::kMaxHeadDim, op, ": head_dim ", q.size(3), " > ", cuda::kMaxHeadDim);
  return {q.size(0), q.size(1), q.size(2), q.size(3), static_cast<int>(num_frames), static_cast<float>(scale)};
}

// k and v share strides in the launchers: make them agree (the model's views already do).
std::pair<at::Tensor, at::Tensor> same_layout(const at::Tensor& k, const at::Tensor& v) {
  if (k.strides() == v.strides()) return {k, v};
  return {k.contiguous(), v.contiguous()};
}

std::tuple<at::Tensor, at::Tensor> sparse_causal_attn_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                               const at::Tensor& v_in, int64_t num_frames,
                                                               double scale) {
  check_video_attention("sparse_causal_attn_fwd", q_in, k_in, v_in, num_frames);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int dtype = attention_dtype("sparse_causal_attn_fwd", q_in);
  const at::Tensor q = with_unit_last_stride(q_in);
  auto [k, v] = same_layout(with_unit_last_stride(k_in), with_unit_last_stride(v_in));
  const cuda::AttentionShape shape = attention_shape(q, num_frames, scale, "sparse_causal_attn_fwd");
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous, whatever q's strides
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  cuda::sparse_causal_attn_fwd(dtype, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
                               shape, strides_of(q), strides_of(k), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_causal_attn_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, int64_t num_frames, double scale) {
  const char* op = "sparse_causal_attn_bwd";
  check_video_attention(op, q_in, k_in, v_in, num_frames);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), op,
              ": grad_out and out must have q's shape ", q_in.sizes(), ", got ", grad_out_in.sizes(), " and ",
              out_in.sizes());
  check_same_device(op, "grad_out", grad_out_in, q_in);
  check_same_device(op, "out", out_in, q_in);
  check_lse(op, lse, q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int dtype = attention_dtype(op, q_in);
  const cuda::AttentionShape shape = attention_shape(q_in, num_frames, scale, op);
  const at::Tensor q = with_unit_last_stride(q_in);
  auto [k, v] = same_layout(with_unit_last_stride(k_in), with_unit_last_stride(v_in));
  // the kernels read grad_out and out as q's dtype, through one set of strides
  auto [grad_out, out] = same_layout(with_unit_last_stride(grad_out_in.to(q.scalar_type())),
                                     with_unit_last_stride(out_in.to(q.scalar_type())));
  const at::Tensor lse_c = lse.to(at::kFloat).contiguous();
  at::Tensor delta = at::empty_like(lse_c);
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(q.sizes(), q.options()),
             dv = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return {dq, dk, dv};
  cuda::sparse_causal_attn_bwd(dtype, grad_out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                               lse_c.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(),
                               dv.data_ptr(), shape, strides_of(q), strides_of(k), strides_of(out), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> temporal_attn_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                          const at::Tensor& v_in, int64_t num_frames, double scale) {
  check_video_attention("temporal_attn_fwd", q_in, k_in, v_in, num_frames);
  TORCH_CHECK(num_frames <= cuda::kMaxTemporalFrames, "temporal_attn_fwd: at most ", cuda::kMaxTemporalFrames,
              " frames on CUDA, got ", num_frames);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int dtype = attention_dtype("temporal_attn_fwd", q_in);
  const at::Tensor q = with_unit_last_stride(q_in);
  auto [k, v] = same_layout(with_unit_last_stride(k_in), with_unit_last_stride(v_in));
  const cuda::AttentionShape shape = attention_shape(q, num_frames, scale, "temporal_attn_fwd");
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous, whatever q's strides
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  cuda::temporal_attn_fwd(dtype, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
                          shape, strides_of(q), strides_of(k), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> temporal_attn_bwd_cuda(const at::Tensor& grad_out_in,
                                                                      const at::Tensor& q_in, const at::Tensor& k_in,
                                                                      const at::Tensor& v_in, const at::Tensor& lse,
                                                                      int64_t num_frames, double scale) {
  const char* op = "temporal_attn_bwd";
  check_video_attention(op, q_in, k_in, v_in, num_frames);
  // the kernel keeps one score per frame in registers (kMaxTemporalFrames of them)
  TORCH_CHECK(num_frames <= cuda::kMaxTemporalFrames, op, ": at most ", cuda::kMaxTemporalFrames,
              " frames on CUDA, got ", num_frames);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes(), op, ": grad_out must have q's shape ", q_in.sizes(), ", got ",
              grad_out_in.sizes());
  check_same_device(op, "grad_out", grad_out_in, q_in);
  check_lse(op, lse, q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int dtype = attention_dtype(op, q_in);
  const cuda::AttentionShape shape = attention_shape(q_in, num_frames, scale, op);
  const at::Tensor q = with_unit_last_stride(q_in), grad_out = with_unit_last_stride(grad_out_in.to(q.scalar_type()));
  auto [k, v] = same_layout(with_unit_last_stride(k_in), with_unit_last_stride(v_in));
  const at::Tensor lse_c = lse.to(at::kFloat).contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(q.sizes(), q.options()),
             dv = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return {dq, dk, dv};
  cuda::temporal_attn_bwd(dtype, grad_out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), lse_c.data_ptr<float>(),
                          dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), shape, strides_of(q), strides_of(k),
                          strides_of(grad_out), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

int video_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kHalf ? 0 : x.scalar_type() == at::kBFloat16 ? 1 : 2;
}
cuda::VideoShape video_shape(const at::Tensor& x) { return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(4)}; }
cuda::VideoStrides video_strides(const at::Tensor& x) {
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)};
}
at::Tensor affine_or(const std::optional<at::Tensor>& param, const at::Tensor& x, float fill) {
  return param.has_value() ? param->to(at::kFloat).contiguous() : at::full({x.size(1)}, fill, x.options().dtype(at::kFloat));
}

// the dtypes the CUDA prologue/epilogue kernels are built for (video_dtype's codes)
void check_video_dtype(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": ", name, " must be fp32, fp16 or bf16 on CUDA, got ", x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cuda(const at::Tensor& x, int64_t num_groups,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    const std::optional<at::Tensor>& bias, double eps) {
  check_group_norm("group_norm_silu", x, num_groups, weight, bias);
  check_video_dtype("group_norm_silu", "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0) * x.size(2), x.size(1), x.size(3), x.size(4)}, x.options());
  at::Tensor mean = at::empty({x.size(0) * x.size(2), num_groups}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  if (x.numel() == 0) return {out, mean, rstd};
  const at::Tensor gamma = affine_or(weight, x, 1.0f), beta = affine_or(bias, x, 0.0f);
  cuda::group_norm_silu_fwd(video_dtype(x), x.data_ptr(), video_shape(x), video_strides(x), static_cast<int>(num_groups),
                            gamma.data_ptr<float>(), beta.data_ptr<float>(), static_cast<float>(eps), out.data_ptr(),
                            mean.data_ptr<float>(), rstd.data_ptr<float>(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_bwd_cuda(
    const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  check_group_norm("group_norm_silu_bwd", x, num_groups, weight, bias);
  check_video_dtype("group_norm_silu_bwd", "x", x);
  check_group_norm_grad("group_norm_silu_bwd", grad_in, x, mean, rstd, num_groups);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  const at::Tensor mean_c = mean.to(at::kFloat).contiguous(), rstd_c = rstd.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dgamma_rows = at::zeros({x.size(0) * x.size(2), x.size(1)}, x.options().dtype(at::kFloat));
  at::Tensor dbeta_rows = at::zeros_like(dgamma_rows);
  const at::Tensor gamma = affine_or(weight, x, 1.0f), beta = affine_or(bias, x, 0.0f);
  if (x.numel() > 0) {
    cuda::group_norm_silu_bwd(video_dtype(x), grad.data_ptr(), x.data_ptr(), video_shape(x), video_strides(x),
                              static_cast<int>(num_groups), gamma.data_ptr<float>(), beta.data_ptr<float>(),
                              mean_c.data_ptr<float>(), rstd_c.data_ptr<float>(), dx.data_ptr(),
                              dgamma_rows.data_ptr<float>(), dbeta_rows.data_ptr<float>(), current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor dweight = weight.has_value() ? dgamma_rows.sum(0).to(weight->scalar_type()) : at::empty({0}, x.options());
  at::Tensor dbias = bias.has_value() ? dbeta_rows.sum(0).to(bias->scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias};
}

at::Tensor conv_epilogue_cuda(const at::Tensor& conv_in, int64_t num_frames, const std::optional<at::Tensor>& temb,
                              const std::optional<at::Tensor>& residual, double output_scale) {
  check_conv_epilogue(conv_in, num_frames, temb, residual);
  check_video_dtype("conv_epilogue", "conv", conv_in);
  const c10::cuda::CUDAGuard guard(conv_in.device());
  const at::Tensor conv = conv_in.contiguous();
  const int64_t batch = conv.size(0) / num_frames;
  at::Tensor out = at::empty({batch, conv.size(1), num_frames, conv.size(2), conv.size(3)}, conv.options());
  if (out.numel() == 0) return out;
  std::optional<at::Tensor> temb_c, res_c;
  if (temb.has_value()) temb_c = temb->to(conv.scalar_type()).contiguous();
  if (residual.has_value()) res_c = residual->to(conv.scalar_type());
  cuda::conv_epilogue(video_dtype(conv), conv.data_ptr(), video_shape(out), temb_c ? temb_c->data_ptr() : nullptr,
                      temb_c && temb_c->dim() == 3, res_c ? res_c->data_ptr() : nullptr,
                      res_c ? video_strides(*res_c) : cuda::VideoStrides{}, static_cast<float>(1.0 / output_scale),
                      out.data_ptr(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(depthvid, CUDA, m) {
  m.impl("sparse_causal_attn_fwd", &sparse_causal_attn_fwd_cuda);
  m.impl("sparse_causal_attn_bwd", &sparse_causal_attn_bwd_cuda);
  m.impl("temporal_attn_fwd", &temporal_attn_fwd_cuda);
  m.impl("temporal_attn_bwd", &temporal_attn_bwd_cuda);
  m.impl("group_norm_silu", &group_norm_silu_cuda);
  m.impl("group_norm_silu_bwd", &group_norm_silu_bwd_cuda);
  m.impl("conv_epilogue", &conv_epilogue_cuda);
}

}  // namespace depthvid
