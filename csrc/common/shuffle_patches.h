// Index maths and argument checks for ppml::shuffle_patches, shared by the CPU and CUDA kernels.
//
// The images are planes of rows (common/plane_geometry.h): a patch row is always one contiguous run of p * K
// elements and the op is a gather of such runs. The kernels move bytes, not typed values, so one code path serves
// every dtype: all sizes below are in "units", a unit being the widest power-of-two byte chunk that divides a run
// (see pick_unit_bytes).
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

#include "common/checks.h"  // dtype_name, describe, check_out
#include "common/plane_geometry.h"

#ifndef __CUDACC_RTC__
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#endif

namespace ppml::ops {

struct ShuffleGeometry {
  int64_t planes;           // number of planes
  int64_t planes_per_perm;  // consecutive planes sharing one permutation row (C for NCHW, 1 for NHWC)
  int64_t height;           // H
  int64_t row_units;        // one image row of a plane, W * K elements
  int64_t run_units;        // one patch row, p * K elements
  int64_t patch;            // p
  int64_t tiles_x;          // W / p
  int64_t num_tiles;        // N = (H / p) * (W / p)
};

// Offset (in units) of the first unit of row `y` of `plane`.
template <typename Index>
C10_HOST_DEVICE inline Index shuffle_row_offset(const ShuffleGeometry& g, Index plane, Index y) {
  return (plane * static_cast<Index>(g.height) + y) * static_cast<Index>(g.row_units);
}

// Offset (in units) of row `r` (0 <= r < p) of source tile (sy, sx) in `plane`: where output row ty*p + r of the
// tile that perm maps to (sy, sx) = divmod(perm[...], tiles_x) reads from. Callers do the divisions (the CUDA kernel
// with precomputed fast dividers).
template <typename Index>
C10_HOST_DEVICE inline Index shuffle_source_offset(const ShuffleGeometry& g, Index plane, Index r, Index sy, Index sx) {
  return shuffle_row_offset<Index>(g, plane, sy * static_cast<Index>(g.patch) + r) +
         sx * static_cast<Index>(g.run_units);
}

#ifndef __CUDACC_RTC__

// The same checks, with the same wording, as ppml/ops/shuffle_patches.py::_check (which the fake kernel and the
// public function use); these guard direct calls of torch.ops.ppml.shuffle_patches.
inline void check_shuffle_args(const at::Tensor& images, const at::Tensor& perm, int64_t p) {
  TORCH_CHECK_VALUE(images.dim() == 4, "ppml.shuffle_patches: images must be 4-D [B, C, H, W], got ", describe(images));
  const auto st = images.scalar_type();
  TORCH_CHECK_TYPE(st == at::kByte || st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
              "ppml.shuffle_patches: images must be uint8, float16, bfloat16, float32 or float64, got ",
              describe(images));
  const int64_t B = images.size(0), H = images.size(2), W = images.size(3);
  TORCH_CHECK_VALUE(p > 0, "ppml.shuffle_patches: patch_size must be a positive integer, got ", p);
  TORCH_CHECK_VALUE(H % p == 0 && W % p == 0,
                    "ppml.shuffle_patches: patch_size must divide H and W, got patch_size=", p, " for H=", H,
                    ", W=", W);
  const int64_t N = (H / p) * (W / p);
  TORCH_CHECK_VALUE(perm.scalar_type() == at::kLong && perm.dim() == 2 && perm.size(0) == B && perm.size(1) == N,
              "ppml.shuffle_patches: perm must be int64 [B, N] with B=", B, " and N=(H/p)*(W/p)=", N, ", got ",
              describe(perm));
  TORCH_CHECK_VALUE(perm.device() == images.device(), "ppml.shuffle_patches: perm must be on the images' device ",
              images.device(), ", got ", describe(perm));
}

// The functional op's output: same shape and dtype, in the working layout.
inline at::Tensor empty_shuffle_output(const at::Tensor& images) {
  return at::empty(images.sizes(), images.options().memory_format(working_format(use_channels_last(images))));
}

inline ShuffleGeometry make_shuffle_geometry(const at::Tensor& dense, bool channels_last, int64_t p,
                                             int64_t unit_bytes) {
  const PlaneLayout l = make_plane_layout(dense, channels_last);
  const int64_t elem = static_cast<int64_t>(dense.element_size());
  ShuffleGeometry g;
  g.planes = l.planes;
  g.planes_per_perm = l.planes_per_image;
  g.height = l.height;
  g.row_units = l.row * elem / unit_bytes;
  g.run_units = p * l.interleave * elem / unit_bytes;
  g.patch = p;
  g.tiles_x = dense.size(3) / p;
  g.num_tiles = (dense.size(2) / p) * g.tiles_x;
  return g;
}

// Widest power-of-two chunk (<= max_bytes) dividing both a patch row's byte length and the data pointers' alignment.
inline int64_t pick_unit_bytes(int64_t run_bytes, const void* a, const void* b, int64_t max_bytes) {
  int64_t u = max_bytes;
  const auto addr = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b);
  while (u > 1 && (run_bytes % u != 0 || addr % static_cast<uintptr_t>(u) != 0)) u /= 2;
  return u;
}

#endif  // __CUDACC_RTC__

}  // namespace ppml::ops
