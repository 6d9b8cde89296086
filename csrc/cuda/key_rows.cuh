// The key check of the CUDA kernels that gather by a tile key (shuffle_patches, patch_tokens), without a host round
// trip. Each helper returns whether the values this thread looked at were fine; the kernel asserts with its own op's
// message (CUDA_KERNEL_ASSERT_MSG takes it as a literal). Kernels also clamp every tile index they use
// (common/plane_geometry.h::clamp_tile), so no key can make them read or write outside the tensors even with device
// asserts compiled out.
#pragma once

#include <cstdint>

#include "common/plane_geometry.h"

namespace ppml::ops {

// Long keys, one thread per value: value i of the [B, N] key counted in its row of `seen` (B*N int32, zeroed by the
// caller). A value already counted in its row is a repeat, so some other value is missing.
__device__ inline bool key_value_is_first(const int64_t* __restrict__ perm, int32_t* __restrict__ seen, int64_t i,
                                          int64_t N) {
  const int64_t v = perm[i];
  const bool in_range = v >= 0 && v < N;
  return in_range && atomicAdd(seen + (i / N) * N + v, 1) == 0;
}

// Keys that fit shared memory, block-wide: one image's key row into `tiles` (n clamped int32 tiles), each value
// marked in the bitmap `seen` ((n + 31) / 32 words). Synchronises the block before and after.
template <int kThreads>
__device__ inline bool load_key_row(const int64_t* __restrict__ row, int n, int32_t* tiles, uint32_t* seen) {
  const int words = (n + 31) / 32;
  for (int w = threadIdx.x; w < words; w += kThreads) seen[w] = 0;
  __syncthreads();
  bool ok = true;
  for (int t = threadIdx.x; t < n; t += kThreads) {
    const int64_t v = row[t];
    const bool in_range = v >= 0 && v < n;
    const int32_t c = static_cast<int32_t>(clamp_tile<int64_t>(v, n));
    const uint32_t bit = 1u << (c & 31);
    const bool first = in_range && (atomicOr(seen + (c >> 5), bit) & bit) == 0;
    ok = ok && first;
    tiles[t] = c;
  }
  __syncthreads();
  return ok;
}

}  // namespace ppml::ops
