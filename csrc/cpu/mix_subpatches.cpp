// CPU kernel of ppml::mix_subpatches: per output row, sub-patch rows are added run by run into a float accumulator.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "common/mix_subpatches.h"

namespace ppml::ops {
namespace {

// The sum runs over sub-patches in row-major order (i outer, j inner), one add at a time, as the reference does:
// the first term is stored, the others added, so float32/float64 results match the reference bit for bit.
template <typename scalar_t, bool Weighted>
void mix_rows(const MixGeometry& g, const scalar_t* src, mix_out_t<scalar_t>* dst, const mix_acc_t<scalar_t>* w) {
  using acc_t = mix_acc_t<scalar_t>;
  const int64_t rows = g.planes * g.out_rows;
  const acc_t inv = acc_t(1) / static_cast<acc_t>(g.grid * g.grid);
  // ~64 KiB of input per task.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, g.in_row * g.grid));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(g.out_row));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / g.out_rows;
      const int64_t oy = row - plane * g.out_rows;
      const int64_t ty = oy / g.sub;
      const int64_t u = oy - ty * g.sub;
      for (int64_t i = 0; i < g.grid; ++i) {
        for (int64_t tx = 0; tx < g.tiles_x; ++tx) {
          acc_t* a = acc.data() + tx * g.run;
          for (int64_t j = 0; j < g.grid; ++j) {
            const scalar_t* s = src + mix_input_offset<int64_t>(g, plane, ty, tx, i, j, u);
            const acc_t wv = Weighted ? w[mix_weight_offset<int64_t>(g, plane, ty, tx, i, j)] : acc_t(1);
            if (i == 0 && j == 0) {
              for (int64_t e = 0; e < g.run; ++e) a[e] = Weighted ? wv * static_cast<acc_t>(s[e]) : static_cast<acc_t>(s[e]);
            } else {
              for (int64_t e = 0; e < g.run; ++e) a[e] += Weighted ? wv * static_cast<acc_t>(s[e]) : static_cast<acc_t>(s[e]);
            }
          }
        }
      }
      mix_out_t<scalar_t>* o = dst + row * g.out_row;
      for (int64_t e = 0; e < g.out_row; ++e) {
        o[e] = static_cast<mix_out_t<scalar_t>>(Weighted ? acc[e] : acc[e] * inv);
      }
    }
  });
}

at::Tensor mix_subpatches_cpu(const at::Tensor& images, int64_t patch_size, int64_t grid,
                              const c10::optional<at::Tensor>& weights) {
  const MixOperands m = prepare_mix(images, patch_size, grid, weights);
  if (m.out.numel() == 0) return m.out;
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, m.src.scalar_type(), "mix_subpatches_cpu", [&] {
    const scalar_t* s = m.src.const_data_ptr<scalar_t>();
    auto* d = m.out.mutable_data_ptr<mix_out_t<scalar_t>>();
    if (m.weights.defined()) {
      mix_rows<scalar_t, true>(m.geometry, s, d, m.weights.const_data_ptr<mix_acc_t<scalar_t>>());
    } else {
      mix_rows<scalar_t, false>(m.geometry, s, d, nullptr);
    }
  });
  return m.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ppml, CPU, m) {
  m.impl("mix_subpatches", &mix_subpatches_cpu);
}

}  // namespace ppml::ops
