// Sparse-causal attention on CUDA: the CPU kernel's algorithm (csrc/sparse_causal_attn.cpp) on
// tensor cores, with the same per-element math (csrc/video_ops_math.h: online softmax, lse,
// key-frame index arithmetic).
//
// forward   grid (query blocks, heads, batch*frames), 4 warps x 16 query rows. For each key block
//           of frame 0 and frame f-1: S = Q K^T (WMMA, fp32), online softmax on 2 lanes per row,
//           P (fp16/bf16) V added to an fp32 O tile in shared memory (rows are rescaled there:
//           WMMA's fragment layout is opaque). Saves lse.
// backward  delta = rowsum(dO * O); then, FlashAttention-2 style without atomics:
//           dQ kernel (grid as the forward, dQ in WMMA registers): S, dP = dO V^T, dS, dQ += dS K;
//           dK/dV kernel (grid over key blocks of every frame): loops over the query frames that
//           read this key frame (all frames for frame 0, frame j+1 for frame j >= 1) and adds
//           P^T dO and dS^T Q. Head dims > 80 run dV and dK as two launches so the WMMA
//           accumulators (16 rows x head_dim each) fit in registers without spilling.
// Head dims are padded to a multiple of 16 (40 -> 48) with zero-filled loads.
#include "attention_tiles.cuh"
#include "launchers.h"
#include "video_ops_math.h"

namespace depthvid::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int BLOCK_Q = 16 * kWarps;  // one 16-row WMMA tile per warp
constexpr int BLOCK_K = 64;

template <int HEAD_DIM>
struct Layout {  // shared-memory leading dimensions, padded by 16 bytes against bank conflicts
  static constexpr int LD = HEAD_DIM + 8;  // fp16/bf16 Q, K, V, dO tiles
  static constexpr int LDS = BLOCK_K + 4;  // fp32 score tiles
  static constexpr int LDP = BLOCK_K + 8;  // fp16/bf16 probability tiles
  static constexpr int LDO = HEAD_DIM + 4;  // fp32 output tile
};

// Shared memory per block, computed in one place for the launcher and the kernels' carving.
template <typename T, int HEAD_DIM>
__host__ __device__ constexpr int forward_smem_bytes() {
  using L = Layout<HEAD_DIM>;
  return (BLOCK_Q + 2 * BLOCK_K) * L::LD * sizeof(T) + BLOCK_Q * L::LDS * 4 + BLOCK_Q * L::LDP * sizeof(T) +
         BLOCK_Q * L::LDO * 4 + 2 * BLOCK_Q * 4;
}
template <typename T, int HEAD_DIM>
__host__ __device__ constexpr int backward_smem_bytes() {  // Q, dO, K, V tiles + two fp32 score tiles + two 16-bit ones + lse/delta
  using L = Layout<HEAD_DIM>;
  return 4 * 64 * L::LD * sizeof(T) + 2 * 64 * L::LDS * 4 + 2 * 64 * L::LDP * sizeof(T) + 2 * 64 * 4;
}

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_causal_attn_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                  T* __restrict__ out, float* __restrict__ lse, AttentionShape shape,
                                  AttentionStrides q_strides, AttentionStrides kv_strides) {
  using L = Layout<HEAD_DIM>;
  static_assert(forward_smem_bytes<T, HEAD_DIM>() <= kMaxSmemPerBlock, "forward tiles exceed shared memory");
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_tile = reinterpret_cast<T*>(smem);
  T* k_tile = q_tile + BLOCK_Q * L::LD;
  T* v_tile = k_tile + BLOCK_K * L::LD;
  float* s_tile = reinterpret_cast<float*>(v_tile + BLOCK_K * L::LD);
  T* p_tile = reinterpret_cast<T*>(s_tile + BLOCK_Q * L::LDS);
  float* o_tile = reinterpret_cast<float*>(p_tile + BLOCK_Q * L::LDP);
  float* row_max = o_tile + BLOCK_Q * L::LDO;
  float* row_sum = row_max + BLOCK_Q;

  const int q0 = blockIdx.x * BLOCK_Q, head = blockIdx.y;
  const int64_t row = blockIdx.z;
  const int frame = static_cast<int>(blockIdx.z % shape.num_frames);  // 32-bit: no 64-bit division call
  const int64_t first_row = row - frame;
  const int tokens = static_cast<int>(shape.tokens), head_dim = static_cast<int>(shape.head_dim);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  load_tile<BLOCK_Q, HEAD_DIM, L::LD>(q_tile, q + row * q_strides.row + head * q_strides.head, q_strides.token, q0,
                                      tokens, head_dim);
  for (int e = threadIdx.x; e < BLOCK_Q * L::LDO; e += kThreads) o_tile[e] = 0.0f;
  for (int r = threadIdx.x; r < BLOCK_Q; r += kThreads) {
    const OnlineSoftmax init = online_softmax_init();
    row_max[r] = init.max;
    row_sum[r] = init.sum;
  }
  // 2 lanes per query row in the softmax: row `r`, columns [half * 32, half * 32 + 32)
  const int r = warp * 16 + lane / 2, half = lane % 2;

  for (int segment = 0; segment < sparse_causal_num_key_frames(frame); ++segment) {
    const int64_t key_row = first_row + sparse_causal_key_frame(frame, segment);
    const T* k_base = k + key_row * kv_strides.row + head * kv_strides.head;
    const T* v_base = v + key_row * kv_strides.row + head * kv_strides.head;
    for (int k0 = 0; k0 < tokens; k0 += BLOCK_K) {
      __syncthreads();  // the previous block's K/V tiles are no longer read
      load_tile<BLOCK_K, HEAD_DIM, L::LD>(k_tile, k_base, kv_strides.token, k0, tokens, head_dim);
      load_tile<BLOCK_K, HEAD_DIM, L::LD>(v_tile, v_base, kv_strides.token, k0, tokens, head_dim);
      __syncthreads();
      // -- S = Q K^T for this warp's 16 rows --
      warp_scores<BLOCK_K, HEAD_DIM>(s_tile + warp * 16 * L::LDS, L::LDS, q_tile + warp * 16 * L::LD, L::LD, k_tile,
                                     L::LD);
      __syncwarp();
      // -- online softmax update; P in 16 bits for the tensor cores; rescale the O row --
      {
        const float* s = s_tile + r * L::LDS + half * 32;
        float block_max = -INFINITY;
        for (int c = 0; c < 32; ++c)
          if (k0 + half * 32 + c < tokens) block_max = fmaxf(block_max, s[c] * shape.scale);
        block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 1));
        OnlineSoftmax state{row_max[r], row_sum[r]};
        const float factor = online_softmax_rescale(state, block_max);
        float sum = 0.0f;
        for (int c = 0; c < 32; ++c) {
          const bool inside = k0 + half * 32 + c < tokens;
          const float p = inside ? fast_exp(s[c] * shape.scale - state.max) : 0.0f;
          p_tile[r * L::LDP + half * 32 + c] = from_float<T>(p);
          sum += p;
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        __syncwarp();
        if (half == 0) {
          row_max[r] = state.max;
          row_sum[r] = state.sum + sum;
        }
        for (int d = half; d < HEAD_DIM; d += 2) o_tile[r * L::LDO + d] *= factor;
      }
      __syncwarp();
      // -- O += P V --
#pragma unroll
      for (int d0 = 0; d0 < HEAD_DIM; d0 += 16) {
        FragAcc acc;
        float* o = o_tile + warp * 16 * L::LDO + d0;
        wmma::load_matrix_sync(acc, o, L::LDO, wmma::mem_row_major);
        mma_tile<BLOCK_K, false>(acc, p_tile + warp * 16 * L::LDP, L::LDP, v_tile + d0, L::LD);
        wmma::store_matrix_sync(o, acc, L::LDO, wmma::mem_row_major);
      }
      __syncwarp();
    }
  }
  // -- epilogue: O / sum, lse --
  if (q0 + r < tokens) {
    const float inv_sum = 1.0f / row_sum[r];
    T* dst = out + ((row * shape.heads + head) * shape.tokens + q0 + r) * shape.head_dim;  // out is contiguous
    for (int d = half; d < head_dim; d += 2) dst[d] = from_float<T>(o_tile[r * L::LDO + d] * inv_sum);
    if (half == 0) lse[(row * shape.heads + head) * shape.tokens + q0 + r] = online_softmax_lse({row_max[r], row_sum[r]});
  }
}

// delta[row, head, token] = dot(dO, O) in fp32, one thread per row.
template <typename T>
__global__ void row_dot_kernel(const T* __restrict__ grad_out, const T* __restrict__ out, float* __restrict__ delta,
                               AttentionShape shape, AttentionStrides strides) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= shape.rows * shape.heads * shape.tokens) return;
  const int64_t token = index % shape.tokens, head = (index / shape.tokens) % shape.heads;
  const int64_t row = index / (shape.tokens * shape.heads);
  const int64_t offset = row * strides.row + head * strides.head + token * strides.token;
  float sum = 0.0f;
  for (int d = 0; d < shape.head_dim; ++d) sum += to_float(grad_out[offset + d]) * to_float(out[offset + d]);
  delta[index] = sum;
}

// dS = P * (dP - delta) for a 64 x 64 tile held as fp32 scores S (s) and dP (dp), by 2 lanes per row;
// rows index queries (QUERY_ROWS) or keys (the transposed tiles of the dK/dV kernel).
template <bool QUERY_ROWS, typename T, int LDS, int LDP>
__device__ __forceinline__ void score_grads(const float* s, const float* dp, T* p_out, T* ds_out, const float* lse,
                                            const float* delta, int r, int half, bool row_inside, int col0,
                                            int tokens, float scale) {
  for (int c = half * 32; c < half * 32 + 32; ++c) {
    const bool inside = row_inside && col0 + c < tokens;
    const int query = QUERY_ROWS ? r : c;
    const float p = inside ? softmax_prob(s[r * LDS + c] * scale, lse[query]) : 0.0f;
    const float ds = inside ? softmax_score_grad(p, dp[r * LDS + c], delta[query]) : 0.0f;
    if (p_out != nullptr) p_out[r * LDP + c] = from_float<T>(p);
    ds_out[r * LDP + c] = from_float<T>(ds);
  }
}

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_causal_attn_bwd_dq_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
                                     const T* __restrict__ v, const float* __restrict__ lse,
                                     const float* __restrict__ delta, T* __restrict__ dq, AttentionShape shape,
                                     AttentionStrides q_strides, AttentionStrides kv_strides,
                                     AttentionStrides out_strides) {
  using L = Layout<HEAD_DIM>;
  static_assert(backward_smem_bytes<T, HEAD_DIM>() <= kMaxSmemPerBlock, "backward tiles exceed shared memory");
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_tile = reinterpret_cast<T*>(smem);
  T* do_tile = q_tile + 64 * L::LD;
  T* k_tile = do_tile + 64 * L::LD;
  T* v_tile = k_tile + 64 * L::LD;
  float* s_tile = reinterpret_cast<float*>(v_tile + 64 * L::LD);
  float* dp_tile = s_tile + 64 * L::LDS;
  T* ds_tile = reinterpret_cast<T*>(dp_tile + 64 * L::LDS);
  float* lse_rows = reinterpret_cast<float*>(ds_tile + 2 * 64 * L::LDP);
  float* delta_rows = lse_rows + 64;

  const int q0 = blockIdx.x * BLOCK_Q, head = blockIdx.y;
  const int64_t row = blockIdx.z;
  const int frame = static_cast<int>(blockIdx.z % shape.num_frames);  // 32-bit: no 64-bit division call
  const int64_t first_row = row - frame;
  const int tokens = static_cast<int>(shape.tokens), head_dim = static_cast<int>(shape.head_dim);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r = warp * 16 + lane / 2, half = lane % 2;

  load_tile<BLOCK_Q, HEAD_DIM, L::LD>(q_tile, q + row * q_strides.row + head * q_strides.head, q_strides.token, q0,
                                      tokens, head_dim);
  load_tile<BLOCK_Q, HEAD_DIM, L::LD>(do_tile, grad_out + row * out_strides.row + head * out_strides.head,
                                      out_strides.token, q0, tokens, head_dim);
  const int64_t stats = (row * shape.heads + head) * shape.tokens;
  for (int i = threadIdx.x; i < BLOCK_Q; i += kThreads) {
    lse_rows[i] = q0 + i < tokens ? lse[stats + q0 + i] : 0.0f;
    delta_rows[i] = q0 + i < tokens ? delta[stats + q0 + i] : 0.0f;
  }
  FragAcc dq_acc[HEAD_DIM / 16];  // this warp's 16 rows of dQ stay in registers
#pragma unroll
  for (int t = 0; t < HEAD_DIM / 16; ++t) wmma::fill_fragment(dq_acc[t], 0.0f);

  for (int segment = 0; segment < sparse_causal_num_key_frames(frame); ++segment) {
    const int64_t key_row = first_row + sparse_causal_key_frame(frame, segment);
    for (int k0 = 0; k0 < tokens; k0 += BLOCK_K) {
      __syncthreads();
      load_tile<BLOCK_K, HEAD_DIM, L::LD>(k_tile, k + key_row * kv_strides.row + head * kv_strides.head,
                                          kv_strides.token, k0, tokens, head_dim);
      load_tile<BLOCK_K, HEAD_DIM, L::LD>(v_tile, v + key_row * kv_strides.row + head * kv_strides.head,
                                          kv_strides.token, k0, tokens, head_dim);
      __syncthreads();
      // -- S = Q K^T, dP = dO V^T --
      warp_scores<BLOCK_K, HEAD_DIM>(s_tile + warp * 16 * L::LDS, L::LDS, q_tile + warp * 16 * L::LD, L::LD, k_tile,
                                     L::LD);
      warp_scores<BLOCK_K, HEAD_DIM>(dp_tile + warp * 16 * L::LDS, L::LDS, do_tile + warp * 16 * L::LD, L::LD,
                                     v_tile, L::LD);
      __syncwarp();
      // -- dS = P (dP - delta) --
      score_grads<true, T, L::LDS, L::LDP>(s_tile, dp_tile, static_cast<T*>(nullptr), ds_tile, lse_rows, delta_rows,
                                           r, half, q0 + r < tokens, k0, tokens, shape.scale);
      __syncwarp();
      // -- dQ += dS K --
#pragma unroll
      for (int t = 0; t < HEAD_DIM / 16; ++t)
        mma_tile<BLOCK_K, false>(dq_acc[t], ds_tile + warp * 16 * L::LDP, L::LDP, k_tile + t * 16, L::LD);
    }
  }
  // -- epilogue: scale, round to the input dtype through the (now free) fp32 score tile --
  __syncthreads();
  float* staging = s_tile + warp * 16 * L::LDS;  // 16 x 16 per step
  T* dst = dq + (row * shape.heads + head) * shape.tokens * shape.head_dim;  // dq is contiguous
#pragma unroll
  for (int t = 0; t < HEAD_DIM / 16; ++t) {
    wmma::store_matrix_sync(staging, dq_acc[t], L::LDS, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int rr = e / 16, d = t * 16 + e % 16, token = q0 + warp * 16 + rr;
      if (token < tokens && d < head_dim) dst[token * shape.head_dim + d] = from_float<T>(staging[rr * L::LDS + e % 16] * shape.scale);
    }
    __syncwarp();
  }
}

// dK and/or dV of one 64-key block of one (frame, head); WITH_DV / WITH_DK split the work for
// large head dims (see the file comment).
template <typename T, int HEAD_DIM, bool WITH_DV, bool WITH_DK>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_causal_attn_bwd_dkdv_kernel(const T* __restrict__ grad_out, const T* __restrict__ q,
                                       const T* __restrict__ k, const T* __restrict__ v,
                                       const float* __restrict__ lse, const float* __restrict__ delta,
                                       T* __restrict__ dk, T* __restrict__ dv, AttentionShape shape,
                                       AttentionStrides q_strides, AttentionStrides kv_strides,
                                       AttentionStrides out_strides) {
  using L = Layout<HEAD_DIM>;
  static_assert(backward_smem_bytes<T, HEAD_DIM>() <= kMaxSmemPerBlock, "backward tiles exceed shared memory");
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_tile = reinterpret_cast<T*>(smem);
  T* do_tile = q_tile + 64 * L::LD;
  T* k_tile = do_tile + 64 * L::LD;
  T* v_tile = k_tile + 64 * L::LD;
  float* st_tile = reinterpret_cast<float*>(v_tile + 64 * L::LD);  // S^T: keys x queries
  float* dpt_tile = st_tile + 64 * L::LDS;                          // dP^T
  T* pt_tile = reinterpret_cast<T*>(dpt_tile + 64 * L::LDS);
  T* dst_tile = pt_tile + 64 * L::LDP;
  float* lse_cols = reinterpret_cast<float*>(dst_tile + 64 * L::LDP);
  float* delta_cols = lse_cols + 64;

  const int k0 = blockIdx.x * BLOCK_K, head = blockIdx.y;
  const int64_t key_row = blockIdx.z;
  const int key_frame = static_cast<int>(blockIdx.z % shape.num_frames);
  const int64_t first_row = key_row - key_frame;
  const int tokens = static_cast<int>(shape.tokens), head_dim = static_cast<int>(shape.head_dim);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r = warp * 16 + lane / 2, half = lane % 2;

  load_tile<BLOCK_K, HEAD_DIM, L::LD>(k_tile, k + key_row * kv_strides.row + head * kv_strides.head, kv_strides.token,
                                      k0, tokens, head_dim);
  load_tile<BLOCK_K, HEAD_DIM, L::LD>(v_tile, v + key_row * kv_strides.row + head * kv_strides.head, kv_strides.token,
                                      k0, tokens, head_dim);
  FragAcc dk_acc[WITH_DK ? HEAD_DIM / 16 : 1], dv_acc[WITH_DV ? HEAD_DIM / 16 : 1];
#pragma unroll
  for (int t = 0; t < HEAD_DIM / 16; ++t) {
    if (WITH_DK) wmma::fill_fragment(dk_acc[t], 0.0f);
    if (WITH_DV) wmma::fill_fragment(dv_acc[t], 0.0f);
  }
  // readers of this key frame: every frame for frame 0 (frames 0, 1 once, f >= 2 as first frame);
  // frame j + 1 only for frame j >= 1
  const int first_reader = key_frame == 0 ? 0 : sparse_causal_reader_of(key_frame);
  const int last_reader = key_frame == 0 ? shape.num_frames - 1 : sparse_causal_reader_of(key_frame);
  for (int reader = first_reader; reader <= last_reader && reader < shape.num_frames; ++reader) {
    const int64_t row = first_row + reader;
    const int64_t stats = (row * shape.heads + head) * shape.tokens;
    for (int q0 = 0; q0 < tokens; q0 += BLOCK_Q) {
      __syncthreads();
      load_tile<BLOCK_Q, HEAD_DIM, L::LD>(q_tile, q + row * q_strides.row + head * q_strides.head, q_strides.token,
                                          q0, tokens, head_dim);
      load_tile<BLOCK_Q, HEAD_DIM, L::LD>(do_tile, grad_out + row * out_strides.row + head * out_strides.head,
                                          out_strides.token, q0, tokens, head_dim);
      for (int i = threadIdx.x; i < BLOCK_Q; i += kThreads) {
        lse_cols[i] = q0 + i < tokens ? lse[stats + q0 + i] : 0.0f;
        delta_cols[i] = q0 + i < tokens ? delta[stats + q0 + i] : 0.0f;
      }
      __syncthreads();
      // -- S^T = K Q^T, dP^T = V dO^T (this warp: 16 keys x 64 queries) --
      warp_scores<BLOCK_Q, HEAD_DIM>(st_tile + warp * 16 * L::LDS, L::LDS, k_tile + warp * 16 * L::LD, L::LD, q_tile,
                                     L::LD);
      if (WITH_DK)
        warp_scores<BLOCK_Q, HEAD_DIM>(dpt_tile + warp * 16 * L::LDS, L::LDS, v_tile + warp * 16 * L::LD, L::LD,
                                       do_tile, L::LD);
      __syncwarp();
      if (WITH_DK) {
        score_grads<false, T, L::LDS, L::LDP>(st_tile, dpt_tile, pt_tile, dst_tile, lse_cols, delta_cols, r, half,
                                              k0 + r < tokens, q0, tokens, shape.scale);
      } else {
        for (int c = half * 32; c < half * 32 + 32; ++c) {
          const bool inside = k0 + r < tokens && q0 + c < tokens;
          pt_tile[r * L::LDP + c] = from_float<T>(inside ? softmax_prob(st_tile[r * L::LDS + c] * shape.scale, lse_cols[c]) : 0.0f);
        }
      }
      __syncwarp();
      // -- dV += P^T dO; dK += dS^T Q --
#pragma unroll
      for (int t = 0; t < HEAD_DIM / 16; ++t) {
        if (WITH_DV) mma_tile<BLOCK_Q, false>(dv_acc[t], pt_tile + warp * 16 * L::LDP, L::LDP, do_tile + t * 16, L::LD);
        if (WITH_DK) mma_tile<BLOCK_Q, false>(dk_acc[t], dst_tile + warp * 16 * L::LDP, L::LDP, q_tile + t * 16, L::LD);
      }
    }
  }
  // -- epilogue through the fp32 score tile; dk, dv are contiguous --
  __syncthreads();
  float* staging = st_tile + warp * 16 * L::LDS;
  const int64_t base = (key_row * shape.heads + head) * shape.tokens * shape.head_dim;
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    if ((which == 0 && !WITH_DV) || (which == 1 && !WITH_DK)) continue;
    T* dst = (which == 0 ? dv : dk) + base;
    const float factor = which == 0 ? 1.0f : shape.scale;
#pragma unroll
    for (int t = 0; t < HEAD_DIM / 16; ++t) {
      wmma::store_matrix_sync(staging, which == 0 ? dv_acc[t] : dk_acc[t], L::LDS, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int rr = e / 16, d = t * 16 + e % 16, token = k0 + warp * 16 + rr;
        if (token < tokens && d < head_dim) dst[token * shape.head_dim + d] = from_float<T>(staging[rr * L::LDS + e % 16] * factor);
      }
      __syncwarp();
    }
  }
}

template <typename Kernel>
void allow_smem(Kernel kernel, int bytes) {
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename T, int HEAD_DIM>
void launch_fwd(const void* q, const void* k, const void* v, void* out, float* lse, AttentionShape shape,
                AttentionStrides q_strides, AttentionStrides kv_strides, cudaStream_t stream) {
  constexpr int smem = forward_smem_bytes<T, HEAD_DIM>();
  auto kernel = sparse_causal_attn_fwd_kernel<T, HEAD_DIM>;
  allow_smem(kernel, smem);
  const dim3 grid((shape.tokens + BLOCK_Q - 1) / BLOCK_Q, shape.heads, shape.rows);
  kernel<<<grid, kThreads, smem, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                           static_cast<const T*>(v), static_cast<T*>(out), lse, shape, q_strides,
                                           kv_strides);
}

template <typename T, int HEAD_DIM, bool WITH_DV, bool WITH_DK>
void launch_dkdv(const void* grad_out, const void* q, const void* k, const void* v, const float* lse,
                 const float* delta, void* dk, void* dv, AttentionShape shape, AttentionStrides q_strides,
                 AttentionStrides kv_strides, AttentionStrides out_strides, cudaStream_t stream) {
  constexpr int smem = backward_smem_bytes<T, HEAD_DIM>();
  auto kernel = sparse_causal_attn_bwd_dkdv_kernel<T, HEAD_DIM, WITH_DV, WITH_DK>;
  allow_smem(kernel, smem);
  const dim3 grid((shape.tokens + BLOCK_K - 1) / BLOCK_K, shape.heads, shape.rows);
  kernel<<<grid, kThreads, smem, stream>>>(static_cast<const T*>(grad_out), static_cast<const T*>(q),
                                           static_cast<const T*>(k), static_cast<const T*>(v), lse, delta,
                                           static_cast<T*>(dk), static_cast<T*>(dv), shape, q_strides, kv_strides,
                                           out_strides);
}

template <typename T, int HEAD_DIM>
void launch_bwd(const void* grad_out, const void* q, const void* k, const void* v, const void* out,
                const float* lse, float* delta, void* dq, void* dk, void* dv, AttentionShape shape,
                AttentionStrides q_strides, AttentionStrides kv_strides, AttentionStrides out_strides,
                cudaStream_t stream) {
  const int64_t stat_rows = shape.rows * shape.heads * shape.tokens;
  row_dot_kernel<T><<<(stat_rows + 255) / 256, 256, 0, stream>>>(static_cast<const T*>(grad_out),
                                                                   static_cast<const T*>(out), delta, shape,
                                                                   out_strides);
  constexpr int smem = backward_smem_bytes<T, HEAD_DIM>();
  auto dq_kernel = sparse_causal_attn_bwd_dq_kernel<T, HEAD_DIM>;
  allow_smem(dq_kernel, smem);
  const dim3 grid((shape.tokens + BLOCK_Q - 1) / BLOCK_Q, shape.heads, shape.rows);
  dq_kernel<<<grid, kThreads, smem, stream>>>(static_cast<const T*>(grad_out), static_cast<const T*>(q),
                                              static_cast<const T*>(k), static_cast<const T*>(v), lse, delta,
                                              static_cast<T*>(dq), shape, q_strides, kv_strides, out_strides);
  if constexpr (HEAD_DIM <= 80) {
    launch_dkdv<T, HEAD_DIM, true, true>(grad_out, q, k, v, lse, delta, dk, dv, shape, q_strides, kv_strides,
                                         out_strides, stream);
  } else {
    launch_dkdv<T, HEAD_DIM, true, false>(grad_out, q, k, v, lse, delta, dk, dv, shape, q_strides, kv_strides,
                                          out_strides, stream);
    launch_dkdv<T, HEAD_DIM, false, true>(grad_out, q, k, v, lse, delta, dk, dv, shape, q_strides, kv_strides,
                                          out_strides, stream);
  }
}

// head_dim -> the padded HEAD_DIM template argument; dtype 0 = fp16, 1 = bf16.
template <template <typename, int> class Launch, typename... Args>
void dispatch(int dtype, int64_t head_dim, Args... args) {
  auto by_dim = [&](auto type_tag) {
    using T = decltype(type_tag);
    if (head_dim <= 48) return Launch<T, 48>::run(args...);
    if (head_dim <= 64) return Launch<T, 64>::run(args...);
    if (head_dim <= 80) return Launch<T, 80>::run(args...);
    if (head_dim <= 96) return Launch<T, 96>::run(args...);
    if (head_dim <= 128) return Launch<T, 128>::run(args...);
    return Launch<T, 160>::run(args...);
  };
  if (dtype == 0) by_dim(__half{});
  else by_dim(__nv_bfloat16{});
}

template <typename T, int HEAD_DIM>
struct Forward {
  template <typename... Args>
  static void run(Args... args) { launch_fwd<T, HEAD_DIM>(args...); }
};
template <typename T, int HEAD_DIM>
struct Backward {
  template <typename... Args>
  static void run(Args... args) { launch_bwd<T, HEAD_DIM>(args...); }
};

}  // namespace

void sparse_causal_attn_fwd(int dtype, const void* q, const void* k, const void* v, void* out, float* lse,
                            AttentionShape shape, AttentionStrides q_strides, AttentionStrides kv_strides,
                            void* stream) {
  dispatch<Forward>(dtype, shape.head_dim, q, k, v, out, lse, shape, q_strides, kv_strides,
                    static_cast<cudaStream_t>(stream));
}

void sparse_causal_attn_bwd(int dtype, const void* grad_out, const void* q, const void* k, const void* v,
                            const void* out, const float* lse, float* delta, void* dq, void* dk, void* dv,
                            AttentionShape shape, AttentionStrides q_strides, AttentionStrides kv_strides,
                            AttentionStrides out_strides, void* stream) {
  dispatch<Backward>(dtype, shape.head_dim, grad_out, q, k, v, out, lse, delta, dq, dk, dv, shape, q_strides,
                     kv_strides, out_strides, static_cast<cudaStream_t>(stream));
}

}  // namespace depthvid::cuda
