// Eight fp32 lanes as a GCC/Clang vector type: one AVX register, two SSE or NEON ones. The compiler
// lowers the arithmetic to whatever the target has, so this is portable C++ that still keeps
// register-blocked loops in registers (an `omp simd` reduction keeps one accumulator per loop and
// stalls on its latency).
#pragma once

#include <cstring>

namespace depthvid::cpu {

using vec8 = float __attribute__((vector_size(32)));
using ivec8 = int __attribute__((vector_size(32)));
constexpr int kLanes = 8;

inline vec8 load8(const float* p) {  // unaligned; memcpy keeps it free of aliasing rules
  vec8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, vec8 v) { std::memcpy(p, &v, sizeof v); }

#if defined(__clang__)
#define DEPTHVID_SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define DEPTHVID_SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, ivec8{__VA_ARGS__})
#endif

// The eight horizontal sums: lane j of the result is the sum of v[j]'s lanes. Three rounds of
// "interleave two vectors, add the halves" (8 vectors -> 4 -> 2 -> 1) instead of 8 separate
// reductions.
inline vec8 lane_sums(const vec8 (&v)[8]) {
  vec8 pairs[4], quads[2];
  for (int i = 0; i < 4; ++i)  // lanes: a0+a1, b0+b1, a2+a3, b2+b3, ... for a = v[2i], b = v[2i+1]
    pairs[i] = DEPTHVID_SHUFFLE8(v[2 * i], v[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
               DEPTHVID_SHUFFLE8(v[2 * i], v[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int i = 0; i < 2; ++i)  // lanes: a, b, c, d (first half's sums), a, b, c, d (second half's)
    quads[i] = DEPTHVID_SHUFFLE8(pairs[2 * i], pairs[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               DEPTHVID_SHUFFLE8(pairs[2 * i], pairs[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return DEPTHVID_SHUFFLE8(quads[0], quads[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         DEPTHVID_SHUFFLE8(quads[0], quads[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

#undef DEPTHVID_SHUFFLE8

}  // namespace depthvid::cpu
