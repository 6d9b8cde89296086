// CPU kernel of ppml::patch_tokens: one parallel pass that reads each source tile row once and writes its token row
// once, normalised on the way. uint8 images go through a per-channel table of the 256 possible results (computed
// with the same operations, so the values are the reference's bit for bit, and the loop does no arithmetic at all).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "common/patch_tokens.h"
#include "common/plane_geometry.h"
#include "cpu/vector_math.h"

namespace ppml::ops {
namespace {

// Every row of perm must be a permutation of 0..N-1 (the backward pass inverts it).
void check_token_perm_rows(const at::Tensor& perm) {
  const int64_t B = perm.size(0), N = perm.size(1);
  const int64_t* data = perm.const_data_ptr<int64_t>();
  std::atomic<int64_t> bad_row{-1};
  // ~1M keys per task: a batch of 64 keys of 196 tiles is checked in microseconds by one thread, less than waking the
  // pool costs (tens of ms measured with the 2 cores oversubscribed).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, N));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> seen(static_cast<size_t>(N));
    for (int64_t b = begin; b < end && bad_row.load(std::memory_order_relaxed) < 0; ++b) {
      std::fill(seen.begin(), seen.end(), 0);
      const int64_t* row = data + b * N;
      for (int64_t i = 0; i < N; ++i) {
        const int64_t v = row[i];
        if (v < 0 || v >= N || seen[v]) {
          int64_t expected = -1;
          bad_row.compare_exchange_strong(expected, b);
          break;
        }
        seen[v] = 1;
      }
    }
  });
  const int64_t b = bad_row.load();
  TORCH_CHECK_VALUE(b < 0, "ppml.patch_tokens: every row of perm must be a permutation of 0..", N - 1,
                    " (N=(H/p)*(W/p)=", N, "), row ", b, " is not");
}

// The float32 -> float32 row, the common float case, in an AVX2 clone too (the templates below stay baseline).
PPML_CPU_CLONES void normalise_row_f32(const float* __restrict__ s, float* __restrict__ d, int64_t n, float mean,
                                       float std) {
  for (int64_t x = 0; x < n; ++x) d[x] = normalise<float, false>(s[x], mean, std);
}

// One 64-byte token row stored with non-temporal stores (SSE2, so every x86-64 has them); elsewhere plain stores.
inline void stream_line(float* dst, const float* v) {
#if defined(__SSE2__)
  for (int k = 0; k < 16; k += 4) _mm_stream_ps(dst + k, _mm_load_ps(v + k));
#else
  std::memcpy(dst, v, 64);
#endif
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

struct Geometry {
  int64_t B, C, H, W, p, tiles_x, N;
};

// Calls row(tok, c, y, src_offset, src_step, dst) for every token row: the source row's first element and the step
// between its elements (1 for NCHW, C for channels_last), and the token row it becomes.
// Offset of the first element of tile t's row y, channel c, of image b (NCHW or channels_last).
inline int64_t tile_row_offset(const Geometry& g, bool cl, int64_t b, int64_t t, int64_t c, int64_t y) {
  const int64_t ty = t / g.tiles_x, tx = t - ty * g.tiles_x;
  const int64_t yy = ty * g.p + y, xx = tx * g.p;
  return cl ? ((b * g.H + yy) * g.W + xx) * g.C + c : ((b * g.C + c) * g.H + yy) * g.W + xx;
}

// `src` (bytes, `elem` per element): the tile rows two tokens ahead are prefetched. Under a key they come from
// anywhere in the image, in an order no hardware prefetcher follows (measured: 30 -> 26 ms single-threaded at B = 64
// uint8, Intel Xeon, shared).
template <typename RowFn>
void for_each_token_row(const Geometry& g, bool cl, const int64_t* perm, const char* src, int64_t elem, RowFn&& row) {
  const int64_t token = g.C * g.p * g.p;
  // ~32 KiB of output per task: big enough to amortise the scheduling, small enough to balance two to many cores.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 13) / std::max<int64_t>(1, token));
  at::parallel_for(0, g.B * g.N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t tok = begin; tok < end; ++tok) {
      if (perm != nullptr && !cl && tok + 2 < end) {
        const int64_t nb = (tok + 2) / g.N;
        const int64_t nt = clamp_tile<int64_t>(perm[tok + 2], g.N);
        for (int64_t c = 0; c < g.C; ++c) {
          for (int64_t y = 0; y < g.p; ++y) __builtin_prefetch(src + tile_row_offset(g, cl, nb, nt, c, y) * elem);
        }
      }
      const int64_t b = tok / g.N, i = tok - b * g.N;
      const int64_t t = perm != nullptr ? clamp_tile<int64_t>(perm[tok], g.N) : i;
      const int64_t ty = t / g.tiles_x, tx = t - ty * g.tiles_x;
      for (int64_t c = 0; c < g.C; ++c) {
        for (int64_t y = 0; y < g.p; ++y) {
          const int64_t yy = ty * g.p + y, xx = tx * g.p;
          const int64_t off = cl ? ((b * g.H + yy) * g.W + xx) * g.C + c : ((b * g.C + c) * g.H + yy) * g.W + xx;
          row(tok * token + (c * g.p + y) * g.p, c, off, cl ? g.C : 1);
        }
      }
    }
    stream_fence();  // non-temporal stores are weakly ordered: visible before the task ends
  });
}

template <typename In, typename Out, typename Acc>
void tokens_cpu(const at::Tensor& src, bool cl, const int64_t* perm, at::Tensor& out, const Geometry& g,
                c10::OptionalArrayRef<double> mean, c10::OptionalArrayRef<double> std) {
  const In* s = src.const_data_ptr<In>();
  Out* d = out.mutable_data_ptr<Out>();
  const int64_t p = g.p;
  if constexpr (std::is_same_v<In, uint8_t>) {
    std::vector<Out> table(static_cast<size_t>(g.C) * 256);
    for (int64_t c = 0; c < g.C; ++c) {
      const Acc m = token_stat<Acc>(mean, c, 0.0), sd = token_stat<Acc>(std, c, 1.0);
      for (int v = 0; v < 256; ++v) table[c * 256 + v] = static_cast<Out>(normalise<Acc, true>(Acc(v), m, sd));
    }
    const Out* lut = table.data();
    // Non-temporal stores for float32 token rows of 64 bytes at 16-byte-aligned addresses: the tokens are written
    // once and read by the next layer much later, and a normal store first reads each line it fills (the write
    // allocate), a third of the traffic. Measured single-threaded at B = 64 (Intel Xeon, shared): 39 -> see RESULTS.md.
    const bool stream_ok = reinterpret_cast<uintptr_t>(d) % 16 == 0;
    for_each_token_row(g, cl, perm, reinterpret_cast<const char*>(s), sizeof(In), [&](int64_t o, int64_t c, int64_t off, int64_t step) {
      const uint8_t* __restrict__ from = s + off;
      Out* __restrict__ to = d + o;
      const Out* __restrict__ t = lut + c * 256;
      if constexpr (std::is_same_v<Out, float>) {
        if (step == 1 && p == 16 && stream_ok) {  // the common patch: 64 bytes, one cache line, streamed
          alignas(16) float v[16];
          for (int x = 0; x < 16; ++x) v[x] = t[from[x]];
          stream_line(to, v);
          return;
        }
      }
      if (step == 1 && p == 16) {
        for (int x = 0; x < 16; ++x) to[x] = t[from[x]];
      } else if (step == 1) {
        for (int64_t x = 0; x < p; ++x) to[x] = t[from[x]];
      } else {
        for (int64_t x = 0; x < p; ++x) to[x] = t[from[x * step]];
      }
    });
  } else {
    std::vector<Acc> means(g.C), stds(g.C);
    for (int64_t c = 0; c < g.C; ++c) means[c] = token_stat<Acc>(mean, c, 0.0), stds[c] = token_stat<Acc>(std, c, 1.0);
    for_each_token_row(g, cl, perm, reinterpret_cast<const char*>(s), sizeof(In), [&](int64_t o, int64_t c, int64_t off, int64_t step) {
      const In* __restrict__ from = s + off;
      Out* __restrict__ to = d + o;
      const Acc m = means[c], sd = stds[c];
      if constexpr (std::is_same_v<In, float> && std::is_same_v<Out, float> && std::is_same_v<Acc, float>) {
        if (step == 1) return normalise_row_f32(from, to, p, m, sd);
      }
      for (int64_t x = 0; x < p; ++x) to[x] = static_cast<Out>(normalise<Acc, false>(static_cast<Acc>(from[x * step]), m, sd));
    });
  }
}

template <typename In, typename Out>
void dispatch_acc(const at::Tensor& src, bool cl, const int64_t* perm, at::Tensor& out, const Geometry& g,
                  c10::OptionalArrayRef<double> mean, c10::OptionalArrayRef<double> std) {
  if constexpr (std::is_same_v<In, double> || std::is_same_v<Out, double>) {
    tokens_cpu<In, Out, double>(src, cl, perm, out, g, mean, std);
  } else {
    tokens_cpu<In, Out, float>(src, cl, perm, out, g, mean, std);
  }
}

// Writes the tokens into `out` (checked by the caller). The statistics come as std::optional<ArrayRef<double>>, the
// type the dispatcher boxes `float[]?` to.
void fill_tokens(const at::Tensor& images, const std::optional<at::Tensor>& perm, int64_t patch_size,
                 c10::OptionalArrayRef<double> mean, c10::OptionalArrayRef<double> std, at::ScalarType dtype,
                 at::Tensor& out, int64_t N) {
  if (out.numel() == 0) return;
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const bool cl = use_channels_last(images);
  const at::Tensor src = images.contiguous(working_format(cl));
  at::Tensor perm_c;
  if (perm.has_value()) {
    perm_c = perm->contiguous();
    check_token_perm_rows(perm_c);
  }
  const int64_t* pp = perm.has_value() ? perm_c.const_data_ptr<int64_t>() : nullptr;
  const Geometry g{B, C, H, W, patch_size, W / patch_size, N};
  AT_DISPATCH_SWITCH(images.scalar_type(), "ppml.patch_tokens",
    AT_DISPATCH_CASE(at::kByte, [&] {
      using In = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ppml.patch_tokens", [&] {
        dispatch_acc<In, scalar_t>(src, cl, pp, out, g, mean, std);
      });
    })
    AT_DISPATCH_CASE_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, [&] {
      using In = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ppml.patch_tokens", [&] {
        dispatch_acc<In, scalar_t>(src, cl, pp, out, g, mean, std);
      });
    }));
}

at::Tensor patch_tokens_cpu(const at::Tensor& images, const std::optional<at::Tensor>& perm, int64_t patch_size,
                            std::optional<at::ArrayRef<double>> mean_arg, std::optional<at::ArrayRef<double>> std_arg,
                            at::ScalarType dtype) {
  const c10::OptionalArrayRef<double> mean(mean_arg), std(std_arg);
  const int64_t N = check_patch_tokens_args(images, perm, patch_size, mean, std, dtype);
  at::Tensor out = at::empty({images.size(0), N, images.size(1) * patch_size * patch_size}, images.options().dtype(dtype));
  fill_tokens(images, perm, patch_size, mean, std, dtype, out, N);
  return out;
}

void patch_tokens_out_cpu(const at::Tensor& images, const std::optional<at::Tensor>& perm, int64_t patch_size,
                          std::optional<at::ArrayRef<double>> mean_arg, std::optional<at::ArrayRef<double>> std_arg,
                          at::ScalarType dtype, at::Tensor& out) {
  const c10::OptionalArrayRef<double> mean(mean_arg), std(std_arg);
  const int64_t N = check_patch_tokens_args(images, perm, patch_size, mean, std, dtype);
  check_tokens_out(out, images, N, patch_size, dtype);
  fill_tokens(images, perm, patch_size, mean, std, dtype, out, N);
}

}  // namespace

TORCH_LIBRARY_IMPL(ppml, CPU, m) {
  m.impl("patch_tokens", &patch_tokens_cpu);
  m.impl("patch_tokens.out", &patch_tokens_out_cpu);
}

}  // namespace ppml::ops
