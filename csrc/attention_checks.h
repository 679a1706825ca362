// Argument checks shared by the attention ops' CPU and CUDA entry points.
#pragma once

#include <ATen/core/Tensor.h>

namespace depthvid {

// q, k, v: (batch*frames, heads, tokens, head_dim), same shape, dtype and device.
inline void check_video_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  int64_t num_frames) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be (batch*frames, heads, tokens, head_dim), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, ": q, k, v must have the same shape, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": q, k, v must be on one device");
  TORCH_CHECK(num_frames >= 1 && q.size(0) % num_frames == 0, op, ": num_frames=", num_frames,
              " must be >= 1 and divide q.size(0)=", q.size(0));
}

// A further input of an op (grad_out, out, lse) on q's device: a CUDA kernel handed a host pointer
// (or another GPU's) would fault or read garbage instead of raising.
inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ", t.device());
}

// The backward's lse: the forward's (batch*frames, heads, tokens) log-sum-exp of q's rows.
inline void check_lse(const char* op, const at::Tensor& lse, const at::Tensor& q) {
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}), op, ": lse must be (batch*frames, "
              "heads, tokens) = (", q.size(0), ", ", q.size(1), ", ", q.size(2), "), got ", lse.sizes());
  check_same_device(op, "lse", lse, q);
}

// The attention kernels address rows through strides but need unit head_dim stride.
inline at::Tensor with_unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

}  // namespace depthvid
