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
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "common/patch_tokens.h"
#include "common/plane_geometry.h"
#include "cpu/fresh_output.h"
#include "cpu/vector_math.h"

namespace ppml::ops {
namespace {

// Every row of perm must be a permutation of 0..N-1 (the backward pass inverts it). With `inverse` (B * N entries),
// also writes each row's inverse, inverse[b * N + perm[b, i]] = i, in the same pass.
void check_token_perm_rows(const at::Tensor& perm, int64_t* inverse = nullptr) {
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
        if (inverse != nullptr) inverse[b * N + v] = i;
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

struct Geometry {
  int64_t B, C, H, W, p, tiles_x, N;
};

// Where the token rows of a range of tokens come from, one token at a time: the source offset of a token's first
// row (channel 0, row 0 of its tile) costs one division, each further row one add. Strides are in elements.
struct TokenWalk {
  const Geometry& g;
  const int64_t* perm;
  bool cl;
  int64_t image, c_stride, y_stride, tile_y, tile_x;  // source strides: image, channel, tile row; tile origins

  TokenWalk(const Geometry& geo, bool channels_last, const int64_t* key)
      : g(geo),
        perm(key),
        cl(channels_last),
        image(geo.C * geo.H * geo.W),
        c_stride(channels_last ? 1 : geo.H * geo.W),
        y_stride(channels_last ? geo.W * geo.C : geo.W),
        tile_y(geo.p * y_stride),
        tile_x(geo.p * (cl ? geo.C : 1)) {}

  // Source offset of token `tok`'s row 0 of channel 0 (tok = b * N + i).
  int64_t origin(int64_t tok) const {
    const int64_t b = tok / g.N, i = tok - b * g.N;
    const int64_t t = perm != nullptr ? clamp_tile<int64_t>(perm[tok], g.N) : i;
    const int64_t ty = t / g.tiles_x, tx = t - ty * g.tiles_x;
    return b * image + ty * tile_y + tx * tile_x;
  }

  // The token rows two tokens ahead, prefetched (NCHW: a channels_last tile row is one run already): under a key
  // they come from anywhere in the image, in an order no hardware prefetcher follows.
  void prefetch(const char* src, int64_t elem, int64_t tok, int64_t end) const {
    if (perm == nullptr || cl || tok + 2 >= end) return;
    const char* from = src + origin(tok + 2) * elem;
    for (int64_t c = 0; c < g.C; ++c) {
      for (int64_t y = 0; y < g.p; ++y) __builtin_prefetch(from + (c * c_stride + y * y_stride) * elem);
    }
  }
};

// ~32 KiB of output per task: big enough to amortise the scheduling, small enough to balance two to many cores.
inline int64_t token_grain(const Geometry& g) {
  return std::max<int64_t>(1, (int64_t{1} << 13) / std::max<int64_t>(1, g.C * g.p * g.p));
}

// Calls row(o, c, src_offset, step) for every token row: the output offset of the row, its channel, the source row's
// first element and the step between its elements (1 for NCHW, C for channels_last).
template <typename RowFn>
void for_each_token_row(const Geometry& g, bool cl, const int64_t* perm, const char* src, int64_t elem, RowFn&& row) {
  const TokenWalk walk(g, cl, perm);
  const int64_t token = g.C * g.p * g.p, step = cl ? g.C : 1;
  at::parallel_for(0, g.B * g.N, token_grain(g), [&](int64_t begin, int64_t end) {
    for (int64_t tok = begin; tok < end; ++tok) {
      walk.prefetch(src, elem, tok, end);
      const int64_t first = walk.origin(tok);
      int64_t o = tok * token;
      for (int64_t c = 0; c < g.C; ++c) {
        for (int64_t y = 0; y < g.p; ++y, o += g.p) row(o, c, first + c * walk.c_stride + y * walk.y_stride, step);
      }
    }
  });
}

#if defined(__x86_64__) && defined(__GNUC__)
#define PPML_TOKENS_AVX2 1
// uint8 NCHW -> float32 with p a multiple of 8, on AVX2: each 8 pixels of a tile row are zero-extended to int32 and
// looked up in the channel's 256-entry table with one vgatherdps (the table holds the reference's values, so the
// result is the reference's bit for bit), then stored with non-temporal 32-byte stores where the output is 32-byte
// aligned (the tokens are written once and read by the next layer much later; a normal store first reads each line
// it fills). Measured single-threaded on an Intel Xeon at B = 64, p = 16: scalar lookups 3.4 ms, gathers 2.2 ms.
__attribute__((target("avx2"))) void tokens_u8_f32_avx2(const Geometry& g, const int64_t* inverse, const uint8_t* s,
                                                       float* d, const float* lut, int64_t begin, int64_t end) {
  const TokenWalk walk(g, /*cl=*/false, nullptr);
  const int64_t p = g.p, token = g.C * p * p;
  const bool aligned = reinterpret_cast<uintptr_t>(d) % 32 == 0;  // with p % 8 == 0 every 8-value group then is
  // Source tiles in order (k = b * N + source tile), each written to its token, inverse[k] under a key: the four
  // tiles that share a 64-byte source line are read one after the other, from L1, where walking the tokens in order
  // read them from anywhere in the image. The tokens stay whole 3 KiB runs of output, so the writes still stream.
  for (int64_t k = begin; k < end; ++k) {
    const uint8_t* first = s + walk.origin(k);
    const int64_t b = k / g.N;
    float* to = d + (inverse != nullptr ? b * g.N + inverse[k] : k) * token;
    for (int64_t c = 0; c < g.C; ++c) {
      const float* t = lut + c * 256;
      const uint8_t* from = first + c * walk.c_stride;
      for (int64_t y = 0; y < p; ++y, from += walk.y_stride) {
        for (int64_t x = 0; x < p; x += 8, to += 8) {
          const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(from + x)));
          const __m256 v = _mm256_i32gather_ps(t, idx, 4);
          if (aligned) {
            _mm256_stream_ps(to, v);
          } else {
            _mm256_storeu_ps(to, v);
          }
        }
      }
    }
  }
  _mm_sfence();  // non-temporal stores are weakly ordered: visible before the task ends
}
#endif

template <typename In, typename Out, typename Acc>
void tokens_cpu(const at::Tensor& src, bool cl, const int64_t* perm, const int64_t* inverse, at::Tensor& out,
                const Geometry& g, c10::OptionalArrayRef<double> mean, c10::OptionalArrayRef<double> std) {
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
#ifdef PPML_TOKENS_AVX2
    if constexpr (std::is_same_v<Out, float>) {
      static const bool has_avx2 = __builtin_cpu_supports("avx2");
      if (has_avx2 && !cl && p % 8 == 0) {
        at::parallel_for(0, g.B * g.N, token_grain(g), [&](int64_t begin, int64_t end) {
          tokens_u8_f32_avx2(g, inverse, s, d, lut, begin, end);
        });
        return;
      }
    }
#endif
    for_each_token_row(g, cl, perm, reinterpret_cast<const char*>(s), sizeof(In), [&](int64_t o, int64_t c, int64_t off, int64_t step) {
      const uint8_t* __restrict__ from = s + off;
      Out* __restrict__ to = d + o;
      const Out* __restrict__ t = lut + c * 256;
      if (step == 1) {
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
void dispatch_acc(const at::Tensor& src, bool cl, const int64_t* perm, const int64_t* inverse, at::Tensor& out,
                  const Geometry& g, c10::OptionalArrayRef<double> mean, c10::OptionalArrayRef<double> std) {
  if constexpr (std::is_same_v<In, double> || std::is_same_v<Out, double>) {
    tokens_cpu<In, Out, double>(src, cl, perm, inverse, out, g, mean, std);
  } else {
    tokens_cpu<In, Out, float>(src, cl, perm, inverse, out, g, mean, std);
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
  std::vector<int64_t> inverse;  // the key's inverse: the AVX2 path walks source tiles in order (B * N * 8 bytes)
  if (perm.has_value()) {
    perm_c = perm->contiguous();
    inverse.resize(static_cast<size_t>(perm_c.numel()));
    check_token_perm_rows(perm_c, inverse.data());
  }
  const int64_t* inv = perm.has_value() ? inverse.data() : nullptr;
  const int64_t* pp = perm.has_value() ? perm_c.const_data_ptr<int64_t>() : nullptr;
  const Geometry g{B, C, H, W, patch_size, W / patch_size, N};
  AT_DISPATCH_SWITCH(images.scalar_type(), "ppml.patch_tokens",
    AT_DISPATCH_CASE(at::kByte, [&] {
      using In = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ppml.patch_tokens", [&] {
        dispatch_acc<In, scalar_t>(src, cl, pp, inv, out, g, mean, std);
      });
    })
    AT_DISPATCH_CASE_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, [&] {
      using In = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ppml.patch_tokens", [&] {
        dispatch_acc<In, scalar_t>(src, cl, pp, inv, out, g, mean, std);
      });
    }));
}

at::Tensor patch_tokens_cpu(const at::Tensor& images, const std::optional<at::Tensor>& perm, int64_t patch_size,
                            std::optional<at::ArrayRef<double>> mean_arg, std::optional<at::ArrayRef<double>> std_arg,
                            at::ScalarType dtype) {
  const c10::OptionalArrayRef<double> mean(mean_arg), std(std_arg);
  const int64_t N = check_patch_tokens_args(images, perm, patch_size, mean, std, dtype);
  at::Tensor out = at::empty({images.size(0), N, images.size(1) * patch_size * patch_size}, images.options().dtype(dtype));
  fill_tokens(images, perm, patch_size, mean, std, dtype, with_huge_pages(out), N);
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
