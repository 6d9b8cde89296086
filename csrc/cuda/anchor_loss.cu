// CUDA kernel of ppml::anchor_loss: the CPU kernel's algorithm (csrc/cpu/anchor_loss.cpp) with cuBLAS for the two
// GEMMs of each chunk of rows and one thread block per row for the row passes.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "common/anchor_loss.h"
#include "common/device_assert.h"

namespace ppml::ops {
namespace {

constexpr int kThreads = 256;

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

// One block per row of the chunk: logits from the dot products in z (in place), log-sum-exp and loss, then the
// gradient coefficients w_c in place of the logits and their row sum.
template <typename acc_t>
__global__ void anchor_rows_kernel(const acc_t* __restrict__ f, const acc_t* __restrict__ a,
                                   const acc_t* __restrict__ anorm, const int64_t* __restrict__ y,
                                   acc_t* __restrict__ z, acc_t* __restrict__ loss, acc_t* __restrict__ wsum,
                                   int64_t r0, int64_t C, int64_t D, int metric, acc_t gamma) {
  __shared__ acc_t shared[kThreads / 32];
  const int64_t i = blockIdx.x, row = r0 + i, lab = checked_label(y, row, C);
  const acc_t* fr = f + row * D;
  acc_t* zr = z + i * C;
  acc_t fn2 = 0, dy2 = 0;
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
    const acc_t d = fr[k] - a[lab * D + k];
    fn2 += fr[k] * fr[k];
    dy2 += d * d;
  }
  fn2 = block_reduce<acc_t, false>(fn2, shared);
  dy2 = block_reduce<acc_t, false>(dy2, shared);
  const acc_t eps2 = static_cast<acc_t>(kDist2Eps);
  if (metric == static_cast<int>(Metric::Cosine)) {
    const acc_t s = gamma / fmax(sqrt(fn2), static_cast<acc_t>(kCosEps));
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) zr[c] *= s * anorm[c];
  } else if (metric == static_cast<int>(Metric::SqEuclidean)) {
    // u_c = γ f·a_c − (γ/2)‖a_c‖²: the ‖f‖² row constant cancels exactly (see csrc/cpu/anchor_loss.cpp)
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) zr[c] = gamma * zr[c] - acc_t(0.5) * gamma * anorm[c];
  } else {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      // the true class from the difference vector: the expanded form cancels badly near the anchor
      const acc_t d2 = c == lab ? dy2 : fmax(fn2 - 2 * zr[c] + anorm[c], acc_t(0));
      zr[c] = -gamma * sqrt(fmax(d2, eps2));
    }
  }
  __syncthreads();
  acc_t m = -INFINITY;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) m = fmax(m, zr[c]);
  m = block_reduce<acc_t, true>(m, shared);
  acc_t s = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += exp(zr[c] - m);
  s = block_reduce<acc_t, false>(s, shared);
  const acc_t lse = m + log(s);
  const acc_t zy = zr[lab];
  __syncthreads();  // every thread has read zr[lab] before it is overwritten
  if (threadIdx.x == 0) loss[row] = lse - zy;
  acc_t ws = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t dz = exp(zr[c] - lse) - (c == lab ? acc_t(1) : acc_t(0));
    acc_t w;
    if (metric == static_cast<int>(Metric::SqEuclidean)) {
      w = -gamma * dz;
    } else if (metric == static_cast<int>(Metric::Euclidean)) {
      const acc_t d = -zr[c] / gamma;
      w = d * d > eps2 ? -gamma * dz / d : acc_t(0);
    } else {
      w = gamma * dz * anorm[c];
    }
    zr[c] = w;
    ws += w;
  }
  ws = block_reduce<acc_t, false>(ws, shared);
  // Σ_c w_c is 0 in exact arithmetic for the squared metric: use the exact value
  if (threadIdx.x == 0) wsum[i] = metric == static_cast<int>(Metric::SqEuclidean) ? acc_t(0) : ws;
}

// One block per row: the per-row gradient terms on top of w·A (already in g), and the pull part of the loss.
template <typename acc_t>
__global__ void anchor_finish_kernel(const acc_t* __restrict__ f, const acc_t* __restrict__ a,
                                     const acc_t* __restrict__ anorm, const int64_t* __restrict__ y,
                                     const acc_t* __restrict__ wsum, acc_t* __restrict__ g, acc_t* __restrict__ loss,
                                     int64_t r0, int64_t C, int64_t D, int metric, acc_t pull, bool softmax) {
  __shared__ acc_t shared[kThreads / 32];
  const int64_t i = blockIdx.x, row = r0 + i, lab = checked_label(y, row, C);
  const acc_t* fr = f + row * D;
  const acc_t* ay = a + lab * D;
  acc_t* gr = g + i * D;
  acc_t base = softmax ? loss[row] : acc_t(0);
  if (metric != static_cast<int>(Metric::Cosine)) {
    acc_t dy2 = 0;
    for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
      const acc_t diff = fr[k] - ay[k];
      dy2 += diff * diff;
      gr[k] = fr[k] * wsum[i] - gr[k] + pull * diff;
    }
    dy2 = block_reduce<acc_t, false>(dy2, shared);
    if (threadIdx.x == 0) loss[row] = base + pull * acc_t(0.5) * dy2;
    return;
  }
  acc_t fn2 = 0;
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) fn2 += fr[k] * fr[k];
  fn2 = block_reduce<acc_t, false>(fn2, shared);
  const acc_t fn = sqrt(fn2), fden = fmax(fn, static_cast<acc_t>(kCosEps));
  acc_t cos_y = 0, radial = 0;
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
    const acc_t ahat = ay[k] * anorm[lab];
    cos_y += fr[k] / fden * ahat;
    gr[k] -= pull * ahat;
    radial += gr[k] * fr[k] / fden;
  }
  cos_y = block_reduce<acc_t, false>(cos_y, shared);
  radial = block_reduce<acc_t, false>(radial, shared);
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) {
    gr[k] = fn > static_cast<acc_t>(kCosEps) ? (gr[k] - radial * fr[k] / fden) / fden
                                             : gr[k] / static_cast<acc_t>(kCosEps);
  }
  if (threadIdx.x == 0) loss[row] = base + pull * (acc_t(1) - cos_y);
}

template <typename acc_t>
void run(const at::Tensor& F, const at::Tensor& A, const at::Tensor& y, Metric metric, acc_t gamma, acc_t pull,
         bool softmax, at::Tensor& loss, at::Tensor& grad) {
  const int64_t B = F.size(0), D = F.size(1), C = A.size(0);
  const bool cosine = metric == Metric::Cosine;
  // C values: squared norms (Euclidean) or inverse norms (cosine)
  at::Tensor anorm = (A * A).sum(1);
  if (cosine) anorm = anorm.sqrt().clamp_min(kCosEps).reciprocal();
  anorm = anorm.contiguous();
  const int64_t chunk = anchor_chunk_rows(B, C, softmax);
  at::Tensor buf = softmax ? at::empty({chunk, C}, F.options()) : at::Tensor();
  at::Tensor wsum = at::zeros({chunk}, F.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t r0 = 0; r0 < B; r0 += chunk) {
    const int64_t n = std::min(chunk, B - r0);
    at::Tensor Gc = grad.narrow(0, r0, n);
    if (softmax) {
      at::Tensor Z = buf.narrow(0, 0, n);
      at::mm_out(Z, F.narrow(0, r0, n), A.t());
      anchor_rows_kernel<acc_t><<<n, kThreads, 0, stream>>>(
          F.const_data_ptr<acc_t>(), A.const_data_ptr<acc_t>(), anorm.const_data_ptr<acc_t>(),
          y.const_data_ptr<int64_t>(), Z.mutable_data_ptr<acc_t>(), loss.mutable_data_ptr<acc_t>(),
          wsum.mutable_data_ptr<acc_t>(), r0, C, D, static_cast<int>(metric), gamma);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::mm_out(Gc, Z, A);
    } else {
      Gc.zero_();
    }
    anchor_finish_kernel<acc_t><<<n, kThreads, 0, stream>>>(
        F.const_data_ptr<acc_t>(), A.const_data_ptr<acc_t>(), anorm.const_data_ptr<acc_t>(), y.const_data_ptr<int64_t>(),
        wsum.const_data_ptr<acc_t>(), Gc.mutable_data_ptr<acc_t>(), loss.mutable_data_ptr<acc_t>(), r0, C, D,
        static_cast<int>(metric), pull, softmax);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> anchor_loss_cuda(const at::Tensor& features, const at::Tensor& anchors,
                                                    const at::Tensor& labels, c10::string_view metric, double scale,
                                                    double pull, bool softmax) {
  check_anchor_args(features, anchors, labels, scale, pull, softmax);
  const c10::cuda::CUDAGuard guard(features.device());
  const Metric m = parse_metric(std::string_view(metric.data(), metric.size()));
  const int64_t B = features.size(0);
  const at::Tensor y = labels.contiguous();
  // Labels are checked in the kernels (checked_label), never with a synchronising read here.
  const auto acc = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor F = features.to(acc).contiguous();
  const at::Tensor A = anchors.to(acc).contiguous();
  at::Tensor loss = at::empty({B}, F.options());
  at::Tensor grad = at::empty({B, features.size(1)}, F.options());
  if (B > 0) {
    if (acc == at::kDouble) {
      run<double>(F, A, y, m, scale, pull, softmax, loss, grad);
    } else {
      run<float>(F, A, y, m, static_cast<float>(scale), static_cast<float>(pull), softmax, loss, grad);
    }
  }
  return {loss, grad.to(features.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ppml, CUDA, m) {
  m.impl("anchor_loss", &anchor_loss_cuda);
}

}  // namespace ppml::ops
