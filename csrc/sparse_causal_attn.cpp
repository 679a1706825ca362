// Sparse-causal attention on the CPU: frame f's queries attend to frame 0 and frame f-1 (frames
// 0 and 1 to frame 0 once), reading those frames' keys and values in place: no concatenated K/V.
//
// forward   blocked online softmax (FlashAttention-2 on the CPU): a task is one block of
//           BLOCK_Q query rows of one (frame, head); it streams BLOCK_K-key blocks of its key
//           frames through S = scale * Q K^T (BLAS), rescales its fp32 accumulator and adds P V.
//           Saves lse = max + log(sum) per row.
// backward  a task is one (frame, head) and recomputes P = exp(S - lse) block by block:
//           dV += P^T dO, dP = dO V^T, dS = P (dP - delta), dQ += scale dS K, dK += scale dS^T Q.
//           Key frame j >= 1 has one reader (frame j + 1), so its dK/dV are written in place; frame
//           0 is read by every frame, so each thread accumulates frame 0's dK/dV in its own
//           buffer and the buffers are summed at the end (no atomics, deterministic per thread count).
// bf16/fp16 inputs are computed in fp32 (converted once at the boundary), results cast back.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attention_checks.h"
#include "cpu_gemm.h"
#include "video_ops_math.h"

namespace depthvid {
namespace {

// Forward: a 256 x 512 fp32 score block (512 KB, L2-sized) per task; 256-row GEMMs measured ~25%
// faster than 64-row ones here (MKL sgemm, 1 thread, N = 2048).
constexpr int64_t kForwardBlockQ = 256;
constexpr int64_t kForwardBlockK = 512;
// Backward: P and dP blocks of 128 x 128 fp32 (64 KB each) plus the Q/K/V/dO tiles fit in L2.
constexpr int64_t kBackwardBlockQ = 128;
constexpr int64_t kBackwardBlockK = 128;

// A (batch*frames, heads, tokens, head_dim) fp32 tensor with unit head_dim stride.
struct Rows {
  float* data;
  int64_t stride_b, stride_h, stride_n;
  explicit Rows(const at::Tensor& t)
      : data(t.data_ptr<float>()), stride_b(t.stride(0)), stride_h(t.stride(1)), stride_n(t.stride(2)) {}
  float* at(int64_t row, int64_t head, int64_t token) const {
    return data + row * stride_b + head * stride_h + token * stride_n;
  }
};

at::Tensor as_fp32_rows(const at::Tensor& t) { return with_unit_last_stride(t.to(at::kFloat)); }

// -- one row of a score block: fold it into the running softmax, turn scores into exp(s - max) --
// noinline: inlined into the task loop, GCC kept the simd sum in a stack slot (a store and a reload
// per 8 scores: half of this function's time under perf).
__attribute__((noinline)) void online_softmax_row(float* scores, int64_t count, OnlineSoftmax& state, float* acc, int64_t head_dim) {
  float block_max = -INFINITY;
#pragma omp simd reduction(max : block_max)
  for (int64_t j = 0; j < count; ++j) block_max = scores[j] > block_max ? scores[j] : block_max;  // std::max does not vectorise here (GCC 12)
  const float factor = online_softmax_rescale(state, block_max);
  const float row_max = state.max;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < count; ++j) {
    scores[j] = fast_exp(scores[j] - row_max);
    sum += scores[j];
  }
  state.sum += sum;
#pragma omp simd
  for (int64_t d = 0; d < head_dim; ++d) acc[d] *= factor;
}

std::tuple<at::Tensor, at::Tensor> sparse_causal_attn_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                              const at::Tensor& v_in, int64_t num_frames,
                                                              double scale) {
  check_video_attention("sparse_causal_attn_fwd", q_in, k_in, v_in, num_frames);
  const at::Tensor q = as_fp32_rows(q_in), k = as_fp32_rows(k_in), v = as_fp32_rows(v_in);
  const int64_t rows = q.size(0), heads = q.size(1), tokens = q.size(2), head_dim = q.size(3);
  at::Tensor out = at::empty({rows, heads, tokens, head_dim}, q.options());
  at::Tensor lse = at::empty({rows, heads, tokens}, q.options());
  const Rows Q(q), K(k), V(v), O(out);
  float* lse_data = lse.data_ptr<float>();
  const int64_t query_blocks = (tokens + kForwardBlockQ - 1) / kForwardBlockQ;

  at::parallel_for(0, rows * heads * query_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(kForwardBlockQ * kForwardBlockK);
    std::vector<float> acc(kForwardBlockQ * head_dim);
    std::vector<OnlineSoftmax> state(kForwardBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      // frame fastest: at::parallel_for splits the tasks into contiguous ranges, one per thread,
      // and frames 0 and 1 read one key frame where the others read two; interleaving the frames
      // gives every range the same work (rows outermost gave thread 0 six key frames to eight).
      const int frame = static_cast<int>(task % num_frames);
      const int64_t query_block = (task / num_frames) % query_blocks;
      const int64_t head = (task / (num_frames * query_blocks)) % heads;
      const int64_t first_row = task / (num_frames * query_blocks * heads) * num_frames;  // frame 0 of this video
      const int64_t row = first_row + frame;
      const int64_t q0 = query_block * kForwardBlockQ, block_q = std::min(kForwardBlockQ, tokens - q0);
      std::fill(acc.begin(), acc.begin() + block_q * head_dim, 0.0f);
      std::fill(state.begin(), state.begin() + block_q, online_softmax_init());

      for (int segment = 0; segment < sparse_causal_num_key_frames(frame); ++segment) {
        const int64_t key_row = first_row + sparse_causal_key_frame(frame, segment);
        for (int64_t k0 = 0; k0 < tokens; k0 += kForwardBlockK) {
          const int64_t block_k = std::min(kForwardBlockK, tokens - k0);
          // -- S = scale * Q K^T: (block_q, block_k) --
          cpu::gemm(false, true, block_q, block_k, head_dim, static_cast<float>(scale), Q.at(row, head, q0),
                    Q.stride_n, K.at(key_row, head, k0), K.stride_n, 0.0f, scores.data(), block_k);
          // -- online softmax update, rescaling the accumulator rows --
          for (int64_t i = 0; i < block_q; ++i)
            online_softmax_row(scores.data() + i * block_k, block_k, state[i], acc.data() + i * head_dim, head_dim);
          // -- acc += P V --
          cpu::gemm(false, false, block_q, head_dim, block_k, 1.0f, scores.data(), block_k, V.at(key_row, head, k0),
                    V.stride_n, 1.0f, acc.data(), head_dim);
        }
      }
      // -- epilogue: normalise by the softmax sum, save the log-sum-exp --
      for (int64_t i = 0; i < block_q; ++i) {
        const float inv_sum = 1.0f / state[i].sum;
        float* dst = O.at(row, head, q0 + i);
        const float* src = acc.data() + i * head_dim;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = src[d] * inv_sum;
        lse_data[(row * heads + head) * tokens + q0 + i] = online_softmax_lse(state[i]);
      }
    }
  });
  return {out.to(q_in.scalar_type()), lse};
}

// delta[row, head, token] = dot(dO, O): the softmax backward's per-row correction.
at::Tensor row_dot(const Rows& a, const Rows& b, int64_t rows, int64_t heads, int64_t tokens, int64_t head_dim) {
  at::Tensor delta = at::empty({rows, heads, tokens}, at::TensorOptions().dtype(at::kFloat));
  float* out = delta.data_ptr<float>();
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / heads, head = task % heads;
      for (int64_t n = 0; n < tokens; ++n) {
        const float *x = a.at(row, head, n), *y = b.at(row, head, n);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t d = 0; d < head_dim; ++d) sum += x[d] * y[d];
        out[task * tokens + n] = sum;
      }
    }
  });
  return delta;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_causal_attn_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, int64_t num_frames, double scale) {
  check_video_attention("sparse_causal_attn_bwd", q_in, k_in, v_in, num_frames);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "sparse_causal_attn_bwd: grad_out and out must have q's shape ", q_in.sizes());
  const at::Tensor q = as_fp32_rows(q_in), k = as_fp32_rows(k_in), v = as_fp32_rows(v_in);
  const at::Tensor grad_out = as_fp32_rows(grad_out_in), out = as_fp32_rows(out_in);
  const int64_t rows = q.size(0), heads = q.size(1), tokens = q.size(2), head_dim = q.size(3);
  check_lse("sparse_causal_attn_bwd", lse_in, q_in);
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  const int64_t videos = rows / num_frames;
  const Rows Q(q), K(k), V(v), dO(grad_out);
  const at::Tensor delta = row_dot(dO, Rows(out), rows, heads, tokens, head_dim);

  const auto fp32 = q.options();
  at::Tensor dq = at::zeros({rows, heads, tokens, head_dim}, fp32);
  at::Tensor dk = at::zeros({rows, heads, tokens, head_dim}, fp32);
  at::Tensor dv = at::zeros({rows, heads, tokens, head_dim}, fp32);
  // per thread: frame 0's (dK, dV) of every (video, head)
  const int64_t threads = at::get_num_threads();
  at::Tensor frame0_grads = at::zeros({threads, 2, videos, heads, tokens, head_dim}, fp32);
  const Rows dQ(dq), dK(dk), dV(dv);
  const float *lse_data = lse.data_ptr<float>(), *delta_data = delta.data_ptr<float>();
  float* frame0_data = frame0_grads.data_ptr<float>();
  const int64_t frame0_size = videos * heads * tokens * head_dim;
  const float scale_f = static_cast<float>(scale);

  // Tasks run frame-fastest so every thread's contiguous range mixes 1- and 2-key-frame tasks.
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    const int64_t thread = at::get_thread_num();
    TORCH_CHECK(thread < threads, "sparse_causal_attn_bwd: more threads than at::get_num_threads()");
    std::vector<float> prob(kBackwardBlockQ * kBackwardBlockK), prob_grad(kBackwardBlockQ * kBackwardBlockK);
    for (int64_t task = begin; task < end; ++task) {
      const int frame = static_cast<int>(task % num_frames);
      const int64_t head = (task / num_frames) % heads;
      const int64_t video = task / (num_frames * heads);
      const int64_t row = video * num_frames + frame, first_row = video * num_frames;
      const float* row_lse = lse_data + (row * heads + head) * tokens;
      const float* row_delta = delta_data + (row * heads + head) * tokens;

      for (int segment = 0; segment < sparse_causal_num_key_frames(frame); ++segment) {
        const int key_frame = sparse_causal_key_frame(frame, segment);
        const int64_t key_row = first_row + key_frame;
        // frame 0's gradients go to this thread's buffer, frame j >= 1's (one reader) in place
        float *dk_base, *dv_base;
        if (key_frame == 0) {
          const int64_t offset = (video * heads + head) * tokens * head_dim;
          dk_base = frame0_data + (thread * 2 + 0) * frame0_size + offset;
          dv_base = frame0_data + (thread * 2 + 1) * frame0_size + offset;
        } else {
          dk_base = dK.at(key_row, head, 0);
          dv_base = dV.at(key_row, head, 0);
        }
        for (int64_t k0 = 0; k0 < tokens; k0 += kBackwardBlockK) {
          const int64_t block_k = std::min(kBackwardBlockK, tokens - k0);
          const float *k_block = K.at(key_row, head, k0), *v_block = V.at(key_row, head, k0);
          float *dk_block = dk_base + k0 * head_dim, *dv_block = dv_base + k0 * head_dim;
          for (int64_t q0 = 0; q0 < tokens; q0 += kBackwardBlockQ) {
            const int64_t block_q = std::min(kBackwardBlockQ, tokens - q0);
            const float *q_block = Q.at(row, head, q0), *do_block = dO.at(row, head, q0);
            // -- P = exp(scale * Q K^T - lse) --
            cpu::gemm(false, true, block_q, block_k, head_dim, scale_f, q_block, Q.stride_n, k_block, K.stride_n, 0.0f,
                      prob.data(), block_k);
            for (int64_t i = 0; i < block_q; ++i) {
              float* p = prob.data() + i * block_k;
              const float row_lse_i = row_lse[q0 + i];
#pragma omp simd
              for (int64_t j = 0; j < block_k; ++j) p[j] = softmax_prob(p[j], row_lse_i);
            }
            // -- dV += P^T dO --
            cpu::gemm(true, false, block_k, head_dim, block_q, 1.0f, prob.data(), block_k, do_block, dO.stride_n, 1.0f,
                      dv_block, head_dim);
            // -- dS = P * (dO V^T - delta) --
            cpu::gemm(false, true, block_q, block_k, head_dim, 1.0f, do_block, dO.stride_n, v_block, V.stride_n, 0.0f,
                      prob_grad.data(), block_k);
            for (int64_t i = 0; i < block_q; ++i) {
              const float *p = prob.data() + i * block_k;
              float* ds = prob_grad.data() + i * block_k;
              const float row_delta_i = row_delta[q0 + i];
#pragma omp simd
              for (int64_t j = 0; j < block_k; ++j) ds[j] = softmax_score_grad(p[j], ds[j], row_delta_i);
            }
            // -- dQ += scale * dS K; dK += scale * dS^T Q --
            cpu::gemm(false, false, block_q, head_dim, block_k, scale_f, prob_grad.data(), block_k, k_block, K.stride_n,
                      1.0f, dQ.at(row, head, q0), dQ.stride_n);
            cpu::gemm(true, false, block_k, head_dim, block_q, scale_f, prob_grad.data(), block_k, q_block, Q.stride_n,
                      1.0f, dk_block, head_dim);
          }
        }
      }
    }
  });
  // (threads, 2, videos, heads, tokens, head_dim) -> frame 0 rows of dK and dV
  const at::Tensor frame0 = frame0_grads.sum(0);
  dk.view({videos, num_frames, heads, tokens, head_dim}).select(1, 0).copy_(frame0[0]);
  dv.view({videos, num_frames, heads, tokens, head_dim}).select(1, 0).copy_(frame0[1]);
  const auto dtype = q_in.scalar_type();
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(depthvid, CPU, m) {
  m.impl("sparse_causal_attn_fwd", &sparse_causal_attn_fwd_cpu);
  m.impl("sparse_causal_attn_bwd", &sparse_causal_attn_bwd_cpu);
}

}  // namespace depthvid
