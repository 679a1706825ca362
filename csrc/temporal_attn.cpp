// Temporal attention on the CPU, on the native (batch*frames, heads, tokens, head_dim) layout:
// at each (video, head, token) the F frames' rows attend to each other. No transposes: a task
// gathers the F strided rows of q, k, v of one token (F x head_dim, in fp32), does the F x F
// softmax in registers/L1 and writes the F output rows back in place. Saves lse per row.
// The backward recomputes P = exp(S - lse) from the same F x F scores; every gradient of a token
// belongs to its task, so nothing is shared between threads.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "attention_checks.h"
#include "video_ops_math.h"

namespace depthvid {
namespace {

constexpr int64_t kTokensPerTask = 16;  // amortises the task overhead; F * D * 4 fp32 rows stay in L1/L2

template <typename scalar_t>
struct FrameRows {  // the F rows of one (video, head, token) in a (batch*frames, heads, tokens, head_dim) tensor
  scalar_t* data;
  int64_t stride_b, stride_h, stride_n;
  explicit FrameRows(const at::Tensor& t)
      : data(t.data_ptr<scalar_t>()), stride_b(t.stride(0)), stride_h(t.stride(1)), stride_n(t.stride(2)) {}
  scalar_t* at(int64_t row, int64_t head, int64_t token) const {
    return data + row * stride_b + head * stride_h + token * stride_n;
  }
  // rows video*F .. video*F+F-1 -> dst (F, head_dim) fp32
  void gather(float* dst, int64_t video, int64_t frames, int64_t head, int64_t token, int64_t head_dim) const {
    for (int64_t f = 0; f < frames; ++f) {
      const scalar_t* src = at(video * frames + f, head, token);
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) dst[f * head_dim + d] = static_cast<float>(src[d]);
    }
  }
  void scatter(const float* src, int64_t video, int64_t frames, int64_t head, int64_t token, int64_t head_dim) const {
    for (int64_t f = 0; f < frames; ++f) {
      scalar_t* dst = at(video * frames + f, head, token);
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<scalar_t>(src[f * head_dim + d]);
    }
  }
};

inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {  // y += alpha * x
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

template <typename scalar_t>
void temporal_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                  int64_t frames, float scale) {
  const int64_t rows = q.size(0), heads = q.size(1), tokens = q.size(2), head_dim = q.size(3);
  const FrameRows<scalar_t> Q(q), K(k), V(v), O(out);
  float* lse_data = lse.data_ptr<float>();
  at::parallel_for(0, rows / frames * heads * tokens, kTokensPerTask, [&](int64_t begin, int64_t end) {
    const int64_t block = frames * head_dim;
    std::vector<float> qf(block), kf(block), vf(block), of(block), prob(frames);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t token = task % tokens, head = (task / tokens) % heads, video = task / (tokens * heads);
      Q.gather(qf.data(), video, frames, head, token, head_dim);
      K.gather(kf.data(), video, frames, head, token, head_dim);
      V.gather(vf.data(), video, frames, head, token, head_dim);
      for (int64_t f = 0; f < frames; ++f) {
        // -- scores and their softmax over the frames --
        float row_max = -INFINITY;
        for (int64_t g = 0; g < frames; ++g) {
          prob[g] = scale * dot(qf.data() + f * head_dim, kf.data() + g * head_dim, head_dim);
          row_max = std::max(row_max, prob[g]);
        }
        OnlineSoftmax state = online_softmax_init();
        online_softmax_rescale(state, row_max);
        for (int64_t g = 0; g < frames; ++g) {
          prob[g] = fast_exp(prob[g] - state.max);
          state.sum += prob[g];
        }
        // -- out_f = sum_g p_g v_g / sum --
        float* o = of.data() + f * head_dim;
        std::fill(o, o + head_dim, 0.0f);
        const float inv_sum = 1.0f / state.sum;
        for (int64_t g = 0; g < frames; ++g) axpy(prob[g] * inv_sum, vf.data() + g * head_dim, o, head_dim);
        lse_data[((video * frames + f) * heads + head) * tokens + token] = online_softmax_lse(state);
      }
      O.scatter(of.data(), video, frames, head, token, head_dim);
    }
  });
}

template <typename scalar_t>
void temporal_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, int64_t frames, float scale) {
  const int64_t rows = q.size(0), heads = q.size(1), tokens = q.size(2), head_dim = q.size(3);
  const FrameRows<scalar_t> dO(grad_out), Q(q), K(k), V(v), dQ(dq), dK(dk), dV(dv);
  const float* lse_data = lse.data_ptr<float>();
  at::parallel_for(0, rows / frames * heads * tokens, kTokensPerTask, [&](int64_t begin, int64_t end) {
    const int64_t block = frames * head_dim;
    std::vector<float> qf(block), kf(block), vf(block), dof(block), dqf(block), dkf(block), dvf(block);
    std::vector<float> prob(frames * frames), score_grad(frames * frames);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t token = task % tokens, head = (task / tokens) % heads, video = task / (tokens * heads);
      Q.gather(qf.data(), video, frames, head, token, head_dim);
      K.gather(kf.data(), video, frames, head, token, head_dim);
      V.gather(vf.data(), video, frames, head, token, head_dim);
      dO.gather(dof.data(), video, frames, head, token, head_dim);
      // -- P = exp(S - lse), dP = dO V^T, dS = P (dP - rowsum(P dP)) --
      for (int64_t f = 0; f < frames; ++f) {
        const float row_lse = lse_data[((video * frames + f) * heads + head) * tokens + token];
        float delta = 0.0f;
        for (int64_t g = 0; g < frames; ++g) {
          const float p = softmax_prob(scale * dot(qf.data() + f * head_dim, kf.data() + g * head_dim, head_dim), row_lse);
          const float dp = dot(dof.data() + f * head_dim, vf.data() + g * head_dim, head_dim);
          prob[f * frames + g] = p;
          score_grad[f * frames + g] = dp;
          delta += p * dp;
        }
        for (int64_t g = 0; g < frames; ++g)
          score_grad[f * frames + g] = softmax_score_grad(prob[f * frames + g], score_grad[f * frames + g], delta);
      }
      // -- dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO --
      std::fill(dqf.begin(), dqf.end(), 0.0f);
      std::fill(dkf.begin(), dkf.end(), 0.0f);
      std::fill(dvf.begin(), dvf.end(), 0.0f);
      for (int64_t f = 0; f < frames; ++f) {
        for (int64_t g = 0; g < frames; ++g) {
          const float ds = scale * score_grad[f * frames + g];
          axpy(ds, kf.data() + g * head_dim, dqf.data() + f * head_dim, head_dim);
          axpy(ds, qf.data() + f * head_dim, dkf.data() + g * head_dim, head_dim);
          axpy(prob[f * frames + g], dof.data() + f * head_dim, dvf.data() + g * head_dim, head_dim);
        }
      }
      dQ.scatter(dqf.data(), video, frames, head, token, head_dim);
      dK.scatter(dkf.data(), video, frames, head, token, head_dim);
      dV.scatter(dvf.data(), video, frames, head, token, head_dim);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> temporal_attn_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, int64_t num_frames, double scale) {
  check_video_attention("temporal_attn_fwd", q_in, k_in, v_in, num_frames);
  const at::Tensor q = with_unit_last_stride(q_in), k = with_unit_last_stride(k_in), v = with_unit_last_stride(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "temporal_attn_fwd", [&] {
    temporal_fwd<scalar_t>(q, k, v, out, lse, num_frames, static_cast<float>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> temporal_attn_bwd_cpu(const at::Tensor& grad_out_in,
                                                                     const at::Tensor& q_in, const at::Tensor& k_in,
                                                                     const at::Tensor& v_in, const at::Tensor& lse_in,
                                                                     int64_t num_frames, double scale) {
  check_video_attention("temporal_attn_bwd", q_in, k_in, v_in, num_frames);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && grad_out_in.scalar_type() == q_in.scalar_type(),
              "temporal_attn_bwd: grad_out must have q's shape and dtype");
  const at::Tensor q = with_unit_last_stride(q_in), k = with_unit_last_stride(k_in), v = with_unit_last_stride(v_in);
  const at::Tensor grad_out = with_unit_last_stride(grad_out_in);
  check_lse("temporal_attn_bwd", lse_in, q_in);
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  const auto options = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), options), dk = at::empty(q.sizes(), options), dv = at::empty(q.sizes(), options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "temporal_attn_bwd", [&] {
    temporal_bwd<scalar_t>(grad_out, q, k, v, lse, dq, dk, dv, num_frames, static_cast<float>(scale));
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(depthvid, CPU, m) {
  m.impl("temporal_attn_fwd", &temporal_attn_fwd_cpu);
  m.impl("temporal_attn_bwd", &temporal_attn_bwd_cpu);
}

}  // namespace depthvid
