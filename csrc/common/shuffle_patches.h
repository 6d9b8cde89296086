// Index maths and argument checks for ppml::shuffle_patches, shared by the CPU and CUDA kernels.
//
// Both kernels see the images as `planes` planes of H rows, each row W * K elements long, where
//   NCHW contiguous:  planes = B * C, K = 1  (one plane per channel; perm row = plane / C)
//   NHWC contiguous:  planes = B,     K = C  (channels interleaved; a patch row is p * C contiguous elements)
// so a patch row is always one contiguous run of p * K elements and the op is a gather of such runs. The kernels
// move bytes, not typed values, so one code path serves every dtype: all sizes below are in "units", a unit being
// the widest power-of-two byte chunk that divides a run (see pick_unit_bytes).
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

#ifndef __CUDACC_RTC__
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <sstream>
#include <string>
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
  return shuffle_row_offset<Index>(g, plane, sy * static_cast<Index>(g.patch) + r) + sx * static_cast<Index>(g.run_units);
}

// Clamp of a tile index into [0, N): perm is validated before the gather runs (on the host for CPU tensors, by a
// device-side assert queued ahead of it for CUDA ones), so this never changes a valid key; it only guarantees that no
// bad key can make a kernel read outside the image, whatever happens to the check.
template <typename Index>
C10_HOST_DEVICE inline Index clamp_tile(Index tile, Index num_tiles) {
  return tile < 0 ? Index(0) : (tile >= num_tiles ? num_tiles - 1 : tile);
}

#ifndef __CUDACC_RTC__

inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

// "int32 [8, 196] on cpu": the wording ppml/ops/_common.py::describe uses too.
inline std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << dtype_name(t.scalar_type()) << " " << t.sizes() << " on " << t.device();
  return os.str();
}

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
  TORCH_CHECK_VALUE(H % p == 0 && W % p == 0, "ppml.shuffle_patches: patch_size must divide H and W, got patch_size=", p,
              " for H=", H, ", W=", W);
  const int64_t N = (H / p) * (W / p);
  TORCH_CHECK_VALUE(perm.scalar_type() == at::kLong && perm.dim() == 2 && perm.size(0) == B && perm.size(1) == N,
              "ppml.shuffle_patches: perm must be int64 [B, N] with B=", B, " and N=(H/p)*(W/p)=", N, ", got ",
              describe(perm));
  TORCH_CHECK_VALUE(perm.device() == images.device(), "ppml.shuffle_patches: perm must be on the images' device ",
              images.device(), ", got ", describe(perm));
}

// Memory layout the kernels work in and return: channels_last stays channels_last, everything else is made
// contiguous. ppml/ops/shuffle_patches.py::_output_is_channels_last is the Python twin (used by the fake kernel).
inline bool shuffle_use_channels_last(const at::Tensor& images) {
  return !images.is_contiguous() && images.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Checks an `out=` tensor for ops whose output has the shape `sizes` and dtype `dtype`, and returns whether the kernel
// should work in channels_last (out is channels_last) or contiguous (out is contiguous) layout. An out sharing storage
// with the images would make the gather read what it already wrote, so it is refused.
inline bool check_out(const char* op, const at::Tensor& out, at::IntArrayRef sizes, at::ScalarType dtype,
                      const at::Tensor& images) {
  TORCH_CHECK_VALUE(out.sizes() == sizes && out.scalar_type() == dtype && out.device() == images.device(), op,
                    ": out must be ", dtype_name(dtype), " ", sizes, " on ", images.device(), ", got ", describe(out));
  const bool contiguous = out.is_contiguous();
  const bool cl = !contiguous && out.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK_VALUE(contiguous || cl, op, ": out must be contiguous or channels_last, got strides ", out.strides());
  TORCH_CHECK_VALUE(!out.numel() || !out.is_alias_of(images), op, ": out must not share memory with images");
  return cl;
}

// The functional op's output: same shape and dtype, in the working layout.
inline at::Tensor empty_shuffle_output(const at::Tensor& images) {
  return at::empty(images.sizes(), images.options().memory_format(shuffle_use_channels_last(images)
                                                                        ? at::MemoryFormat::ChannelsLast
                                                                        : at::MemoryFormat::Contiguous));
}

inline ShuffleGeometry make_shuffle_geometry(const at::Tensor& dense, bool channels_last, int64_t p,
                                             int64_t unit_bytes) {
  const int64_t B = dense.size(0), C = dense.size(1), H = dense.size(2), W = dense.size(3);
  const int64_t K = channels_last ? C : 1;
  ShuffleGeometry g;
  g.planes = channels_last ? B : B * C;
  g.planes_per_perm = channels_last ? 1 : C;
  g.height = H;
  const int64_t elem = static_cast<int64_t>(dense.element_size());
  g.row_units = W * K * elem / unit_bytes;
  g.run_units = p * K * elem / unit_bytes;
  g.patch = p;
  g.tiles_x = W / p;
  g.num_tiles = (H / p) * (W / p);
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
