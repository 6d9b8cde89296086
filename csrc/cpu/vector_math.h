// Helpers for CPU loops that the compiler vectorises: the AVX2/baseline function clones and an exp() it can inline.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

namespace ppml::ops {

// Built twice on x86-64 with GCC (AVX2 and the baseline, chosen at load time by the CPU). Elsewhere: one build for
// the baseline the compiler targets.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PPML_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PPML_CPU_CLONES
#endif

// exp(x) for float, inlinable into `#pragma omp simd` loops (a call to libm's expf keeps a loop scalar): Cody-Waite
// range reduction x = n·ln2 + r, |r| ≤ ln2/2 (n the nearest integer), and Cephes' degree-6 polynomial for e^r (within about 1 ulp of the
// correctly rounded result), scaled by 2^n built in the exponent bits. x is clamped to [-87, 88] so that 2^n stays a
// normal number: below -87 the result is e^-87 ≈ 1.6e-38 instead of something smaller, an absolute error far below
// float32's resolution of any sum it enters. NaN passes through (both clamps compare false).
inline float exp_float(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = round(x / ln2) by the 1.5·2^23 trick: adding it leaves no fraction bits; unlike std::floor this needs no
  // SSE4.1 rounding instruction (floorf would be a libm call in the loop, and the loop would stay scalar).
  constexpr float kRound = 12582912.0f;
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * 0.693359375f;  // ln2 split in two so that n·ln2_hi is exact
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

// float64 accumulation (float64 inputs) keeps libm's exp: precision over speed for the type users pick for checks.
inline double exp_acc(double x) { return std::exp(x); }
inline float exp_acc(float x) { return exp_float(x); }

}  // namespace ppml::ops
