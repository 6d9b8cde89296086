// Index maths and argument checks for ppml::mix_subpatches, shared by the CPU and CUDA kernels.
//
// Layout as in common/plane_geometry.h: `planes` planes of H rows of W * K elements (NCHW: planes = B * C, K = 1;
// NHWC: planes = B, K = C). With q = p / g, one row of a sub-patch is a contiguous run of q * K elements, both in
// the input (at column (tx * p + j * q) * K) and in the output (at column tx * q * K), so the kernels add runs to runs.
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>
#include <type_traits>

#include "common/checks.h"
#include "common/plane_geometry.h"

#ifndef __CUDACC_RTC__
#include <ATen/ops/empty.h>
#endif

namespace ppml::ops {

// float64 images accumulate in double, all others (uint8, float16, bfloat16, float32) in float; uint8 mixes to float.
template <typename scalar_t>
using mix_acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
template <typename scalar_t>
using mix_out_t = std::conditional_t<std::is_same_v<scalar_t, uint8_t>, float, scalar_t>;

struct MixGeometry {
  int64_t planes;            // number of planes
  int64_t planes_per_image;  // consecutive planes sharing one image's weights (C for NCHW, 1 for NHWC)
  int64_t height;            // H
  int64_t in_row;            // W * K elements
  int64_t out_rows;          // H / g
  int64_t out_row;           // (W / g) * K elements
  int64_t patch;             // p
  int64_t grid;              // g
  int64_t sub;               // q = p / g
  int64_t run;               // q * K elements: one sub-patch row
  int64_t interleave;        // K: elements per pixel in memory order (1 for NCHW, C for NHWC)
  int64_t tiles_x;           // W / p
  int64_t num_tiles;         // N
};

// Offset of row u of sub-patch (i, j) of tile (ty, tx) of `plane` in the input.
template <typename Index>
C10_HOST_DEVICE inline Index mix_input_offset(const MixGeometry& g, Index plane, Index ty, Index tx, Index i, Index j,
                                              Index u) {
  const Index p = static_cast<Index>(g.patch), q = static_cast<Index>(g.sub);
  const Index row = plane * static_cast<Index>(g.height) + ty * p + i * q + u;
  return row * static_cast<Index>(g.in_row) + (tx * p + j * q) * static_cast<Index>(g.interleave);
}

// Offset of the weight of sub-patch (i, j) of tile (ty, tx) of `plane`'s image in a contiguous [B, N, g*g] tensor.
template <typename Index>
C10_HOST_DEVICE inline Index mix_weight_offset(const MixGeometry& g, Index plane, Index ty, Index tx, Index i,
                                               Index j) {
  const Index b = plane / static_cast<Index>(g.planes_per_image);
  const Index gg = static_cast<Index>(g.grid * g.grid);
  return (b * static_cast<Index>(g.num_tiles) + ty * static_cast<Index>(g.tiles_x) + tx) * gg +
         i * static_cast<Index>(g.grid) + j;
}

#ifndef __CUDACC_RTC__

// The same checks, with the same wording, as ppml/ops/mix_subpatches.py::_check.
inline void check_mix_args(const at::Tensor& images, int64_t p, int64_t grid,
                           const c10::optional<at::Tensor>& weights) {
  TORCH_CHECK_VALUE(images.dim() == 4, "ppml.mix_subpatches: images must be 4-D [B, C, H, W], got ", describe(images));
  const auto st = images.scalar_type();
  TORCH_CHECK_TYPE(st == at::kByte || st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
                   "ppml.mix_subpatches: images must be uint8, float16, bfloat16, float32 or float64, got ",
                   describe(images));
  TORCH_CHECK_VALUE(p > 0, "ppml.mix_subpatches: patch_size must be a positive integer, got ", p);
  TORCH_CHECK_VALUE(grid > 0, "ppml.mix_subpatches: grid must be a positive integer, got ", grid);
  TORCH_CHECK_VALUE(p % grid == 0, "ppml.mix_subpatches: grid must divide patch_size, got grid=", grid,
                    " for patch_size=", p);
  const int64_t B = images.size(0), H = images.size(2), W = images.size(3);
  TORCH_CHECK_VALUE(H % p == 0 && W % p == 0, "ppml.mix_subpatches: patch_size must divide H and W, got patch_size=",
                    p, " for H=", H, ", W=", W);
  if (weights.has_value()) {
    const at::Tensor& w = *weights;
    const int64_t N = (H / p) * (W / p);
    TORCH_CHECK_VALUE(w.is_floating_point() && w.dim() == 3 && w.size(0) == B && w.size(1) == N &&
                          w.size(2) == grid * grid,
                      "ppml.mix_subpatches: weights must be float [B, N, g*g] with B=", B, ", N=(H/p)*(W/p)=", N,
                      ", g*g=", grid * grid, ", got ", describe(w));
    TORCH_CHECK_VALUE(w.device() == images.device(), "ppml.mix_subpatches: weights must be on the images' device ",
                      images.device(), ", got ", describe(w));
  }
}

inline MixGeometry make_mix_geometry(const at::Tensor& dense, bool channels_last, int64_t p, int64_t grid) {
  const PlaneLayout l = make_plane_layout(dense, channels_last);
  const int64_t H = dense.size(2), W = dense.size(3), K = l.interleave;
  MixGeometry g;
  g.planes = l.planes;
  g.planes_per_image = l.planes_per_image;
  g.height = H;
  g.in_row = l.row;
  g.out_rows = H / grid;
  g.out_row = (W / grid) * K;
  g.patch = p;
  g.grid = grid;
  g.sub = p / grid;
  g.run = (p / grid) * K;
  g.interleave = K;
  g.tiles_x = W / p;
  g.num_tiles = (H / p) * (W / p);
  return g;
}

// Everything a kernel needs, prepared once for both devices: the images in the working layout (channels_last kept,
// anything else made contiguous), the empty output in the same layout, the weights as contiguous accumulation-dtype
// values (undefined when mixing with the plain mean) and the geometry.
struct MixOperands {
  at::Tensor src, out, weights;
  MixGeometry geometry;
};

inline MixOperands prepare_mix(const at::Tensor& images, int64_t p, int64_t grid,
                               const c10::optional<at::Tensor>& weights) {
  check_mix_args(images, p, grid, weights);
  const bool cl = use_channels_last(images);
  const auto fmt = working_format(cl);
  MixOperands m;
  m.src = images.contiguous(fmt);
  const auto st = images.scalar_type();
  m.out = at::empty({m.src.size(0), m.src.size(1), m.src.size(2) / grid, m.src.size(3) / grid},
                    m.src.options().dtype(st == at::kByte ? at::kFloat : st).memory_format(fmt));
  if (weights.has_value()) m.weights = weights->to(st == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  m.geometry = make_mix_geometry(m.src, cl, p, grid);
  return m;
}

#endif  // __CUDACC_RTC__

}  // namespace ppml::ops
