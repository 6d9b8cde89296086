// The images as the kernels see them: `planes` planes of H rows, each row W * K elements long, where
//   NCHW contiguous:  planes = B * C, K = 1  (one plane per channel; C consecutive planes belong to one image)
//   NHWC contiguous:  planes = B,     K = C  (channels interleaved: a run of x pixels is x * C contiguous elements)
// so a horizontal run of pixels of one plane is always contiguous. One rule picks the working layout for every op:
// channels_last inputs stay channels_last, everything else is made contiguous (Python twin:
// ppml/_layout.py::output_is_channels_last, which the fake kernels and the Triton launchers follow).
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

#ifndef __CUDACC_RTC__
#include <ATen/core/Tensor.h>
#endif

namespace ppml::ops {

// Clamp of a tile index into [0, N): keys are validated before the gather (on the host for CPU tensors, by a
// device-side assert inside the CUDA kernels), so this never changes a valid key; it only guarantees that no bad key
// can make a kernel read outside the image, whatever happens to the check.
template <typename Index>
C10_HOST_DEVICE inline Index clamp_tile(Index tile, Index num_tiles) {
  return tile < 0 ? Index(0) : (tile >= num_tiles ? num_tiles - 1 : tile);
}

struct PlaneLayout {
  int64_t planes;            // B * C (NCHW) or B (NHWC)
  int64_t planes_per_image;  // C (NCHW) or 1 (NHWC): consecutive planes that share one image's key or weights
  int64_t height;            // H
  int64_t row;               // W * K elements: one image row of a plane
  int64_t interleave;        // K: elements per pixel in memory order (1 for NCHW, C for NHWC)
};

#ifndef __CUDACC_RTC__

// Memory layout the kernels work in and return: channels_last stays channels_last, everything else is contiguous.
inline bool use_channels_last(const at::Tensor& images) {
  return !images.is_contiguous() && images.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat working_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Plane layout of a dense [B, C, H, W] tensor in the working layout `channels_last`.
inline PlaneLayout make_plane_layout(const at::Tensor& dense, bool channels_last) {
  const int64_t B = dense.size(0), C = dense.size(1), H = dense.size(2), W = dense.size(3);
  const int64_t K = channels_last ? C : 1;
  return PlaneLayout{channels_last ? B : B * C, channels_last ? 1 : C, H, W * K, K};
}

#endif  // __CUDACC_RTC__

}  // namespace ppml::ops
