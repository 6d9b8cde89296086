// CPU kernel of ppml::anchor_loss: loss and d(loss)/d(features) in one pass over chunks of rows.
//
// Per chunk of rows: one GEMM gives the dot products f·a_c, a row pass turns them into logits, the log-sum-exp and the
// loss, and overwrites them with the coefficients w_c of the gradient, a second GEMM gives w·A straight into the
// gradient rows, and a last row pass adds the per-row terms. The chunk's [rows, C] buffer is reused; its size is
// bounded (csrc/common/anchor_loss.h), so however large B is, the B×C logits never exist at once beyond that budget.
// The row pass is the only work beside the two GEMMs, so it is vectorised (softmax_row) with one exp per logit.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/anchor_loss.h"
#include "cpu/vector_math.h"

namespace ppml::ops {
namespace {

// One row of a chunk. On entry z holds the dot products f·a_c; the row's logits u_c go through a stable log-sum-exp
// (max, then one exp per class kept in e), *loss gets lse − u_y, and z is overwritten with the gradient coefficients
// w_c (see ppml/ops/anchor_loss.py::loss_and_grad), whose sum is returned. Every loop is a `omp simd` loop (the
// reductions included: -fopenmp lets the compiler reorder those sums) and exp_acc inlines, so the AVX2 clone runs
// 8 classes at a time. fn2 = ‖f‖²; true_logit: the Euclidean u_y from the difference vector (unused otherwise).
template <typename acc_t, Metric M>
PPML_CPU_CLONES acc_t softmax_row(acc_t* z, acc_t* e, int64_t C, int64_t lab, acc_t gamma, acc_t fn2, acc_t true_logit,
                                  const acc_t* anorm, acc_t* loss) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  if constexpr (M == Metric::SqEuclidean) {
    // u_c = γ f·a_c − (γ/2)‖a_c‖²: the ‖f‖² row constant cancels exactly in lse − u_y, and keeping it would leave
    // f·(1 − Σp) rounding noise in the gradient (see ppml/reference/anchor_loss.py).
    const acc_t half_gamma = acc_t(0.5) * gamma;
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t u = gamma * z[c] - half_gamma * anorm[c];
      z[c] = u;
      m = u > m ? u : m;
    }
  } else if constexpr (M == Metric::Euclidean) {
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d2 = std::max(fn2 - acc_t(2) * z[c] + anorm[c], acc_t(0));
      const acc_t u = -gamma * std::sqrt(std::max(d2, acc_t(kDist2Eps)));
      z[c] = u;
      m = u > m ? u : m;
    }
    z[lab] = true_logit;
    m = true_logit > m ? true_logit : m;  // m only shifts the exponents: being above the true max by a rounding is fine
  } else {
    const acc_t s = gamma / std::max(std::sqrt(fn2), acc_t(kCosEps));
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t u = z[c] * (s * anorm[c]);
      z[c] = u;
      m = u > m ? u : m;
    }
  }
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < C; ++c) {
    const acc_t ec = exp_acc(z[c] - m);
    e[c] = ec;
    sum += ec;
  }
  *loss = m + std::log(sum) - z[lab];
  const acc_t inv_sum = acc_t(1) / sum;
  acc_t wsum = 0;
#pragma omp simd reduction(+ : wsum)
  for (int64_t c = 0; c < C; ++c) {
    const acc_t dz = e[c] * inv_sum - (c == lab ? acc_t(1) : acc_t(0));  // softmax − one-hot
    acc_t w;
    if constexpr (M == Metric::SqEuclidean) {
      w = -gamma * dz;
    } else if constexpr (M == Metric::Euclidean) {
      const acc_t d = -z[c] / gamma;  // the floored distance
      w = d * d > acc_t(kDist2Eps) ? -gamma * dz / d : acc_t(0);
    } else {
      w = gamma * dz * anorm[c];
    }
    z[c] = w;
    wsum += w;
  }
  return wsum;
}

// Row helpers over D, cloned and `omp simd` for the same reason as softmax_row: a plain `s += x·y` loop is one
// dependent add per element (the compiler may not reorder it), several times slower than the GEMMs' share at D ~ 10³.
template <typename acc_t>
PPML_CPU_CLONES acc_t dot(const acc_t* x, const acc_t* y, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += x[k] * y[k];
  return s;
}

template <typename acc_t>
PPML_CPU_CLONES acc_t squared_distance(const acc_t* x, const acc_t* y, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) {
    const acc_t d = x[k] - y[k];
    s += d * d;
  }
  return s;
}

// Euclidean metrics: g = f·Σw − g (g holding w·A) + pull·(f − a_y); returns ‖f − a_y‖².
template <typename acc_t>
PPML_CPU_CLONES acc_t euclidean_grad_row(const acc_t* fr, const acc_t* ay, acc_t* gr, int64_t D, acc_t wsum,
                                         acc_t pull) {
  acc_t dy2 = 0;
#pragma omp simd reduction(+ : dy2)
  for (int64_t k = 0; k < D; ++k) {
    const acc_t diff = fr[k] - ay[k];
    dy2 += diff * diff;
    gr[k] = fr[k] * wsum - gr[k] + pull * diff;
  }
  return dy2;
}

// Cosine: with g holding dF̂ = γ·dz·Â, subtracts pull·â_y and projects out the radial part: dF = (dF̂ − (dF̂·f̂)f̂)/‖f‖,
// or dF̂/ε below the norm floor. ay_scale = 1/‖a_y‖; returns cos(f, a_y).
template <typename acc_t>
PPML_CPU_CLONES acc_t cosine_grad_row(const acc_t* fr, const acc_t* ay, acc_t ay_scale, acc_t* gr, int64_t D, acc_t fn,
                                      acc_t pull) {
  const acc_t fden = std::max(fn, acc_t(kCosEps));
  acc_t cos_y = 0, radial = 0;
#pragma omp simd reduction(+ : cos_y, radial)
  for (int64_t k = 0; k < D; ++k) {
    const acc_t ahat = ay[k] * ay_scale;
    cos_y += fr[k] / fden * ahat;
    const acc_t gk = gr[k] - pull * ahat;
    gr[k] = gk;
    radial += gk * fr[k] / fden;
  }
  if (fn > acc_t(kCosEps)) {
#pragma omp simd
    for (int64_t k = 0; k < D; ++k) gr[k] = (gr[k] - radial * fr[k] / fden) / fden;
  } else {
#pragma omp simd
    for (int64_t k = 0; k < D; ++k) gr[k] = gr[k] / acc_t(kCosEps);
  }
  return cos_y;
}

template <typename acc_t>
void run(const at::Tensor& F, const at::Tensor& A, const int64_t* y, Metric metric, acc_t gamma, acc_t pull,
         bool softmax, int64_t chunk, at::Tensor& loss, at::Tensor& grad) {
  const int64_t B = F.size(0), D = F.size(1), C = A.size(0);
  const acc_t* f = F.const_data_ptr<acc_t>();
  const acc_t* a = A.const_data_ptr<acc_t>();
  acc_t* L = loss.mutable_data_ptr<acc_t>();
  const bool cosine = metric == Metric::Cosine;

  // Per-anchor squared norms (Euclidean) or inverse norms (cosine): C values, computed once.
  std::vector<acc_t> anorm(static_cast<size_t>(C));
  at::parallel_for(0, C, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const acc_t s = dot(a + c * D, a + c * D, D);
      anorm[c] = cosine ? acc_t(1) / std::max(std::sqrt(s), acc_t(kCosEps)) : s;
    }
  });
  auto fnorm2 = [&](int64_t i) { return dot(f + i * D, f + i * D, D); };

  at::Tensor buf = softmax ? at::empty({chunk, C}, F.options()) : at::Tensor();
  std::vector<acc_t> wsum(static_cast<size_t>(chunk));
  for (int64_t r0 = 0; r0 < B; r0 += chunk) {
    const int64_t n = std::min(chunk, B - r0);
    at::Tensor Gc = grad.narrow(0, r0, n);
    if (softmax) {
      at::Tensor Z = buf.narrow(0, 0, n);
      at::mm_out(Z, F.narrow(0, r0, n), A.t());
      acc_t* z = Z.mutable_data_ptr<acc_t>();
      at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
        std::vector<acc_t> e(static_cast<size_t>(C));  // the row's exponentials
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t row = r0 + i, lab = y[row];
          acc_t* zr = z + i * C;
          const acc_t fn2 = fnorm2(row);
          switch (metric) {
            case Metric::SqEuclidean:
              // Σ_c w_c = −γ Σ_c dz_c is 0 in exact arithmetic for the squared metric: use the exact value.
              softmax_row<acc_t, Metric::SqEuclidean>(zr, e.data(), C, lab, gamma, fn2, 0, anorm.data(), &L[row]);
              wsum[i] = 0;
              break;
            case Metric::Euclidean: {
              // The true class from the difference vector: the expanded form cancels badly near the anchor.
              const acc_t dy2 = squared_distance(f + row * D, a + lab * D, D);
              const acc_t zy = -gamma * std::sqrt(std::max(dy2, acc_t(kDist2Eps)));
              wsum[i] = softmax_row<acc_t, Metric::Euclidean>(zr, e.data(), C, lab, gamma, fn2, zy, anorm.data(),
                                                              &L[row]);
              break;
            }
            case Metric::Cosine:
              wsum[i] = softmax_row<acc_t, Metric::Cosine>(zr, e.data(), C, lab, gamma, fn2, 0, anorm.data(), &L[row]);
              break;
          }
        }
      });
      at::mm_out(Gc, Z, A);  // w·A for the chunk, straight into the gradient rows
    } else {
      Gc.zero_();
      std::fill(wsum.begin(), wsum.begin() + n, acc_t(0));
    }
    acc_t* g = Gc.mutable_data_ptr<acc_t>();
    at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t row = r0 + i, lab = y[row];
        const acc_t* fr = f + row * D;
        const acc_t* ay = a + lab * D;
        acc_t* gr = g + i * D;
        if (!softmax) L[row] = 0;
        if (!cosine) {
          // dF = f·Σw − w·A (+ pull·(f − a_y)); loss += pull·½‖f − a_y‖²
          L[row] += pull * acc_t(0.5) * euclidean_grad_row(fr, ay, gr, D, wsum[i], pull);
        } else {
          L[row] += pull * (acc_t(1) - cosine_grad_row(fr, ay, anorm[lab], gr, D, std::sqrt(fnorm2(row)), pull));
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> anchor_loss_cpu(const at::Tensor& features, const at::Tensor& anchors,
                                                   const at::Tensor& labels, c10::string_view metric, double scale,
                                                   double pull, bool softmax) {
  AnchorCall call = anchor_prologue(features, anchors, labels, metric, scale, pull, softmax);
  const int64_t* yp = call.labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < call.B; ++i) {
    TORCH_CHECK_VALUE(yp[i] >= 0 && yp[i] < call.C, "ppml.anchor_loss: labels must lie in [0, C) with C=", call.C,
                      ", got ", yp[i]);
  }
  const at::Tensor F = features.to(call.acc).contiguous();
  const at::Tensor A = anchors.to(call.acc).contiguous();
  at::Tensor grad = at::empty({call.B, call.D}, F.options());
  if (call.B > 0) {
    if (call.acc == at::kDouble) {
      run<double>(F, A, yp, call.metric, scale, pull, softmax, call.chunk, call.loss, grad);
    } else {
      run<float>(F, A, yp, call.metric, static_cast<float>(scale), static_cast<float>(pull), softmax, call.chunk,
                 call.loss, grad);
    }
  }
  return {call.loss, grad.to(features.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ppml, CPU, m) {
  m.impl("anchor_loss", &anchor_loss_cpu);
}

}  // namespace ppml::ops
