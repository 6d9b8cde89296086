// CUDA kernel of ppml::shuffle_patches: one launch per call. Each block checks its image's key in shared memory (a
// bad key stops the stream with a device-side assert naming the op), then moves aligned chunks (16 bytes wherever the
// patch rows allow) of that image, several loads in flight per thread before any store.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/device_assert.h"
#include "common/shuffle_patches.h"
#include "cuda/key_rows.cuh"

namespace ppml::ops {
namespace {

constexpr int kThreads = 256;
// Units each thread loads before it stores any: 4 x 16 bytes in flight per thread, 16 KiB per block, enough to cover
// HBM latency with the 8 resident blocks an SM holds at 256 threads.
constexpr int kUnroll = 4;
// Keys of up to this many tiles are checked inside the gather kernel (int32 tiles + a bitmap: 33 KiB of shared memory
// at most, below the 48 KiB a launch gets without opting in). p = 16 at 224 px is N = 196; p = 4 at 224 px 3,136.
constexpr int64_t kMaxFusedTiles = 8192;
// Blocks to aim for: a few waves of fully resident blocks over the SMs, so that no SM idles at the tail.
constexpr int kWaves = 4;

#define PPML_SHUFFLE_KEY_MESSAGE \
  "ppml.shuffle_patches: every row of perm must be a permutation of 0..N-1 (N=(H/p)*(W/p))"

// Key validation without a host round trip (the way torch's own index ops do it), for keys too long for the fused
// check below: each row of perm must be a permutation of 0..N-1, and a row that is not stops the stream with a
// device-side assert naming the op. `seen` counts each value of each row (zeroed by the caller). The gather kernels
// clamp every tile index they read, so even with device asserts compiled out (TORCH_DISABLE_GPU_ASSERTS) no key can
// make them read or write outside the tensors.
__global__ void check_perm_rows_kernel(const int64_t* __restrict__ perm, int32_t* __restrict__ seen, int64_t B,
                                       int64_t N) {
  const int64_t total = B * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    CUDA_KERNEL_ASSERT_MSG(key_value_is_first(perm, seen, i, N), PPML_SHUFFLE_KEY_MESSAGE);
  }
}

// Divisions by the geometry, precomputed once per launch: 32-bit magic-number division where every offset fits
// (the common case), plain 64-bit division otherwise. Four divmods per 16-byte move would otherwise bound the kernel.
template <typename Index>
struct ShuffleDividers {
  at::cuda::detail::IntDivider<Index> row_units, height, run_units, patch, planes_per_perm, tiles_x;
  explicit ShuffleDividers(const ShuffleGeometry& g)
      : row_units(g.row_units), height(g.height), run_units(g.run_units), patch(g.patch),
        planes_per_perm(g.planes_per_perm), tiles_x(g.tiles_x) {}
};

template <typename Unit, typename Index>
__global__ void shuffle_patches_kernel(const Unit* __restrict__ src, Unit* __restrict__ dst,
                                       const int64_t* __restrict__ perm, ShuffleGeometry g,
                                       ShuffleDividers<Index> d, Index total) {
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const auto row_x = d.row_units.divmod(i);          // (plane * H + y, unit within the row)
    const auto plane_y = d.height.divmod(row_x.div);   // (plane, y)
    const auto tx_k = d.run_units.divmod(row_x.mod);   // (tile column, unit within the patch row)
    const auto ty_r = d.patch.divmod(plane_y.mod);     // (tile row, row within the patch)
    const Index n = static_cast<Index>(g.num_tiles);
    const Index key = d.planes_per_perm.div(plane_y.div) * n + ty_r.div * static_cast<Index>(g.tiles_x) + tx_k.div;
    const auto sy_sx = d.tiles_x.divmod(clamp_tile<Index>(static_cast<Index>(__ldg(perm + key)), n));
    dst[i] = src[shuffle_source_offset<Index>(g, plane_y.div, ty_r.mod, sy_sx.div, sy_sx.mod) + tx_k.mod];
  }
}

// One launch per call for keys of up to kMaxFusedTiles tiles: blockIdx.y picks an image (grid-striding over B past
// 65,535), blockIdx.x a set of 16 KiB chunks of it. Before touching the image, each block checks the image's key row
// into shared memory: a bitmap of the values seen catches out-of-range and repeated entries (the device-side assert
// names the op, as the separate check kernel does), and the clamped tiles it keeps serve the gather's lookups, so the
// gather reads the key from shared memory instead of once per unit. Re-checking the row in every block costs N * 8
// bytes from L2 per block, against the 16 KiB or more it moves. No memset, no second launch, no host sync.
template <typename Unit, typename Index>
__global__ void __launch_bounds__(kThreads)
    shuffle_patches_fused_kernel(const Unit* __restrict__ src, Unit* __restrict__ dst, const int64_t* __restrict__ perm,
                                 ShuffleGeometry g, ShuffleDividers<Index> d, Index images, Index image_units) {
  extern __shared__ int32_t shared[];
  const int n = static_cast<int>(g.num_tiles);
  int32_t* tiles = shared;                                    // n clamped source tiles of this image
  uint32_t* seen = reinterpret_cast<uint32_t*>(shared + n);   // one bit per tile value
  const Index chunk = static_cast<Index>(kThreads) * kUnroll;
  const Index tiles_x = static_cast<Index>(g.tiles_x);
  for (Index img = blockIdx.y; img < images; img += gridDim.y) {
    const bool key_ok = load_key_row<kThreads>(perm + static_cast<int64_t>(img) * n, n, tiles, seen);
    CUDA_KERNEL_ASSERT_MSG(key_ok, PPML_SHUFFLE_KEY_MESSAGE);
    const Unit* from = src + img * image_units;
    Unit* to = dst + img * image_units;
    for (Index base = static_cast<Index>(blockIdx.x) * chunk; base < image_units;
         base += static_cast<Index>(gridDim.x) * chunk) {
      // All kUnroll loads are issued before the first store (no aliasing: __restrict__), so each thread keeps
      // kUnroll * sizeof(Unit) bytes in flight; consecutive threads move consecutive units (coalesced).
      Unit v[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const Index i = base + static_cast<Index>(k * kThreads) + threadIdx.x;
        if (i < image_units) {
          const auto row_x = d.row_units.divmod(i);         // (plane in image * H + y, unit within the row)
          const auto plane_y = d.height.divmod(row_x.div);  // (plane in image, y)
          const auto tx_k = d.run_units.divmod(row_x.mod);  // (tile column, unit within the patch row)
          const auto ty_r = d.patch.divmod(plane_y.mod);    // (tile row, row within the patch)
          const auto sy_sx = d.tiles_x.divmod(static_cast<Index>(tiles[ty_r.div * tiles_x + tx_k.div]));
          v[k] = from[shuffle_source_offset<Index>(g, plane_y.div, ty_r.mod, sy_sx.div, sy_sx.mod) + tx_k.mod];
        }
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const Index i = base + static_cast<Index>(k * kThreads) + threadIdx.x;
        if (i < image_units) to[i] = v[k];
      }
    }
    __syncthreads();  // the next image's check overwrites tiles and seen
  }
}

// Queues the separate key check on the current stream (keys longer than kMaxFusedTiles only): no synchronisation, so
// a call costs no host round trip and can be captured in a CUDA graph. A bad key surfaces as a device-side assert
// ("CUDA error: device-side assert triggered", with the message above on stderr) at the next synchronisation, as
// with torch's index ops.
void check_perm_rows_cuda(const at::Tensor& perm) {
  const int64_t B = perm.size(0), N = perm.size(1);
  if (B * N == 0) return;
  auto seen = at::zeros({B, N}, perm.options().dtype(at::kInt));
  const int64_t blocks = std::min<int64_t>((B * N + kThreads - 1) / kThreads, 65535);
  check_perm_rows_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      perm.const_data_ptr<int64_t>(), seen.mutable_data_ptr<int32_t>(), B, N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Grid of the fused kernel: y = images (at most 65,535; the kernel strides over the rest), x = chunks per image,
// enough for kWaves waves of resident blocks over the SMs in all (B = 1 still spreads its image over the SMs; at
// B = 1024 each block moves several chunks of one image and checks its key once for all of them).
dim3 fused_grid(int64_t images, int64_t image_units, int sms) {
  const int64_t chunk = static_cast<int64_t>(kThreads) * kUnroll;
  const int64_t chunks = (image_units + chunk - 1) / chunk;
  const int64_t target = static_cast<int64_t>(sms) * (2048 / kThreads) * kWaves;
  const int64_t per_image = std::max<int64_t>(1, (target + images - 1) / images);
  return dim3(static_cast<unsigned>(std::min(chunks, per_image)),
              static_cast<unsigned>(std::min<int64_t>(images, 65535)));
}

template <typename Unit, typename Index>
void launch_fused(const at::Tensor& src, at::Tensor& out, const at::Tensor& perm, const ShuffleGeometry& g) {
  const int64_t images = g.planes / g.planes_per_perm;
  const int64_t image_units = g.planes_per_perm * g.height * g.row_units;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const size_t shared = static_cast<size_t>(g.num_tiles + (g.num_tiles + 31) / 32) * sizeof(int32_t);
  shuffle_patches_fused_kernel<Unit, Index><<<fused_grid(images, image_units, sms), kThreads, shared,
                                              at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const Unit*>(src.const_data_ptr()), static_cast<Unit*>(out.mutable_data_ptr()),
      perm.const_data_ptr<int64_t>(), g, ShuffleDividers<Index>(g), static_cast<Index>(images),
      static_cast<Index>(image_units));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Unit, typename Index>
void launch_indexed(const at::Tensor& src, at::Tensor& out, const at::Tensor& perm, const ShuffleGeometry& g) {
  if (g.num_tiles <= kMaxFusedTiles) {
    launch_fused<Unit, Index>(src, out, perm, g);
    return;
  }
  check_perm_rows_cuda(perm);
  const int64_t total = g.planes * g.height * g.row_units;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // Enough resident blocks to cover the memory latency; the grid-stride loop does the rest.
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, static_cast<int64_t>(sms) * 32);
  shuffle_patches_kernel<Unit, Index><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const Unit*>(src.const_data_ptr()), static_cast<Unit*>(out.mutable_data_ptr()),
      perm.const_data_ptr<int64_t>(), g, ShuffleDividers<Index>(g), static_cast<Index>(total));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Unit>
void launch(const at::Tensor& src, at::Tensor& out, const at::Tensor& perm, const ShuffleGeometry& g) {
  const int64_t total = g.planes * g.height * g.row_units;
  // uint32 indices (and fast division) while every index, the grid-stride and chunk overshoots included (at most
  // one image plus one grid of chunks past the end), stays below 2^31.
  if (total < (int64_t{1} << 30) && g.num_tiles * (g.planes / g.planes_per_perm) < (int64_t{1} << 31)) {
    launch_indexed<Unit, uint32_t>(src, out, perm, g);
  } else {
    launch_indexed<Unit, int64_t>(src, out, perm, g);
  }
}

void shuffle_patches_out_cuda(const at::Tensor& images, const at::Tensor& perm, int64_t patch_size,
                     at::Tensor& out) {
  check_shuffle_args(images, perm, patch_size);
  const c10::cuda::CUDAGuard guard(images.device());
  const bool cl = check_out("ppml.shuffle_patches", out, images.sizes(), images.scalar_type(), images);
  if (out.numel() == 0) return;
  const at::Tensor src = images.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const at::Tensor perm_c = perm.contiguous();

  const int64_t run_bytes = patch_size * (cl ? src.size(1) : 1) * static_cast<int64_t>(src.element_size());
  const int64_t unit = pick_unit_bytes(run_bytes, src.const_data_ptr(), out.const_data_ptr(), 16);
  const ShuffleGeometry g = make_shuffle_geometry(src, cl, patch_size, unit);
  switch (unit) {
    case 16: launch<uint4>(src, out, perm_c, g); break;
    case 8: launch<uint2>(src, out, perm_c, g); break;
    case 4: launch<uint32_t>(src, out, perm_c, g); break;
    case 2: launch<uint16_t>(src, out, perm_c, g); break;
    default: launch<uint8_t>(src, out, perm_c, g); break;
  }
}

at::Tensor shuffle_patches_cuda(const at::Tensor& images, const at::Tensor& perm, int64_t patch_size) {
  check_shuffle_args(images, perm, patch_size);
  at::Tensor out = empty_shuffle_output(images);
  shuffle_patches_out_cuda(images, perm, patch_size, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ppml, CUDA, m) {
  m.impl("shuffle_patches", &shuffle_patches_cuda);
  m.impl("shuffle_patches.out", &shuffle_patches_out_cuda);
}

}  // namespace ppml::ops
