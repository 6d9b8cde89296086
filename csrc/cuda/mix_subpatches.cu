// CUDA kernel of ppml::mix_subpatches: one thread per output element sums its g² sub-patch pixels in float.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>


#include "common/mix_subpatches.h"

namespace ppml::ops {
namespace {

constexpr int kThreads = 256;

// Round-to-nearest multiply and add that nvcc may not contract into an FMA: the sum then rounds exactly as the
// reference's separate multiply and add do.
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ inline double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename Index>
struct MixDividers {
  at::cuda::detail::IntDivider<Index> out_row, out_rows, sub, run;
  explicit MixDividers(const MixGeometry& g) : out_row(g.out_row), out_rows(g.out_rows), sub(g.sub), run(g.run) {}
};

template <typename scalar_t, typename Index, bool Weighted>
__global__ void mix_subpatches_kernel(const scalar_t* __restrict__ src, mix_out_t<scalar_t>* __restrict__ dst,
                                      const mix_acc_t<scalar_t>* __restrict__ w, MixGeometry g, MixDividers<Index> d,
                                      Index total, mix_acc_t<scalar_t> inv) {
  using acc_t = mix_acc_t<scalar_t>;
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  const Index grid = static_cast<Index>(g.grid);
  for (Index o = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; o < total; o += stride) {
    const auto row_e = d.out_row.divmod(o);            // (plane * H/g + oy, element within the output row)
    const auto plane_oy = d.out_rows.divmod(row_e.div);  // (plane, oy)
    const auto ty_u = d.sub.divmod(plane_oy.mod);        // (tile row, row within the sub-patch)
    const auto tx_k = d.run.divmod(row_e.mod);           // (tile column, element within the sub-patch row)
    acc_t acc = 0;
    for (Index i = 0; i < grid; ++i) {
      for (Index j = 0; j < grid; ++j) {
        const acc_t v = static_cast<acc_t>(
            src[mix_input_offset<Index>(g, plane_oy.div, ty_u.div, tx_k.div, i, j, ty_u.mod) + tx_k.mod]);
        const acc_t term = Weighted ? mul_rn(w[mix_weight_offset<Index>(g, plane_oy.div, ty_u.div, tx_k.div, i, j)], v)
                                    : v;
        acc = (i == 0 && j == 0) ? term : add_rn(acc, term);
      }
    }
    dst[o] = static_cast<mix_out_t<scalar_t>>(Weighted ? acc : mul_rn(acc, inv));
  }
}

template <typename scalar_t, typename Index>
void launch(const at::Tensor& src, at::Tensor& out, const at::Tensor& w, const MixGeometry& g) {
  using acc_t = mix_acc_t<scalar_t>;
  const int64_t total = out.numel();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, static_cast<int64_t>(sms) * 32);
  const acc_t inv = acc_t(1) / static_cast<acc_t>(g.grid * g.grid);
  auto stream = at::cuda::getCurrentCUDAStream();
  const scalar_t* s = src.const_data_ptr<scalar_t>();
  auto* d = out.mutable_data_ptr<mix_out_t<scalar_t>>();
  if (w.defined()) {
    mix_subpatches_kernel<scalar_t, Index, true><<<blocks, kThreads, 0, stream>>>(
        s, d, w.const_data_ptr<acc_t>(), g, MixDividers<Index>(g), static_cast<Index>(total), inv);
  } else {
    mix_subpatches_kernel<scalar_t, Index, false><<<blocks, kThreads, 0, stream>>>(
        s, d, nullptr, g, MixDividers<Index>(g), static_cast<Index>(total), inv);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor mix_subpatches_cuda(const at::Tensor& images, int64_t patch_size, int64_t grid,
                               const c10::optional<at::Tensor>& weights) {
  const c10::cuda::CUDAGuard guard(images.device());
  const MixOperands m = prepare_mix(images, patch_size, grid, weights);
  at::Tensor out = m.out;
  if (out.numel() == 0) return out;
  // 32-bit indices while the input (the largest offset) and the grid-stride overshoot stay below 2^31.
  const bool small = m.src.numel() < (int64_t{1} << 31) && (!m.weights.defined() || m.weights.numel() < (int64_t{1} << 31));
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, m.src.scalar_type(), "mix_subpatches_cuda", [&] {
    if (small) {
      launch<scalar_t, uint32_t>(m.src, out, m.weights, m.geometry);
    } else {
      launch<scalar_t, int64_t>(m.src, out, m.weights, m.geometry);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ppml, CUDA, m) {
  m.impl("mix_subpatches", &mix_subpatches_cuda);
}

}  // namespace ppml::ops
