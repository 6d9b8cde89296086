// CUDA kernel of ppml::mix_subpatches: each thread sums the g² sub-patch pixels of V consecutive output elements (one
// 16-byte load per sub-patch, or per pair of sub-patches, wherever the sub-patch rows allow) in the reference's order.
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

// N values of T in one naturally aligned load or store (torch's aligned_vector): 16 bytes become one LDG.E.128.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// One thread makes V = Vec / J consecutive outputs of one sub-patch row (all V share one tile, so one weight per
// sub-patch). For each sub-patch row it needs V contiguous input elements: with J = 1 one Vec-wide load per (i, j);
// with J = 2 (sub-patch rows of Vec / 2 elements, e.g. uint8 with q = 8) one load covers the rows of sub-patches j and
// j + 1, which lie side by side in the input. Either way the terms are added in the reference's order (i, then j,
// the first term not added to zero), with multiplies and adds nvcc cannot contract: the result is bit-exact.
template <typename scalar_t, int Width, int J, typename Index, bool Weighted>
__global__ void __launch_bounds__(kThreads)
    mix_subpatches_kernel(const scalar_t* __restrict__ src, mix_out_t<scalar_t>* __restrict__ dst,
                          const mix_acc_t<scalar_t>* __restrict__ w, MixGeometry g, MixDividers<Index> d,
                          Index total_vecs, mix_acc_t<scalar_t> inv) {
  using acc_t = mix_acc_t<scalar_t>;
  using out_t = mix_out_t<scalar_t>;
  constexpr int V = Width / J;
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  const Index grid = static_cast<Index>(g.grid);
  for (Index t = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; t < total_vecs; t += stride) {
    const Index o = t * V;                               // first of this thread's output elements
    const auto row_e = d.out_row.divmod(o);              // (plane * H/g + oy, element within the output row)
    const auto plane_oy = d.out_rows.divmod(row_e.div);  // (plane, oy)
    const auto ty_u = d.sub.divmod(plane_oy.mod);        // (tile row, row within the sub-patch)
    const auto tx_k = d.run.divmod(row_e.mod);           // (tile column, element within the sub-patch row)
    acc_t acc[V];
    // unrolled by two so that g = 2 issues its loads back to back before the adds (bytes in flight)
#pragma unroll 2
    for (Index i = 0; i < grid; ++i) {
#pragma unroll 2
      for (Index j0 = 0; j0 < grid; j0 += J) {
        const Vec<scalar_t, Width> in = *reinterpret_cast<const Vec<scalar_t, Width>*>(
            src + mix_input_offset<Index>(g, plane_oy.div, ty_u.div, tx_k.div, i, j0, ty_u.mod) + tx_k.mod);
#pragma unroll
        for (int jj = 0; jj < J; ++jj) {
          const Index j = j0 + jj;
          acc_t wt = acc_t(1);
          if constexpr (Weighted) wt = w[mix_weight_offset<Index>(g, plane_oy.div, ty_u.div, tx_k.div, i, j)];
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const acc_t v = static_cast<acc_t>(in.v[jj * V + e]);
            const acc_t term = Weighted ? mul_rn(wt, v) : v;
            acc[e] = (i == 0 && j == 0) ? term : add_rn(acc[e], term);
          }
        }
      }
    }
    Vec<out_t, V> res;
#pragma unroll
    for (int e = 0; e < V; ++e) res.v[e] = static_cast<out_t>(Weighted ? acc[e] : mul_rn(acc[e], inv));
    *reinterpret_cast<Vec<out_t, V>*>(dst + o) = res;
  }
}

template <typename scalar_t, int Width, int J, typename Index>
void launch(const at::Tensor& src, at::Tensor& out, const at::Tensor& w, const MixGeometry& g) {
  using acc_t = mix_acc_t<scalar_t>;
  constexpr int V = Width / J;
  const int64_t total = out.numel() / V;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // a few waves of fully resident blocks; the grid-stride loop does the rest
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, static_cast<int64_t>(sms) * 32);
  const acc_t inv = acc_t(1) / static_cast<acc_t>(g.grid * g.grid);
  auto stream = at::cuda::getCurrentCUDAStream();
  const scalar_t* s = src.const_data_ptr<scalar_t>();
  auto* d = out.mutable_data_ptr<mix_out_t<scalar_t>>();
  if (w.defined()) {
    mix_subpatches_kernel<scalar_t, Width, J, Index, true><<<blocks, kThreads, 0, stream>>>(
        s, d, w.const_data_ptr<acc_t>(), g, MixDividers<Index>(g), static_cast<Index>(total), inv);
  } else {
    mix_subpatches_kernel<scalar_t, Width, J, Index, false><<<blocks, kThreads, 0, stream>>>(
        s, d, nullptr, g, MixDividers<Index>(g), static_cast<Index>(total), inv);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// The widest access the geometry and the pointers allow: 16-byte loads when a sub-patch row is a multiple of 16 bytes
// (Width = 16 / sizeof) or exactly half of it (J = 2, when g is even), else 8-byte loads (uint8 channels_last with
// C = 3 has 24-byte rows), else one element at a time. 64-bit indices (tensors of 2^31 elements or more) take the
// element-wise kernel only: such sizes are memory-bound on the HBM either way and it keeps the build small.
template <typename scalar_t>
void dispatch(const at::Tensor& src, at::Tensor& out, const at::Tensor& w, const MixGeometry& g) {
  constexpr int kFull = static_cast<int>(16 / sizeof(scalar_t));
  constexpr int kHalf = kFull / 2;
  const bool small = src.numel() < (int64_t{1} << 31) && (!w.defined() || w.numel() < (int64_t{1} << 31));
  if (!small) return launch<scalar_t, 1, 1, int64_t>(src, out, w, g);
  const void* s = src.const_data_ptr();
  const void* o = out.const_data_ptr();
  const int64_t out_bytes = static_cast<int64_t>(sizeof(mix_out_t<scalar_t>));
  // the output stores are V elements wide and V-aligned: V divides the sub-patch row, hence every output row offset
  auto fits = [&](int width, int j) {
    const int v = width / j;
    const bool shape = j == 1 ? g.run % width == 0 : (g.run == v && g.grid % j == 0);
    const int64_t in_bytes = width * static_cast<int64_t>(sizeof(scalar_t));
    return width > 1 && shape && aligned(s, in_bytes) && aligned(o, v * out_bytes);
  };
  if (fits(kFull, 1)) return launch<scalar_t, kFull, 1, uint32_t>(src, out, w, g);
  if (fits(kFull, 2)) return launch<scalar_t, kFull, 2, uint32_t>(src, out, w, g);
  if constexpr (kHalf > 1) {
    if (fits(kHalf, 1)) return launch<scalar_t, kHalf, 1, uint32_t>(src, out, w, g);
  }
  launch<scalar_t, 1, 1, uint32_t>(src, out, w, g);
}

at::Tensor mix_subpatches_cuda(const at::Tensor& images, int64_t patch_size, int64_t grid,
                               const c10::optional<at::Tensor>& weights) {
  const c10::cuda::CUDAGuard guard(images.device());
  const MixOperands m = prepare_mix(images, patch_size, grid, weights);
  at::Tensor out = m.out;
  if (out.numel() == 0) return out;
  // 32-bit indices while the input (the largest offset) and the grid-stride overshoot stay below 2^31.
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, m.src.scalar_type(), "mix_subpatches_cuda",
                                  [&] { dispatch<scalar_t>(m.src, out, m.weights, m.geometry); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ppml, CUDA, m) {
  m.impl("mix_subpatches", &mix_subpatches_cuda);
}

}  // namespace ppml::ops
