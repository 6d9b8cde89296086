// CUDA kernel of ppml::patch_tokens: one launch, one read of the images and one write of the tokens. Each block
// checks its image's key in shared memory (a bad key stops the stream with a device-side assert naming the op, as
// shuffle_patches does), then each thread makes V consecutive elements of one token row: one V-element load of the
// source tile row (16 bytes wherever the tile rows allow: uint8 p = 16 is one LDG.E.128 feeding four STG.E.128 of
// float32), normalised in the fixed order of common/patch_tokens.h, stored as 16-byte vectors. No host sync.
// channels_last images (NHWC) with C = 3 or 4 take patch_tokens_cl_kernel: one thread reads the V pixels x C channels
// of a tile-row segment as C contiguous 16-byte loads (uint8 p = 16, C = 3: 48 bytes), de-interleaves the channels in
// registers and stores the C token-row segments as 16-byte vectors; other channels_last cases read element by element.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "common/device_assert.h"
#include "common/patch_tokens.h"
#include "common/plane_geometry.h"
#include "cuda/key_rows.cuh"

namespace ppml::ops {
namespace {

constexpr int kThreads = 256;
// Vectors each thread loads before it stores any: 2 x 16 bytes in flight per thread (and 2 x 64 bytes of float32
// stores) at uint8 p = 16; also keeps ~19 blocks per 224 px image, so B = 64 launches ~9 waves' worth over 132 SMs.
constexpr int kUnroll = 2;
// Keys of up to this many tiles are checked and held in shared memory (int32 tiles + a bitmap, 33 KiB at most).
constexpr int64_t kMaxFusedTiles = 8192;
constexpr int kWaves = 4;

#define PPML_TOKENS_KEY_MESSAGE "ppml.patch_tokens: every row of perm must be a permutation of 0..N-1 (N=(H/p)*(W/p))"

// Longer keys: a separate check (each value counted once per row; `seen` zeroed by the caller), queued on the stream.
__global__ void check_token_perm_kernel(const int64_t* __restrict__ perm, int32_t* __restrict__ seen, int64_t B,
                                        int64_t N) {
  const int64_t total = B * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    CUDA_KERNEL_ASSERT_MSG(key_value_is_first(perm, seen, i, N), PPML_TOKENS_KEY_MESSAGE);
  }
}

// Image img's key row (null without a key). `fused`: checked into shared memory first (tiles, seen), a bad row stops
// the stream with a device-side assert; the block's threads all take part.
__device__ inline const int64_t* image_key(const int64_t* perm, int64_t img, int64_t N, bool fused, int32_t* tiles,
                                           uint32_t* seen) {
  const int64_t* row = perm != nullptr ? perm + img * N : nullptr;
  if (fused) {
    const bool key_ok = load_key_row<kThreads>(row, static_cast<int>(N), tiles, seen);
    CUDA_KERNEL_ASSERT_MSG(key_ok, PPML_TOKENS_KEY_MESSAGE);
  }
  return row;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

struct TokenGeometry {
  int64_t C, H, W;   // image sizes
  int64_t p;         // patch size
  int64_t tiles_x;   // W / p
  int64_t N;         // tiles per image
};

// Divisions inside one image (32-bit: an image's tokens are checked to hold fewer than 2^31 elements).
struct TokenDividers {
  at::cuda::detail::IntDivider<uint32_t> p, C, tiles_x;
  explicit TokenDividers(const TokenGeometry& g) : p(g.p), C(g.C), tiles_x(g.tiles_x) {}
};

template <typename Out, int V>
__device__ inline void store_vec(Out* dst, const Out (&v)[V]) {
  constexpr int kPer = (16 / static_cast<int>(sizeof(Out))) < V ? (16 / static_cast<int>(sizeof(Out))) : V;
#pragma unroll
  for (int s = 0; s < V; s += kPer) {
    Vec<Out, kPer> w;
#pragma unroll
    for (int k = 0; k < kPer; ++k) w.v[k] = v[s + k];
    *reinterpret_cast<Vec<Out, kPer>*>(dst + s) = w;
  }
}

// blockIdx.y picks an image (striding over B past 65,535), blockIdx.x a set of chunks of its tokens. `fused`: the key
// row is checked into shared memory first (N <= kMaxFusedTiles); otherwise it was checked by the separate kernel and
// the tiles are read from global memory. No perm: tiles in order.
template <typename In, typename Out, typename Acc, int V, bool CL>
__global__ void __launch_bounds__(kThreads)
    patch_tokens_kernel(const In* __restrict__ src, Out* __restrict__ dst, const int64_t* __restrict__ perm,
                        TokenGeometry g, TokenDividers d, TokenStats<Acc> stats, const Acc* __restrict__ big_stats,
                        int64_t images, uint32_t image_vecs, bool fused) {
  extern __shared__ int32_t shared[];
  const int n = static_cast<int>(g.N);
  int32_t* tiles = shared;
  uint32_t* seen = reinterpret_cast<uint32_t*>(shared + n);
  const uint32_t chunk = static_cast<uint32_t>(kThreads) * kUnroll;
  const int64_t image_in = g.C * g.H * g.W;
  const int64_t image_out = static_cast<int64_t>(image_vecs) * V;
  for (int64_t img = blockIdx.y; img < images; img += gridDim.y) {
    const int64_t* row = image_key(perm, img, g.N, fused, tiles, seen);
    const In* from = src + img * image_in;
    Out* to = dst + img * image_out;
    for (uint32_t base = blockIdx.x * chunk; base < image_vecs; base += gridDim.x * chunk) {
      Acc val[kUnroll][V];
      uint32_t outs[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint32_t j = base + u * kThreads + threadIdx.x;
        outs[u] = j;
        if (j < image_vecs) {
          const uint32_t o = j * V;
          const auto ry = d.p.divmod(o);          // (token * C * p + c * p + y, x0)
          const auto cy = d.p.divmod(ry.div);      // (token * C + c, y)
          const auto ic = d.C.divmod(cy.div);      // (token, c)
          const uint32_t i = ic.div, c = ic.mod, y = cy.mod, x0 = ry.mod;
          uint32_t t = i;
          if (row != nullptr) {
            t = fused ? static_cast<uint32_t>(tiles[i])
                      : static_cast<uint32_t>(clamp_tile<int64_t>(__ldg(row + i), g.N));
          }
          const auto txy = d.tiles_x.divmod(t);  // (ty, tx)
          const int64_t yy = static_cast<int64_t>(txy.div) * g.p + y;
          const int64_t xx = static_cast<int64_t>(txy.mod) * g.p + x0;
          In in[V];
          if constexpr (CL) {
#pragma unroll
            for (int k = 0; k < V; ++k) in[k] = from[(yy * g.W + xx + k) * g.C + c];
          } else {
            const auto v = *reinterpret_cast<const Vec<In, V>*>(from + (c * g.H + yy) * g.W + xx);
#pragma unroll
            for (int k = 0; k < V; ++k) in[k] = v.v[k];
          }
          Acc m, s;
          if (big_stats != nullptr) {
            m = big_stats[c];
            s = big_stats[g.C + c];
          } else {
            // An unrolled select, not stats.mean[c]: a kernel argument indexed at run time is copied to a local
            // stack frame first (ptxas showed 128 bytes of stack per thread).
            m = stats.mean[0];
            s = stats.std[0];
#pragma unroll
            for (int k = 1; k < kTokensMaxChannels; ++k) {
              m = c == static_cast<uint32_t>(k) ? stats.mean[k] : m;
              s = c == static_cast<uint32_t>(k) ? stats.std[k] : s;
            }
          }
#pragma unroll
          for (int k = 0; k < V; ++k) {
            val[u][k] = normalise<Acc, std::is_same_v<In, uint8_t>>(static_cast<Acc>(in[k]), m, s);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (outs[u] < image_vecs) {
          Out w[V];
#pragma unroll
          for (int k = 0; k < V; ++k) w[k] = static_cast<Out>(val[u][k]);
          store_vec<Out, V>(to + static_cast<int64_t>(outs[u]) * V, w);
        }
      }
    }
    if (fused) __syncthreads();  // the next image's check overwrites tiles and seen
  }
}

// channels_last (NHWC) with CC channels: work item j of an image is (token i, tile row y, segment s of V pixels); its
// V * CC source elements are one contiguous run (16 bytes per channel: the host checked that W * CC and the source
// pointer keep every run 16-byte aligned), loaded as CC 16-byte vectors and de-interleaved in registers (element
// k * CC + c is pixel k of channel c). Channel c's V results go to token row (i, c, y), elements s * V .. s * V + V - 1.
// Blocks per SM the register budget is cut for: 3 (at most 85 registers) holds uint8 -> float32 with C = 3 (75, no
// spill; 83 and 2 blocks uncapped); 64 results a thread (uint8, C = 4) or a float64 accumulator spilled at 3, so
// those keep 2.
template <typename Acc, int V, int CC>
constexpr int cl_min_blocks() {
  return sizeof(Acc) == 4 && CC * V <= 48 ? 3 : 2;
}

template <typename In, typename Out, typename Acc, int V, int CC>
__global__ void __launch_bounds__(kThreads, cl_min_blocks<Acc, V, CC>())
    patch_tokens_cl_kernel(const In* __restrict__ src, Out* __restrict__ dst, const int64_t* __restrict__ perm,
                           TokenGeometry g, at::cuda::detail::IntDivider<uint32_t> segs,
                           at::cuda::detail::IntDivider<uint32_t> p_div, at::cuda::detail::IntDivider<uint32_t> tx_div,
                           TokenStats<Acc> stats, int64_t images, uint32_t image_items, bool fused) {
  constexpr int kLoad = 16 / static_cast<int>(sizeof(In));  // elements per 16-byte load
  constexpr int kRun = V * CC;
  static_assert(kRun % kLoad == 0, "a run is whole 16-byte vectors");
  extern __shared__ int32_t shared[];
  const int n = static_cast<int>(g.N);
  int32_t* tiles = shared;
  uint32_t* seen = reinterpret_cast<uint32_t*>(shared + n);
  const int64_t image_in = CC * g.H * g.W;
  const int64_t image_out = g.N * CC * g.p * g.p;
  const int64_t plane = g.p * g.p;
  for (int64_t img = blockIdx.y; img < images; img += gridDim.y) {
    const int64_t* row = image_key(perm, img, g.N, fused, tiles, seen);
    const In* from = src + img * image_in;
    Out* to = dst + img * image_out;
    for (uint32_t j = blockIdx.x * kThreads + threadIdx.x; j < image_items; j += gridDim.x * kThreads) {
      const auto rs = segs.divmod(j);        // (token * p + y, segment)
      const auto iy = p_div.divmod(rs.div);  // (token, y)
      const uint32_t i = iy.div, y = iy.mod, x0 = rs.mod * V;
      uint32_t t = i;
      if (row != nullptr) {
        t = fused ? static_cast<uint32_t>(tiles[i]) : static_cast<uint32_t>(clamp_tile<int64_t>(__ldg(row + i), g.N));
      }
      const auto txy = tx_div.divmod(t);  // (ty, tx)
      const int64_t yy = static_cast<int64_t>(txy.div) * g.p + y;
      const int64_t xx = static_cast<int64_t>(txy.mod) * g.p + x0;
      const auto* run = reinterpret_cast<const Vec<In, kLoad>*>(from + (yy * g.W + xx) * CC);
      In in[kRun];
#pragma unroll
      for (int q = 0; q < kRun / kLoad; ++q) {
        const Vec<In, kLoad> v = run[q];
#pragma unroll
        for (int k = 0; k < kLoad; ++k) in[q * kLoad + k] = v.v[k];
      }
      Out* out = to + static_cast<int64_t>(i) * CC * plane + static_cast<int64_t>(y) * g.p + x0;
#pragma unroll
      for (int c = 0; c < CC; ++c) {
        Out w[V];
#pragma unroll
        for (int k = 0; k < V; ++k) {
          w[k] = static_cast<Out>(
              normalise<Acc, std::is_same_v<In, uint8_t>>(static_cast<Acc>(in[k * CC + c]), stats.mean[c], stats.std[c]));
        }
        store_vec<Out, V>(out + c * plane, w);
      }
    }
    if (fused) __syncthreads();  // the next image's check overwrites tiles and seen
  }
}

// `chunk`: items one block handles per pass over its image.
dim3 token_grid(int64_t images, int64_t image_vecs, int sms, int64_t chunk) {
  const int64_t chunks = (image_vecs + chunk - 1) / chunk;
  const int64_t target = static_cast<int64_t>(sms) * (2048 / kThreads) * kWaves;
  const int64_t per_image = std::max<int64_t>(1, (target + images - 1) / images);
  return dim3(static_cast<unsigned>(std::min(chunks, per_image)), static_cast<unsigned>(std::min<int64_t>(images, 65535)));
}

struct Launch {
  const at::Tensor& src;
  at::Tensor& out;
  const int64_t* perm;
  TokenGeometry g;
  c10::OptionalArrayRef<double> mean, std;
  bool cl;
};

template <typename In, typename Out, typename Acc, int V, bool CL>
void launch_v(const Launch& l) {
  const int64_t B = l.src.size(0);
  const int64_t image_vecs = l.g.N * l.g.C * l.g.p * l.g.p / V;
  const bool fused = l.perm != nullptr && l.g.N <= kMaxFusedTiles;
  const size_t shared = fused ? static_cast<size_t>(l.g.N + (l.g.N + 31) / 32) * sizeof(int32_t) : 0;
  const TokenStats<Acc> stats = make_token_stats<Acc>(l.mean, l.std, l.g.C);
  at::Tensor big;  // more channels than a kernel argument holds: a small device buffer (a copy queued on the stream)
  if (l.g.C > kTokensMaxChannels) {
    std::vector<double> host(static_cast<size_t>(2 * l.g.C));
    for (int64_t c = 0; c < l.g.C; ++c) {
      host[c] = static_cast<double>(token_stat<Acc>(l.mean, c, 0.0));
      host[l.g.C + c] = static_cast<double>(token_stat<Acc>(l.std, c, 1.0));
    }
    big = at::tensor(host, at::TensorOptions().dtype(at::kDouble))
              .to(l.src.device(), c10::CppTypeToScalarType<Acc>::value, /*non_blocking=*/true);
  }
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  patch_tokens_kernel<In, Out, Acc, V, CL><<<token_grid(B, image_vecs, sms, static_cast<int64_t>(kThreads) * kUnroll), kThreads, shared,
                                             at::cuda::getCurrentCUDAStream()>>>(
      l.src.const_data_ptr<In>(), l.out.mutable_data_ptr<Out>(), l.perm, l.g, TokenDividers(l.g), stats,
      big.defined() ? big.const_data_ptr<Acc>() : nullptr, B, static_cast<uint32_t>(image_vecs), fused);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename In, typename Out, typename Acc, int CC>
void launch_cl(const Launch& l) {
  constexpr int V = 16 / static_cast<int>(sizeof(In));
  const int64_t B = l.src.size(0);
  const int64_t image_items = l.g.N * l.g.p * (l.g.p / V);
  const bool fused = l.perm != nullptr && l.g.N <= kMaxFusedTiles;
  const size_t shared = fused ? static_cast<size_t>(l.g.N + (l.g.N + 31) / 32) * sizeof(int32_t) : 0;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  using Div = at::cuda::detail::IntDivider<uint32_t>;
  patch_tokens_cl_kernel<In, Out, Acc, V, CC><<<token_grid(B, image_items, sms, kThreads), kThreads, shared,
                                                at::cuda::getCurrentCUDAStream()>>>(
      l.src.const_data_ptr<In>(), l.out.mutable_data_ptr<Out>(), l.perm, l.g, Div(l.g.p / V), Div(l.g.p),
      Div(l.g.tiles_x), make_token_stats<Acc>(l.mean, l.std, l.g.C), B, static_cast<uint32_t>(image_items), fused);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Widest V (<= 16 bytes of In, dividing p) whose loads are aligned: W and the source pointer both multiples of V
// elements (so every tile row start is); the output's token rows are multiples of V elements from its start, which
// must be 16-byte aligned (a fresh output is; an `out=` view at an odd offset takes the scalar path).
// channels_last: the vector path when C is 3 or 4, V = 16 bytes of In divides p, and rows of W * C elements and the
// source pointer are 16-byte aligned (so every run starts on a 16-byte boundary); otherwise element by element.
template <typename In, typename Out, typename Acc>
void launch_typed(const Launch& l) {
  constexpr int kMax = 16 / static_cast<int>(sizeof(In));
  const auto addr = reinterpret_cast<uintptr_t>(l.src.const_data_ptr());
  const bool out_aligned = reinterpret_cast<uintptr_t>(l.out.const_data_ptr()) % 16 == 0;
  if (l.cl) {
    const bool cl_fits = out_aligned && l.g.p % kMax == 0 && (l.g.W * l.g.C * sizeof(In)) % 16 == 0 && addr % 16 == 0;
    if (cl_fits && l.g.C == 3) return launch_cl<In, Out, Acc, 3>(l);
    if (cl_fits && l.g.C == 4) return launch_cl<In, Out, Acc, 4>(l);
    return launch_v<In, Out, Acc, 1, true>(l);
  }
  auto fits = [&](int v) {
    return out_aligned && l.g.p % v == 0 && l.g.W % v == 0 && addr % (static_cast<uintptr_t>(v) * sizeof(In)) == 0;
  };
  if constexpr (kMax >= 16) {
    if (fits(16)) return launch_v<In, Out, Acc, 16, false>(l);
  }
  if constexpr (kMax >= 8) {
    if (fits(8)) return launch_v<In, Out, Acc, 8, false>(l);
  }
  if constexpr (kMax >= 4) {
    if (fits(4)) return launch_v<In, Out, Acc, 4, false>(l);
  }
  if (fits(2)) return launch_v<In, Out, Acc, 2, false>(l);
  launch_v<In, Out, Acc, 1, false>(l);
}

void fill_tokens_cuda(const at::Tensor& images, const std::optional<at::Tensor>& perm, int64_t patch_size,
                      c10::OptionalArrayRef<double> mean, c10::OptionalArrayRef<double> std, at::ScalarType dtype,
                      at::Tensor& out, int64_t N) {
  if (out.numel() == 0) return;
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  TORCH_CHECK_VALUE(C * H * W < (int64_t{1} << 31), "ppml.patch_tokens: one image must hold fewer than 2^31 "
                    "elements on CUDA, got ", describe(images));
  const bool cl = use_channels_last(images);
  const at::Tensor src = images.contiguous(working_format(cl));
  at::Tensor perm_c;
  if (perm.has_value()) {
    perm_c = perm->contiguous();
    if (N > kMaxFusedTiles) {  // the kernel checks shorter keys itself
      auto seen = at::zeros({B, N}, perm_c.options().dtype(at::kInt));
      const int64_t blocks = std::min<int64_t>((B * N + kThreads - 1) / kThreads, 65535);
      check_token_perm_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          perm_c.const_data_ptr<int64_t>(), seen.mutable_data_ptr<int32_t>(), B, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  const Launch l{src, out, perm.has_value() ? perm_c.const_data_ptr<int64_t>() : nullptr,
                 TokenGeometry{C, H, W, patch_size, W / patch_size, N}, mean, std, cl};
  AT_DISPATCH_SWITCH(images.scalar_type(), "ppml.patch_tokens",
    AT_DISPATCH_CASE(at::kByte, [&] {
      using In = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ppml.patch_tokens", [&] {
        if constexpr (std::is_same_v<scalar_t, double>) launch_typed<In, scalar_t, double>(l);
        else launch_typed<In, scalar_t, float>(l);
      });
    })
    AT_DISPATCH_CASE_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, [&] {
      using In = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ppml.patch_tokens", [&] {
        if constexpr (std::is_same_v<scalar_t, double> || std::is_same_v<In, double>) {
          launch_typed<In, scalar_t, double>(l);
        } else {
          launch_typed<In, scalar_t, float>(l);
        }
      });
    }));
}

at::Tensor patch_tokens_cuda(const at::Tensor& images, const std::optional<at::Tensor>& perm, int64_t patch_size,
                             std::optional<at::ArrayRef<double>> mean_arg, std::optional<at::ArrayRef<double>> std_arg,
                             at::ScalarType dtype) {
  const c10::OptionalArrayRef<double> mean(mean_arg), std(std_arg);
  const int64_t N = check_patch_tokens_args(images, perm, patch_size, mean, std, dtype);
  const c10::cuda::CUDAGuard guard(images.device());
  at::Tensor out = at::empty({images.size(0), N, images.size(1) * patch_size * patch_size},
                             images.options().dtype(dtype));
  fill_tokens_cuda(images, perm, patch_size, mean, std, dtype, out, N);
  return out;
}

void patch_tokens_out_cuda(const at::Tensor& images, const std::optional<at::Tensor>& perm, int64_t patch_size,
                           std::optional<at::ArrayRef<double>> mean_arg, std::optional<at::ArrayRef<double>> std_arg,
                           at::ScalarType dtype, at::Tensor& out) {
  const c10::OptionalArrayRef<double> mean(mean_arg), std(std_arg);
  const int64_t N = check_patch_tokens_args(images, perm, patch_size, mean, std, dtype);
  const c10::cuda::CUDAGuard guard(images.device());
  check_tokens_out(out, images, N, patch_size, dtype);
  fill_tokens_cuda(images, perm, patch_size, mean, std, dtype, out, N);
}

}  // namespace

TORCH_LIBRARY_IMPL(ppml, CUDA, m) {
  m.impl("patch_tokens", &patch_tokens_cuda);
  m.impl("patch_tokens.out", &patch_tokens_out_cuda);
}

}  // namespace ppml::ops
