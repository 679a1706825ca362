// Temporal attention on the CPU, on the native (batch*frames, heads, tokens, head_dim) layout:
// at each (video, head, token) the F frames' rows attend to each other. No transposes: for a run
// of consecutive tasks a thread gathers each task's F strided rows of q, k, v into an fp32 tile
// (rows zero-padded to a multiple of 8 lanes, F padded to a multiple of 8 rows), does the F x F
// softmax in L1 and writes the F output rows back in place. Saves lse per row. The backward
// recomputes P = exp(S - lse) from the same F x F scores; every gradient of a token belongs to
// its task, so nothing is shared between threads.
//
// The F x F x head_dim products are tiny, so their speed is register blocking: row_dots computes 8
// dot products at once with 8 independent vector accumulators and combine_rows keeps 4 in flight
// (with one `omp simd` reduction per dot product each product waited on its FMA latency; 8 x 5 x
// {256, 1024} x 64 in cache, 1 thread: forward 2.2-2.9 -> 1.1-1.6 us per token, backward
// 5.2-5.6 -> 2.5-2.8).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attention_checks.h"
#include "cpu_vec.h"
#include "video_ops_math.h"

namespace depthvid {
namespace {

using cpu::kLanes;
using cpu::load8;
using cpu::store8;
using cpu::vec8;

constexpr int64_t kTasksPerRun = 16;  // its tiles (<= 7 x 16 x F x head_dim fp32) stay in L2

int64_t round_up_to_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// A run: consecutive tasks of one video along whichever of heads and tokens lies closer in memory
// (tokens in a contiguous (batch*frames, heads, tokens, head_dim) tensor, heads in the processors'
// (batch*frames, tokens, heads, head_dim) views). Its tiles are gathered frame by frame, so each
// frame's rows are read as one sequential stretch rather than F strided rows per task.
struct TaskRun {
  int64_t video, outer, inner, count;
  bool heads_inner;
  int64_t head(int64_t t) const { return heads_inner ? inner + t : outer; }
  int64_t token(int64_t t) const { return heads_inner ? outer : inner + t; }
};

template <typename scalar_t>
struct FrameRows {  // the F rows of one (video, head, token) in a (batch*frames, heads, tokens, head_dim) tensor
  scalar_t* data;
  int64_t stride_b, stride_h, stride_n;
  explicit FrameRows(const at::Tensor& t)
      : data(t.data_ptr<scalar_t>()), stride_b(t.stride(0)), stride_h(t.stride(1)), stride_n(t.stride(2)) {}
  scalar_t* at(int64_t row, int64_t head, int64_t token) const {
    return data + row * stride_b + head * stride_h + token * stride_n;
  }
  // task t's rows video*F .. video*F+F-1 -> tiles + t * tile_size, (F, row_len) fp32; lanes
  // head_dim.. row_len keep their zeros
  void gather(float* tiles, int64_t tile_size, int64_t row_len, const TaskRun& run, int64_t frames,
              int64_t head_dim) const {
    for (int64_t f = 0; f < frames; ++f) {
      for (int64_t t = 0; t < run.count; ++t) {
        const scalar_t* src = at(run.video * frames + f, run.head(t), run.token(t));
        float* dst = tiles + t * tile_size + f * row_len;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<float>(src[d]);
      }
    }
  }
  void scatter(const float* tiles, int64_t tile_size, int64_t row_len, const TaskRun& run, int64_t frames,
               int64_t head_dim) const {
    for (int64_t f = 0; f < frames; ++f) {
      for (int64_t t = 0; t < run.count; ++t) {
        scalar_t* dst = at(run.video * frames + f, run.head(t), run.token(t));
        const float* src = tiles + t * tile_size + f * row_len;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<scalar_t>(src[d]);
      }
    }
  }
};

// Splits the task range [begin, end) of (video, outer, inner) tasks into runs of at most
// kTasksPerRun consecutive inner indices; inner is the head when q's heads are closer in memory
// than its tokens.
template <typename Body>
void for_each_run(int64_t begin, int64_t end, const at::Tensor& q, Body body) {
  const bool heads_inner = q.stride(1) < q.stride(2);
  const int64_t heads = q.size(1), tokens = q.size(2);
  const int64_t inner_size = heads_inner ? heads : tokens, outer_size = heads_inner ? tokens : heads;
  for (int64_t task = begin; task < end;) {
    const int64_t inner = task % inner_size;
    const TaskRun run{task / (inner_size * outer_size), (task / inner_size) % outer_size, inner,
                       std::min({end - task, inner_size - inner, kTasksPerRun}), heads_inner};
    body(run);
    task += run.count;
  }
}

// out[i, j] = dot(a row i, b row j) for i < a_rows, j < b_rows (a multiple of 8); rows are
// row_len floats (a multiple of 8), out rows b_rows floats.
void row_dots(const float* a, int64_t a_rows, const float* b, int64_t b_rows, int64_t row_len, float* out) {
  for (int64_t i = 0; i < a_rows; ++i) {
    for (int64_t j0 = 0; j0 < b_rows; j0 += kLanes) {
      vec8 acc[kLanes] = {};
      for (int64_t c = 0; c < row_len; c += kLanes) {
        const vec8 x = load8(a + i * row_len + c);
        for (int j = 0; j < kLanes; ++j) acc[j] += x * load8(b + (j0 + j) * row_len + c);
      }
      store8(out + i * b_rows + j0, cpu::lane_sums(acc));
    }
  }
}

// out row i = sum_{j < in_rows} coef[i * coef_row + j * coef_col] * (x row j), for i < out_rows;
// rows of row_len floats (a multiple of 8). Strided coef reads P or P^T from one tile.
void combine_rows(const float* coef, int64_t coef_row, int64_t coef_col, int64_t out_rows, int64_t in_rows,
                  const float* x, int64_t row_len, float* out) {
  constexpr int64_t kWide = 4 * kLanes;  // four independent accumulators hide the FMA latency
  for (int64_t i = 0; i < out_rows; ++i) {
    int64_t c = 0;
    for (; c + kWide <= row_len; c += kWide) {
      vec8 acc[4] = {};
      for (int64_t j = 0; j < in_rows; ++j) {
        const float a = coef[i * coef_row + j * coef_col];
        for (int u = 0; u < 4; ++u) acc[u] += a * load8(x + j * row_len + c + u * kLanes);
      }
      for (int u = 0; u < 4; ++u) store8(out + i * row_len + c + u * kLanes, acc[u]);
    }
    for (; c < row_len; c += kLanes) {
      vec8 acc = {};
      for (int64_t j = 0; j < in_rows; ++j) acc += coef[i * coef_row + j * coef_col] * load8(x + j * row_len + c);
      store8(out + i * row_len + c, acc);
    }
  }
}

// The per-thread tiles of a run: for each tensor, kTasksPerRun tiles of (F, head_dim) in fp32,
// both rounded up to 8 and zeroed once, so the padding rows and lanes stay zero.
struct Tiles {
  int64_t row_len, rows, tile_size;
  std::vector<float> storage;
  Tiles(int64_t tensors, int64_t frames, int64_t head_dim)
      : row_len(round_up_to_lanes(head_dim)),
        rows(round_up_to_lanes(frames)),
        tile_size(rows * row_len),
        storage(tensors * kTasksPerRun * tile_size, 0.0f) {}
  float* of(int64_t tensor, int64_t task = 0) {
    return storage.data() + (tensor * kTasksPerRun + task) * tile_size;
  }
};

template <typename scalar_t>
void temporal_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                  int64_t frames, float scale) {
  const int64_t rows = q.size(0), heads = q.size(1), tokens = q.size(2), head_dim = q.size(3);
  const FrameRows<scalar_t> Q(q), K(k), V(v), O(out);
  float* lse_data = lse.data_ptr<float>();
  enum { kQ, kK, kV, kOut };
  at::parallel_for(0, rows / frames * heads * tokens, kTasksPerRun, [&](int64_t begin, int64_t end) {
    Tiles tiles(4, frames, head_dim);
    const int64_t row_len = tiles.row_len, key_rows = tiles.rows, tile_size = tiles.tile_size;
    std::vector<float> prob(frames * key_rows);
    for_each_run(begin, end, q, [&](const TaskRun& run) {
      Q.gather(tiles.of(kQ), tile_size, row_len, run, frames, head_dim);
      K.gather(tiles.of(kK), tile_size, row_len, run, frames, head_dim);
      V.gather(tiles.of(kV), tile_size, row_len, run, frames, head_dim);
      for (int64_t t = 0; t < run.count; ++t) {
        row_dots(tiles.of(kQ, t), frames, tiles.of(kK, t), key_rows, row_len, prob.data());  // S / scale
        for (int64_t f = 0; f < frames; ++f) {
          // -- P = softmax over the frames; padding columns get probability 0 --
          float* p = prob.data() + f * key_rows;
          float row_max = -INFINITY;
          for (int64_t g = 0; g < frames; ++g) row_max = std::max(row_max, scale * p[g]);
          OnlineSoftmax state = online_softmax_init();
          online_softmax_rescale(state, row_max);
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t g = 0; g < key_rows; ++g) {
            p[g] = g < frames ? fast_exp(scale * p[g] - state.max) : 0.0f;
            sum += p[g];
          }
          state.sum = sum;
          const float inv_sum = 1.0f / sum;
#pragma omp simd
          for (int64_t g = 0; g < key_rows; ++g) p[g] *= inv_sum;
          lse_data[((run.video * frames + f) * heads + run.head(t)) * tokens + run.token(t)] = online_softmax_lse(state);
        }
        combine_rows(prob.data(), key_rows, 1, frames, frames, tiles.of(kV, t), row_len, tiles.of(kOut, t));  // P V
      }
      O.scatter(tiles.of(kOut), tile_size, row_len, run, frames, head_dim);
    });
  });
}

template <typename scalar_t>
void temporal_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, int64_t frames, float scale) {
  const int64_t rows = q.size(0), heads = q.size(1), tokens = q.size(2), head_dim = q.size(3);
  const FrameRows<scalar_t> dO(grad_out), Q(q), K(k), V(v), dQ(dq), dK(dk), dV(dv);
  const float* lse_data = lse.data_ptr<float>();
  enum { kQ, kK, kV, kGradOut, kGradQ, kGradK, kGradV };
  at::parallel_for(0, rows / frames * heads * tokens, kTasksPerRun, [&](int64_t begin, int64_t end) {
    Tiles tiles(7, frames, head_dim);
    const int64_t row_len = tiles.row_len, key_rows = tiles.rows, tile_size = tiles.tile_size;
    std::vector<float> prob(frames * key_rows), score_grad(frames * key_rows);
    for_each_run(begin, end, q, [&](const TaskRun& run) {
      Q.gather(tiles.of(kQ), tile_size, row_len, run, frames, head_dim);
      K.gather(tiles.of(kK), tile_size, row_len, run, frames, head_dim);
      V.gather(tiles.of(kV), tile_size, row_len, run, frames, head_dim);
      dO.gather(tiles.of(kGradOut), tile_size, row_len, run, frames, head_dim);
      for (int64_t t = 0; t < run.count; ++t) {
        const float *qt = tiles.of(kQ, t), *kt = tiles.of(kK, t), *dout = tiles.of(kGradOut, t);
        row_dots(qt, frames, kt, key_rows, row_len, prob.data());                     // S / scale
        row_dots(dout, frames, tiles.of(kV, t), key_rows, row_len, score_grad.data());  // dP = dO V^T
        // -- P = exp(S - lse), dS = scale * P (dP - rowsum(P dP)); padding columns give 0 --
        for (int64_t f = 0; f < frames; ++f) {
          const float row_lse = lse_data[((run.video * frames + f) * heads + run.head(t)) * tokens + run.token(t)];
          float *p = prob.data() + f * key_rows, *ds = score_grad.data() + f * key_rows;
          float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
          for (int64_t g = 0; g < key_rows; ++g) {
            p[g] = g < frames ? softmax_prob(scale * p[g], row_lse) : 0.0f;
            delta += p[g] * ds[g];
          }
#pragma omp simd
          for (int64_t g = 0; g < key_rows; ++g) ds[g] = scale * softmax_score_grad(p[g], ds[g], delta);
        }
        // -- dQ = dS K, dK = dS^T Q, dV = P^T dO --
        combine_rows(score_grad.data(), key_rows, 1, frames, frames, kt, row_len, tiles.of(kGradQ, t));
        combine_rows(score_grad.data(), 1, key_rows, frames, frames, qt, row_len, tiles.of(kGradK, t));
        combine_rows(prob.data(), 1, key_rows, frames, frames, dout, row_len, tiles.of(kGradV, t));
      }
      dQ.scatter(tiles.of(kGradQ), tile_size, row_len, run, frames, head_dim);
      dK.scatter(tiles.of(kGradK), tile_size, row_len, run, frames, head_dim);
      dV.scatter(tiles.of(kGradV), tile_size, row_len, run, frames, head_dim);
    });
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
