// CPU kernel of ppml::mix_subpatches: per output row, sub-patch rows are added run by run into a float accumulator.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PPML_MIX_U8_AVX2 1
#endif

#include "common/mix_subpatches.h"
#include "cpu/fresh_output.h"
#include "cpu/vector_math.h"

namespace ppml::ops {
namespace {

// Each output run (q*K elements of one output row inside one tile) is summed in registers over the g² sub-patch rows
// that land on it, in row-major order (i outer, j inner), one add at a time, as the reference does: the first term
// is stored, the others added (setup.py compiles with -ffp-contract=off, so no FMA either), and float32/float64
// results match the reference bit for bit. `Run` is q*K when it is one of the common sizes (0: read at run time): a
// compile-time trip count keeps the accumulator in vector registers; so does a compile-time `Grid` (g = 2, the paper's
// setting, unrolls the sub-patch loops completely).
//
// Built twice on x86-64 with GCC (PPML_CPU_CLONES: AVX2 and the baseline, chosen at load time by the CPU): 8-wide
// float adds and uint8 converts bring the memory-bound float32 case to the copy bandwidth. No FMA either way
// (-ffp-contract=off). uint8 images on an x86-64 CPU with AVX2 take mix_u8_row_range_avx2 below instead.

template <typename scalar_t, bool Weighted, int64_t Run, int64_t Grid>
PPML_CPU_CLONES void mix_row_range(const MixGeometry& g, const scalar_t* src, mix_out_t<scalar_t>* dst,
                                   const mix_acc_t<scalar_t>* w, int64_t begin, int64_t end) {
  using acc_t = mix_acc_t<scalar_t>;
  using out_t = mix_out_t<scalar_t>;
  constexpr int64_t kMaxRun = 64;  // runtime runs are processed in chunks of this many elements
  // Local copies: the compiler need not reload the geometry after every store through `dst`.
  const int64_t grid = Grid > 0 ? Grid : g.grid, row_step = g.sub * g.in_row, sub_step = g.run, tiles_x = g.tiles_x;
  const int64_t tile_step = g.patch * g.interleave, run = Run > 0 ? Run : g.run;
  const acc_t scale = acc_t(1) / static_cast<acc_t>(grid * grid);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t plane = row / g.out_rows;
    const int64_t oy = row - plane * g.out_rows;
    const int64_t ty = oy / g.sub;
    const int64_t u = oy - ty * g.sub;
    // Everything per tile is a fixed step from the row's first tile.
    const scalar_t* base = src + mix_input_offset<int64_t>(g, plane, ty, int64_t{0}, int64_t{0}, int64_t{0}, u);
    const acc_t* wrow =
        Weighted ? w + mix_weight_offset<int64_t>(g, plane, ty, int64_t{0}, int64_t{0}, int64_t{0}) : nullptr;
    out_t* o = dst + row * g.out_row;
    for (int64_t tx = 0; tx < tiles_x; ++tx) {
      const scalar_t* first = base + tx * tile_step;
      const acc_t* wt = Weighted ? wrow + tx * grid * grid : nullptr;
      for (int64_t e0 = 0; e0 < run; e0 += kMaxRun) {
        const int64_t len = Run > 0 ? Run : std::min(kMaxRun, run - e0);
        acc_t acc[Run > 0 ? Run : kMaxRun];
        // The (0, 0) term first, outside the loops: a branch inside them keeps the accumulator out of registers.
        const scalar_t* s00 = first + e0;
        for (int64_t e = 0; e < len; ++e) {
          acc[e] = Weighted ? wt[0] * static_cast<acc_t>(s00[e]) : static_cast<acc_t>(s00[e]);
        }
        for (int64_t i = 0; i < grid; ++i) {
          for (int64_t j = (i == 0 ? 1 : 0); j < grid; ++j) {
            const scalar_t* sj = first + i * row_step + j * sub_step + e0;
            const acc_t wv = Weighted ? wt[i * grid + j] : acc_t(1);
            for (int64_t e = 0; e < len; ++e) {
              acc[e] += Weighted ? wv * static_cast<acc_t>(sj[e]) : static_cast<acc_t>(sj[e]);
            }
          }
        }
        out_t* oe = o + tx * run + e0;
        for (int64_t e = 0; e < len; ++e) oe[e] = static_cast<out_t>(Weighted ? acc[e] : acc[e] * scale);
      }
    }
  }
}

// Output rows per task: ~64 KiB of input.
inline int64_t mix_grain(const MixGeometry& g) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, g.in_row * g.grid));
}

#ifdef PPML_MIX_U8_AVX2
// 8 bytes at p, zero-extended to 8 int32 lanes (vpmovzxbd).
__attribute__((target("avx2"), always_inline)) inline __m256i bytes8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// uint8 in, float32 out, with AVX2 intrinsics, 8 outputs per step. GCC 12 vectorised mix_row_range for uint8 with
// scalar converts and lane shuffles (about 90 instructions per 8 outputs, a third of the copy bandwidth on an Intel
// Xeon; about 10 here). The mean sums the g² terms in int32 and converts once: every partial sum is an integer below
// 255·g² < 2^24 (g <= 8 here), which the reference's float adds hold exactly too, so the result is the reference's bit
// for bit. The keyed sum converts each term, multiplies it by its weight and adds it, in the reference's order, with
// no FMA (this function is built for AVX2 only, and with -ffp-contract=off). A run longer than 8 whose length 8 does
// not divide ends with a step that overlaps the one before and stores the same values again: no scalar tail.
template <bool Weighted, int64_t Grid>
__attribute__((target("avx2"))) void mix_u8_row_range_avx2(const MixGeometry& g, const uint8_t* src, float* dst,
                                                           const float* w, int64_t begin, int64_t end) {
  constexpr int64_t kMaxTerms = 64;
  const int64_t grid = Grid > 0 ? Grid : g.grid, terms = grid * grid;
  const int64_t tiles_x = g.tiles_x, tile_step = g.patch * g.interleave, run = g.run;
  int64_t offset[kMaxTerms];  // of sub-patch (i, j)'s row from sub-patch (0, 0)'s
  for (int64_t i = 0; i < grid; ++i) {
    for (int64_t j = 0; j < grid; ++j) offset[i * grid + j] = i * g.sub * g.in_row + j * g.run;
  }
  const __m256 scale = _mm256_set1_ps(1.0f / static_cast<float>(terms));
  for (int64_t row = begin; row < end; ++row) {
    const int64_t plane = row / g.out_rows;
    const int64_t oy = row - plane * g.out_rows;
    const int64_t ty = oy / g.sub;
    const int64_t u = oy - ty * g.sub;
    const uint8_t* base = src + mix_input_offset<int64_t>(g, plane, ty, int64_t{0}, int64_t{0}, int64_t{0}, u);
    const float* wrow =
        Weighted ? w + mix_weight_offset<int64_t>(g, plane, ty, int64_t{0}, int64_t{0}, int64_t{0}) : nullptr;
    float* o = dst + row * g.out_row;
    for (int64_t tx = 0; tx < tiles_x; ++tx) {
      const uint8_t* first = base + tx * tile_step;
      for (int64_t e = 0;; e += 8) {
        e = std::min(e, run - 8);
        __m256 out;
        if constexpr (Weighted) {
          const float* wt = wrow + tx * terms;
          out = _mm256_mul_ps(_mm256_set1_ps(wt[0]), _mm256_cvtepi32_ps(bytes8(first + e)));
          for (int64_t k = 1; k < terms; ++k) {
            const __m256 x = _mm256_cvtepi32_ps(bytes8(first + offset[k] + e));
            out = _mm256_add_ps(out, _mm256_mul_ps(_mm256_set1_ps(wt[k]), x));
          }
        } else {
          __m256i sum = bytes8(first + e);
          for (int64_t k = 1; k < terms; ++k) sum = _mm256_add_epi32(sum, bytes8(first + offset[k] + e));
          out = _mm256_mul_ps(_mm256_cvtepi32_ps(sum), scale);
        }
        _mm256_storeu_ps(o + tx * run + e, out);
        if (e + 8 >= run) break;
      }
    }
  }
}

// The AVX2 uint8 path, where it applies (the CPU has AVX2, a sub-patch row holds at least 8 values, g <= 8); false
// where it does not, and nothing was written.
template <bool Weighted>
bool mix_u8_rows_avx2(const MixGeometry& g, const uint8_t* src, float* dst, const float* w) {
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if (!has_avx2 || g.run < 8 || g.grid > 8) return false;
  at::parallel_for(0, g.planes * g.out_rows, mix_grain(g), [&](int64_t begin, int64_t end) {
    if (g.grid == 2) return mix_u8_row_range_avx2<Weighted, 2>(g, src, dst, w, begin, end);
    mix_u8_row_range_avx2<Weighted, 0>(g, src, dst, w, begin, end);
  });
  return true;
}
#endif

template <typename scalar_t, bool Weighted, int64_t Run, int64_t Grid>
void mix_rows(const MixGeometry& g, const scalar_t* src, mix_out_t<scalar_t>* dst, const mix_acc_t<scalar_t>* w) {
  at::parallel_for(0, g.planes * g.out_rows, mix_grain(g), [&](int64_t begin, int64_t end) {
    mix_row_range<scalar_t, Weighted, Run, Grid>(g, src, dst, w, begin, end);
  });
}

template <typename scalar_t, bool Weighted, int64_t Grid>
void mix_rows_any_run(const MixGeometry& g, const scalar_t* src, mix_out_t<scalar_t>* dst,
                      const mix_acc_t<scalar_t>* w) {
  switch (g.run) {
    case 4: return mix_rows<scalar_t, Weighted, 4, Grid>(g, src, dst, w);
    case 8: return mix_rows<scalar_t, Weighted, 8, Grid>(g, src, dst, w);
    case 16: return mix_rows<scalar_t, Weighted, 16, Grid>(g, src, dst, w);
    case 24: return mix_rows<scalar_t, Weighted, 24, Grid>(g, src, dst, w);  // q = 8, channels_last RGB
    case 32: return mix_rows<scalar_t, Weighted, 32, Grid>(g, src, dst, w);
    default: return mix_rows<scalar_t, Weighted, 0, Grid>(g, src, dst, w);
  }
}

template <typename scalar_t, bool Weighted>
void mix_rows_any(const MixGeometry& g, const scalar_t* src, mix_out_t<scalar_t>* dst, const mix_acc_t<scalar_t>* w) {
#ifdef PPML_MIX_U8_AVX2
  if constexpr (std::is_same_v<scalar_t, uint8_t>) {
    if (mix_u8_rows_avx2<Weighted>(g, src, dst, w)) return;
  }
#endif
  if (g.grid == 2) return mix_rows_any_run<scalar_t, Weighted, 2>(g, src, dst, w);
  return mix_rows_any_run<scalar_t, Weighted, 0>(g, src, dst, w);
}

at::Tensor mix_subpatches_cpu(const at::Tensor& images, int64_t patch_size, int64_t grid,
                              const c10::optional<at::Tensor>& weights) {
  MixOperands m = prepare_mix(images, patch_size, grid, weights);
  if (m.out.numel() == 0) return m.out;
  with_huge_pages(m.out);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, m.src.scalar_type(), "mix_subpatches_cpu", [&] {
    const scalar_t* s = m.src.const_data_ptr<scalar_t>();
    auto* d = m.out.mutable_data_ptr<mix_out_t<scalar_t>>();
    if (m.weights.defined()) {
      mix_rows_any<scalar_t, true>(m.geometry, s, d, m.weights.const_data_ptr<mix_acc_t<scalar_t>>());
    } else {
      mix_rows_any<scalar_t, false>(m.geometry, s, d, nullptr);
    }
  });
  return m.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ppml, CPU, m) {
  m.impl("mix_subpatches", &mix_subpatches_cpu);
}

}  // namespace ppml::ops
