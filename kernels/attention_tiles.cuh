// Tile helpers shared by the CUDA attention kernels: fp16/bf16 conversions, cooperative tile loads
// into shared memory, and the WMMA (tensor-core, 16x16x16, fp32 accumulate) tile products.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <algorithm>
#include <type_traits>

namespace depthvid::cuda {

// Dynamic shared memory one block may opt into: 163 KB on sm_80 (A100), 227 KB on sm_90 (H100).
// Checked by static_assert in each kernel for the architecture being compiled.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kMaxSmemPerBlock = 227 * 1024;
#else
constexpr int kMaxSmemPerBlock = 163 * 1024;
#endif

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }

// Rows [first, first + ROWS) of a (tokens, head_dim) slice with row stride `token_stride` ->
// dst (ROWS, LD) in shared memory; rows past `tokens` and columns past `head_dim` (up to the
// padded HEAD_DIM) are zero, so they add nothing to any product.
template <int ROWS, int HEAD_DIM, int LD, typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t token_stride, int first, int tokens,
                                          int head_dim) {
  for (int e = threadIdx.x; e < ROWS * HEAD_DIM; e += blockDim.x) {
    const int r = e / HEAD_DIM, d = e % HEAD_DIM;
    const bool inside = first + r < tokens && d < head_dim;
    dst[r * LD + d] = inside ? src[(first + r) * token_stride + d] : from_float<T>(0.0f);
  }
}

namespace wmma = nvcuda::wmma;

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T, typename Layout>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, Layout>;
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// acc (16 x 16) += A (16 x K, row-major, lda) * B (K x 16); B_TRANSPOSED reads B^T stored row-major
// (i.e. element (k, n) at b[n * ldb + k]), which is how K^T, Q^T and dO^T are read.
template <int K, bool B_TRANSPOSED, typename T>
__device__ __forceinline__ void mma_tile(FragAcc& acc, const T* a, int lda, const T* b, int ldb) {
  using Layout = typename std::conditional<B_TRANSPOSED, wmma::col_major, wmma::row_major>::type;
#pragma unroll
  for (int kk = 0; kk < K; kk += 16) {
    FragA<T> fa;
    FragB<T, Layout> fb;
    wmma::load_matrix_sync(fa, a + kk, lda);
    wmma::load_matrix_sync(fb, B_TRANSPOSED ? b + kk : b + kk * ldb, ldb);
    wmma::mma_sync(acc, fa, fb, acc);
  }
}

// 16 rows x N_COLS of fp32 scores S = A B^T for one warp -> s (row-major, lds).
template <int N_COLS, int K, typename T>
__device__ __forceinline__ void warp_scores(float* s, int lds, const T* a, int lda, const T* b, int ldb) {
#pragma unroll
  for (int n = 0; n < N_COLS; n += 16) {
    FragAcc acc;
    wmma::fill_fragment(acc, 0.0f);
    mma_tile<K, true>(acc, a, lda, b + n * ldb, ldb);
    wmma::store_matrix_sync(s + n, acc, lds, wmma::mem_row_major);
  }
}

}  // namespace depthvid::cuda
