// Row-major fp32 GEMM for the CPU attention kernels: the BLAS sgemm that torch's CPU wheel links
// (MKL on x86; the same GEMM torch's own CPU flash attention calls), single-threaded inside our
// OpenMP regions. Falls back to at::mm when the wheel exports no sgemm_.
//
// MKL threads its sgemm by itself, also when called from inside an OpenMP parallel region: with 2
// threads each task's GEMMs started a nested team and the backward spent 90% of its time spinning
// in libgomp (measured: 4.3 s instead of 0.67 s at 8 x 5 x 1024 x 64). Each call pins MKL to one
// thread for the calling thread only (MKL's thread-local setting) and restores it after.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// MKL's C interface (the lower-case symbol is the Fortran one, taking a pointer)
extern "C" int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));

namespace depthvid::cpu {

class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;  // 0: the thread followed MKL's global setting
};

// C (m x n, ldc) = alpha * op(A) op(B) + beta * C, every matrix row-major with its leading dim.
// op(A) is m x k; op(B) is k x n. BLAS is column-major: row-major C = op(A) op(B) is
// column-major C^T = op(B)^T op(A)^T, so swap the operands and keep the transpose flags.
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_ != nullptr) {
    const SingleThreadedBlas single_threaded;
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
    const int lda_i = static_cast<int>(lda), ldb_i = static_cast<int>(ldb), ldc_i = static_cast<int>(ldc);
    sgemm_(&tb, &ta, &ni, &mi, &ki, &alpha, b, &ldb_i, a, &lda_i, &beta, c, &ldc_i);
    return;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  auto a_t = trans_a ? at::from_blob(const_cast<float*>(a), {k, m}, {lda, 1}, opts).t()
                     : at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, opts);
  auto b_t = trans_b ? at::from_blob(const_cast<float*>(b), {n, k}, {ldb, 1}, opts).t()
                     : at::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, opts);
  auto c_t = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (beta == 0.0f) {
    c_t.copy_(at::mm(a_t, b_t).mul_(alpha));  // C may hold garbage (even NaN): never read it
  } else {
    c_t.mul_(beta).add_(at::mm(a_t, b_t), alpha);
  }
}

}  // namespace depthvid::cpu
