// CUDA kernel of ppml::anchor_loss: the CPU kernel's algorithm (csrc/cpu/anchor_loss.cpp), with both GEMMs of each
// chunk of rows on tensor cores and everything between them fused into one kernel.
//
// Per chunk of rows (anchor_chunk_rows bounds the [rows, C] buffer):
//   1. Z = F·Aᵀ through ATen/cuBLAS. bf16/fp16 features: a bf16/fp16 GEMM with fp32 accumulation and an fp32 result
//      (aten::mm.dtype), anchors rounded once to the features' dtype. fp32 features: at::mm, which is TF32 exactly when
//      torch.mm would be (allow_tf32 / float32_matmul_precision) and exact fp32 otherwise. float64 stays float64.
//   2. anchor_epilogue_kernel, one block per row: the logits from Z and the row's exact terms, an online log-sum-exp in
//      one read of the row, the loss, then one more read of the row that writes the gradient coefficients W over Z
//      in the GEMM's input dtype (so that the second GEMM runs on tensor cores too).
//   3. G = W·A through cuBLAS (fp32 result).
//   4. anchor_finish_kernel, one block per row: the per-row gradient terms and the pull, written in the features'
//      dtype (no separate cast of the gradient).
// The terms that cancel badly — ‖f − a_y‖² from the difference vector, ‖a_c‖², ‖f‖², the pull — are computed in fp32
// (float64 for float64 features) from the unrounded features and anchors, as the reference does.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "common/anchor_loss.h"
#include "common/device_assert.h"

namespace ppml::ops {
namespace {

constexpr int kThreads = 256;
// The row passes of the epilogue: elements per thread per tile, and resident blocks per SM the register budget keeps
// (4 × 256 threads: at most 64 registers a thread).
constexpr int kUnroll = 4;
constexpr int kMinBlocks = 4;

// Sum (or max) over the block; every thread gets the result. `shared` holds one value per warp.
template <typename T, bool Max>
__device__ T block_reduce(T v, T* shared) {
  for (int o = 16; o > 0; o >>= 1) {
    const T other = __shfl_xor_sync(0xffffffff, v, o);
    v = Max ? (other > v ? other : v) : v + other;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `shared` may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T r = shared[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) r = Max ? (shared[w] > r ? shared[w] : r) : r + shared[w];
  return r;
}

// The label of `row`, checked on the device: a label outside [0, C) stops the stream with a device-side assert (no
// host round trip per call, as in torch's index ops), and is clamped so that it can never index outside the anchors.
__device__ __forceinline__ int64_t checked_label(const int64_t* __restrict__ y, int64_t row, int64_t C) {
  const int64_t lab = y[row];
  CUDA_KERNEL_ASSERT_MSG(lab >= 0 && lab < C, "ppml.anchor_loss: labels must lie in [0, C)");
  return lab < 0 ? 0 : (lab >= C ? C - 1 : lab);
}

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T v) {
  return static_cast<acc_t>(v);
}

// Squared norms ‖a_c‖² (Euclidean metrics) or inverse norms 1/max(‖a_c‖, ε) (cosine) of the unrounded anchors: one
// warp per anchor, so one launch however large C is.
template <typename acc_t, typename anc_t>
__global__ void __launch_bounds__(kThreads)
    anchor_norms_kernel(const anc_t* __restrict__ a, acc_t* __restrict__ anorm, int64_t C, int64_t D, bool inverse) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (c >= C) return;  // the whole warp leaves together
  const int lane = threadIdx.x % 32;
  acc_t s = 0;
  for (int64_t k = lane; k < D; k += 32) {
    const acc_t v = to_acc<acc_t>(a[c * D + k]);
    s += v * v;
  }
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
  if (lane == 0) anorm[c] = inverse ? acc_t(1) / fmax(sqrt(s), static_cast<acc_t>(kCosEps)) : s;
}

// The logit u_c from the dot product zc = f·a_c and the row's exact terms (the same formulas as the CPU softmax_row):
// squared, u = γ f·a_c − (γ/2)‖a_c‖² (the ‖f‖² row constant cancels exactly); Euclidean, u = −γ·max(d, √ε) with the
// true class's distance from the difference vector (the expanded form cancels badly near the anchor); cosine,
// u = zc·γ/(max(‖f‖, ε)·max(‖a_c‖, ε)).
template <typename acc_t>
__device__ __forceinline__ acc_t anchor_logit(int metric, acc_t zc, acc_t an, bool is_label, acc_t gamma, acc_t fn2,
                                              acc_t row_scale, acc_t true_logit) {
  if (metric == static_cast<int>(Metric::SqEuclidean)) return gamma * zc - acc_t(0.5) * gamma * an;
  if (metric == static_cast<int>(Metric::Cosine)) return zc * (row_scale * an);
  if (is_label) return true_logit;
  const acc_t d2 = fmax(fn2 - acc_t(2) * zc + an, acc_t(0));
  return -gamma * sqrt(fmax(d2, static_cast<acc_t>(kDist2Eps)));
}

// One block per row of the chunk. On entry z holds the fp32 (float64) dot products f·a_c; on exit loss[row] = lse −
// u_y and the row's first C elements *of type in_t* hold the gradient coefficients w_c (see ppml/ops/anchor_loss.py::
// loss_and_grad), with the row pitch of z unchanged; wsum[i] = Σ_c w_c as rounded (0 for the squared metric, exact).
// The row is read twice: once for an online max/sum of exponentials (merged across threads), once to write W.
template <typename acc_t, typename in_t, typename anc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    anchor_epilogue_kernel(const in_t* __restrict__ f, const anc_t* __restrict__ a, const acc_t* __restrict__ anorm,
                           const int64_t* __restrict__ y, acc_t* z, acc_t* __restrict__ loss,
                           acc_t* __restrict__ wsum, int64_t r0, int64_t C, int64_t D, int metric, acc_t gamma) {
  __shared__ acc_t shared[kThreads / 32];
  const int64_t i = blockIdx.x, row = r0 + i, lab = checked_label(y, row, C);
  const bool sq = metric == static_cast<int>(Metric::SqEuclidean);
  acc_t fn2 = 0, dy2 = 0;
  if (!sq) {  // the squared metric needs neither
    const in_t* fr = f + row * D;
    const anc_t* ay = a + lab * D;
    for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
      const acc_t fk = to_acc<acc_t>(fr[k]);
      const acc_t d = fk - to_acc<acc_t>(ay[k]);
      fn2 += fk * fk;
      dy2 += d * d;
    }
    fn2 = block_reduce<acc_t, false>(fn2, shared);
    dy2 = block_reduce<acc_t, false>(dy2, shared);
  }
  const acc_t eps2 = static_cast<acc_t>(kDist2Eps);
  const acc_t row_scale = gamma / fmax(sqrt(fn2), static_cast<acc_t>(kCosEps));
  const acc_t true_logit = -gamma * sqrt(fmax(dy2, eps2));
  const acc_t* zr = z + i * C;
  in_t* wr = reinterpret_cast<in_t*>(z + i * C);

  // Pass 1: per-thread online (max, Σ exp(u − max)), one exp per logit, then merged over the block. Tiles of kUnroll
  // strided elements per thread: kUnroll independent loads in flight each, which the bandwidth needs (Little's law:
  // ~20 KiB in flight per SM on an H200; 1024 resident threads × 4 × 4 B of z is 16 KiB, plus the norms).
  acc_t m = -INFINITY, s = 0;
  for (int64_t base = 0; base < C; base += kUnroll * static_cast<int64_t>(blockDim.x)) {
    acc_t u[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t c = base + j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      u[j] = c < C ? anchor_logit(metric, zr[c], anorm[c], c == lab, gamma, fn2, row_scale, true_logit) : -INFINITY;
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      if (u[j] > m) {
        s = s * exp(m - u[j]) + acc_t(1);
        m = u[j];
      } else if (u[j] != -INFINITY) {
        s += exp(u[j] - m);
      }
    }
  }
  const acc_t mx = block_reduce<acc_t, true>(m, shared);
  // u_y is read by every thread before the reduction below, whose barriers order it before any write of W
  const acc_t uy = anchor_logit(metric, zr[lab], anorm[lab], true, gamma, fn2, row_scale, true_logit);
  const acc_t sum = block_reduce<acc_t, false>(m == -INFINITY ? acc_t(0) : s * exp(m - mx), shared);
  const acc_t lse = mx + log(sum);
  if (threadIdx.x == 0) loss[row] = lse - uy;

  // Pass 2: w_c from softmax − one-hot, written over the row, in the same tiles. A uniform trip count, so that every
  // thread reaches the barrier: when in_t is narrower than acc_t, W's element c lies in z's element c/2, which
  // another thread may not have read yet — but only within the current tile or an earlier one (c/2 < c), so one
  // barrier between the tile's reads and its writes suffices.
  acc_t ws = 0;
  for (int64_t base = 0; base < C; base += kUnroll * static_cast<int64_t>(blockDim.x)) {
    acc_t w[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t c = base + j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      w[j] = 0;
      if (c < C) {
        const acc_t u = anchor_logit(metric, zr[c], anorm[c], c == lab, gamma, fn2, row_scale, true_logit);
        const acc_t dz = exp(u - lse) - (c == lab ? acc_t(1) : acc_t(0));
        if (sq) {
          w[j] = -gamma * dz;
        } else if (metric == static_cast<int>(Metric::Euclidean)) {
          const acc_t d = -u / gamma;  // the floored distance
          w[j] = d * d > eps2 ? -gamma * dz / d : acc_t(0);
        } else {
          w[j] = gamma * dz * anorm[c];
        }
      }
    }
    if constexpr (sizeof(in_t) < sizeof(acc_t)) __syncthreads();
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t c = base + j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      if (c < C) {
        const in_t wq = static_cast<in_t>(w[j]);
        wr[c] = wq;
        ws += to_acc<acc_t>(wq);  // the sum of what the GEMM multiplies: f·Σw − W·A then cancels consistently
      }
    }
  }
  ws = block_reduce<acc_t, false>(ws, shared);
  // Σ_c w_c is 0 in exact arithmetic for the squared metric: use the exact value
  if (threadIdx.x == 0) wsum[i] = sq ? acc_t(0) : ws;
}

// One block per row: the per-row gradient terms on top of w·A (gin, chunk-local rows; null without softmax) and the
// pull part of the loss, written to gout (the [B, D] gradient, in the features' dtype). gin may alias gout's rows
// (fp32 and float64 features): each element is read before it is written, by the same thread.
template <typename acc_t, typename in_t, typename anc_t>
__global__ void __launch_bounds__(kThreads)
    anchor_finish_kernel(const in_t* __restrict__ f, const anc_t* __restrict__ a, const acc_t* __restrict__ anorm,
                         const int64_t* __restrict__ y, const acc_t* __restrict__ wsum, const acc_t* gin, in_t* gout,
                         acc_t* __restrict__ loss, int64_t r0, int64_t C, int64_t D, int metric, acc_t pull,
                         bool softmax) {
  __shared__ acc_t shared[kThreads / 32];
  const int64_t i = blockIdx.x, row = r0 + i, lab = checked_label(y, row, C);
  const in_t* fr = f + row * D;
  const anc_t* ay = a + lab * D;
  const acc_t* gr = gin ? gin + i * D : nullptr;
  in_t* go = gout + row * D;
  const acc_t base = softmax ? loss[row] : acc_t(0);  // only thread 0 uses it, and only thread 0 writes loss[row]
  if (metric != static_cast<int>(Metric::Cosine)) {
    // dF = f·Σw − w·A + pull·(f − a_y); loss += pull·½‖f − a_y‖²
    const acc_t ws = wsum ? wsum[i] : acc_t(0);
    acc_t dy2 = 0;
    for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
      const acc_t fk = to_acc<acc_t>(fr[k]);
      const acc_t diff = fk - to_acc<acc_t>(ay[k]);
      dy2 += diff * diff;
      go[k] = static_cast<in_t>(fk * ws - (gr ? gr[k] : acc_t(0)) + pull * diff);
    }
    dy2 = block_reduce<acc_t, false>(dy2, shared);
    if (threadIdx.x == 0) loss[row] = base + pull * acc_t(0.5) * dy2;
    return;
  }
  // Cosine: with gr holding dF̂ = γ·dz·Â, subtract pull·â_y and project out the radial part: dF = (dF̂ − (dF̂·f̂)f̂)/‖f‖,
  // or dF̂/ε below the norm floor.
  acc_t fn2 = 0;
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
    const acc_t fk = to_acc<acc_t>(fr[k]);
    fn2 += fk * fk;
  }
  fn2 = block_reduce<acc_t, false>(fn2, shared);
  const acc_t fn = sqrt(fn2), fden = fmax(fn, static_cast<acc_t>(kCosEps));
  const acc_t ay_scale = anorm[lab];
  acc_t cos_y = 0, radial = 0;
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
    const acc_t fk = to_acc<acc_t>(fr[k]);
    const acc_t ahat = to_acc<acc_t>(ay[k]) * ay_scale;
    cos_y += fk / fden * ahat;
    radial += ((gr ? gr[k] : acc_t(0)) - pull * ahat) * fk / fden;
  }
  cos_y = block_reduce<acc_t, false>(cos_y, shared);
  radial = block_reduce<acc_t, false>(radial, shared);
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
    const acc_t fk = to_acc<acc_t>(fr[k]);
    const acc_t gk = (gr ? gr[k] : acc_t(0)) - pull * to_acc<acc_t>(ay[k]) * ay_scale;
    go[k] = static_cast<in_t>(fn > static_cast<acc_t>(kCosEps) ? (gk - radial * fk / fden) / fden
                                                                : gk / static_cast<acc_t>(kCosEps));
  }
  if (threadIdx.x == 0) loss[row] = base + pull * (acc_t(1) - cos_y);
}

// F: the features, contiguous, in_t (the GEMM dtype). Ag: the anchors in in_t for the GEMMs. Ae: the unrounded
// anchors (anc_t: acc_t, or in_t when they already come in it) for the exact terms. grad: [B, D] in_t.
template <typename acc_t, typename in_t, typename anc_t>
void run(const AnchorCall& call, const at::Tensor& F, const at::Tensor& Ag, const at::Tensor& Ae, acc_t gamma,
         acc_t pull, bool softmax, at::Tensor& grad) {
  const int64_t B = call.B, D = call.D, C = call.C, chunk = call.chunk;
  const int metric = static_cast<int>(call.metric);
  constexpr bool narrow = !std::is_same_v<in_t, acc_t>;  // bf16/fp16 GEMMs with fp32 results
  const auto acc_opts = F.options().dtype(call.acc);
  auto stream = at::cuda::getCurrentCUDAStream();
  const in_t* f = F.const_data_ptr<in_t>();
  const anc_t* a = Ae.const_data_ptr<anc_t>();
  const int64_t* y = call.labels.const_data_ptr<int64_t>();
  acc_t* loss = call.loss.mutable_data_ptr<acc_t>();

  at::Tensor anorm = at::empty({C}, acc_opts);
  if (softmax || call.metric == Metric::Cosine) {
    const int64_t blocks = (C + kThreads / 32 - 1) / (kThreads / 32);
    anchor_norms_kernel<acc_t, anc_t><<<blocks, kThreads, 0, stream>>>(a, anorm.mutable_data_ptr<acc_t>(), C, D,
                                                                       call.metric == Metric::Cosine);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor buf, wview, wsum, gbuf;
  if (softmax) {
    buf = at::empty({chunk, C}, acc_opts);
    // W over Z: the same bytes seen as in_t, each row keeping Z's pitch (2C elements when in_t is half as wide)
    wview = narrow ? buf.view(F.scalar_type()) : buf;
    wsum = at::empty({chunk}, acc_opts);
    if (narrow) gbuf = at::empty({chunk, D}, acc_opts);  // W·A in fp32 before the cast to the features' dtype
  }
  for (int64_t r0 = 0; r0 < B; r0 += chunk) {
    const int64_t n = std::min(chunk, B - r0);
    const acc_t* gin = nullptr;
    if (softmax) {
      at::Tensor Z = buf.narrow(0, 0, n);
      const at::Tensor Fc = F.narrow(0, r0, n);
      if constexpr (narrow) {
        at::mm_out(Z, Fc, Ag.t(), call.acc);
      } else {
        at::mm_out(Z, Fc, Ag.t());  // TF32 for fp32 exactly when torch.mm would use it
      }
      anchor_epilogue_kernel<acc_t, in_t, anc_t><<<n, kThreads, 0, stream>>>(
          f, a, anorm.const_data_ptr<acc_t>(), y, Z.mutable_data_ptr<acc_t>(), loss, wsum.mutable_data_ptr<acc_t>(),
          r0, C, D, metric, gamma);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor W = wview.narrow(0, 0, n).narrow(1, 0, C);
      at::Tensor Gc = narrow ? gbuf.narrow(0, 0, n) : grad.narrow(0, r0, n);
      if constexpr (narrow) {
        at::mm_out(Gc, W, Ag, call.acc);
      } else {
        at::mm_out(Gc, W, Ag);
      }
      gin = Gc.const_data_ptr<acc_t>();
    }
    anchor_finish_kernel<acc_t, in_t, anc_t><<<n, kThreads, 0, stream>>>(
        f, a, anorm.const_data_ptr<acc_t>(), y, softmax ? wsum.const_data_ptr<acc_t>() : nullptr, gin,
        grad.mutable_data_ptr<in_t>(), loss, r0, C, D, metric, pull, softmax);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename in_t>
void run_half(const AnchorCall& call, const at::Tensor& F, const at::Tensor& Ag, const at::Tensor& Ae, double scale,
              double pull, bool softmax, at::Tensor& grad) {
  const float g = static_cast<float>(scale), p = static_cast<float>(pull);
  if (Ae.scalar_type() == F.scalar_type()) {
    run<float, in_t, in_t>(call, F, Ag, Ae, g, p, softmax, grad);
  } else {
    run<float, in_t, float>(call, F, Ag, Ae, g, p, softmax, grad);
  }
}

std::tuple<at::Tensor, at::Tensor> anchor_loss_cuda(const at::Tensor& features, const at::Tensor& anchors,
                                                    const at::Tensor& labels, c10::string_view metric, double scale,
                                                    double pull, bool softmax) {
  AnchorCall call = anchor_prologue(features, anchors, labels, metric, scale, pull, softmax);
  const c10::cuda::CUDAGuard guard(features.device());
  // Labels are checked in the kernels (checked_label), never with a synchronising read here.
  const auto in_dtype = features.scalar_type();  // the GEMMs run in the features' dtype
  const at::Tensor F = features.contiguous();
  const at::Tensor Ag = anchors.to(in_dtype).contiguous();
  // the exact terms read the anchors unrounded: as they come when already in the features' dtype, else in acc
  const at::Tensor Ae = anchors.scalar_type() == in_dtype ? Ag : anchors.to(call.acc).contiguous();
  at::Tensor grad = at::empty({call.B, call.D}, features.options());
  if (call.B > 0) {
    switch (in_dtype) {
      case at::kDouble:
        run<double, double, double>(call, F, Ag, Ae, scale, pull, softmax, grad);
        break;
      case at::kFloat:
        run<float, float, float>(call, F, Ag, Ae, static_cast<float>(scale), static_cast<float>(pull), softmax, grad);
        break;
      case at::kBFloat16:
        run_half<at::BFloat16>(call, F, Ag, Ae, scale, pull, softmax, grad);
        break;
      default:  // check_anchor_args admits only the four float dtypes
        run_half<at::Half>(call, F, Ag, Ae, scale, pull, softmax, grad);
        break;
    }
  }
  return {call.loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(ppml, CUDA, m) {
  m.impl("anchor_loss", &anchor_loss_cuda);
}

}  // namespace ppml::ops
