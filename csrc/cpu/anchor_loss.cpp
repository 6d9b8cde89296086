// CPU kernel of ppml::anchor_loss: loss and d(loss)/d(features) in one pass over chunks of rows.
//
// Per chunk of rows: one GEMM gives the dot products f·a_c, a row pass turns them into logits, the log-sum-exp and the
// loss, and overwrites them with the coefficients w_c of the gradient, a second GEMM gives w·A straight into the
// gradient rows, and a last row pass adds the per-row terms. The chunk's [rows, C] buffer is reused; its size is
// bounded (csrc/common/anchor_loss.h), so however large B is, the B×C logits never exist at once beyond that budget.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/anchor_loss.h"

namespace ppml::ops {
namespace {

template <typename acc_t>
void run(const at::Tensor& F, const at::Tensor& A, const int64_t* y, Metric metric, acc_t gamma, acc_t pull,
         bool softmax, at::Tensor& loss, at::Tensor& grad) {
  const int64_t B = F.size(0), D = F.size(1), C = A.size(0);
  const acc_t* f = F.const_data_ptr<acc_t>();
  const acc_t* a = A.const_data_ptr<acc_t>();
  acc_t* L = loss.mutable_data_ptr<acc_t>();
  acc_t* G = grad.mutable_data_ptr<acc_t>();
  const bool cosine = metric == Metric::Cosine;

  // Per-anchor squared norms (Euclidean) or inverse norms (cosine): C values, computed once.
  std::vector<acc_t> anorm(static_cast<size_t>(C));
  at::parallel_for(0, C, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t s = 0;
      for (int64_t k = 0; k < D; ++k) s += a[c * D + k] * a[c * D + k];
      anorm[c] = cosine ? acc_t(1) / std::max(std::sqrt(s), acc_t(kCosEps)) : s;
    }
  });
  auto fnorm2 = [&](int64_t i) {
    acc_t s = 0;
    for (int64_t k = 0; k < D; ++k) s += f[i * D + k] * f[i * D + k];
    return s;
  };

  const int64_t chunk = anchor_chunk_rows(B, C, softmax);
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
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t row = r0 + i, lab = y[row];
          acc_t* zr = z + i * C;
          const acc_t fn2 = fnorm2(row);
          if (cosine) {
            const acc_t s = gamma / std::max(std::sqrt(fn2), acc_t(kCosEps));
            for (int64_t c = 0; c < C; ++c) zr[c] *= s * anorm[c];
          } else if (metric == Metric::SqEuclidean) {
            // u_c = γ f·a_c − (γ/2)‖a_c‖²: the ‖f‖² row constant cancels exactly in lse − z_y, and keeping it would
            // leave f·(1 − Σp) rounding noise in the gradient (see ppml/reference/anchor_loss.py).
            for (int64_t c = 0; c < C; ++c) zr[c] = gamma * zr[c] - acc_t(0.5) * gamma * anorm[c];
          } else {
            for (int64_t c = 0; c < C; ++c) {
              const acc_t d2 = std::max(fn2 - 2 * zr[c] + anorm[c], acc_t(0));
              zr[c] = -gamma * std::sqrt(std::max(d2, acc_t(kDist2Eps)));
            }
            // The true class from the difference vector: the expanded form cancels badly near the anchor.
            acc_t dy2 = 0;
            for (int64_t k = 0; k < D; ++k) {
              const acc_t d = f[row * D + k] - a[lab * D + k];
              dy2 += d * d;
            }
            zr[lab] = -gamma * std::sqrt(std::max(dy2, acc_t(kDist2Eps)));
          }
          acc_t m = -std::numeric_limits<acc_t>::infinity();
          for (int64_t c = 0; c < C; ++c) m = std::max(m, zr[c]);
          acc_t s = 0;
          for (int64_t c = 0; c < C; ++c) s += std::exp(zr[c] - m);
          const acc_t lse = m + std::log(s);
          L[row] = lse - zr[lab];
          // Overwrite the logits with the gradient coefficients w_c (see ppml/ops/anchor_loss.py::loss_and_grad).
          acc_t ws = 0;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t dz = std::exp(zr[c] - lse) - (c == lab ? acc_t(1) : acc_t(0));
            acc_t w;
            if (metric == Metric::SqEuclidean) {
              w = -gamma * dz;
            } else if (metric == Metric::Euclidean) {
              const acc_t d = -zr[c] / gamma;  // the floored distance
              w = d * d > acc_t(kDist2Eps) ? -gamma * dz / d : acc_t(0);
            } else {
              w = gamma * dz * anorm[c];
            }
            zr[c] = w;
            ws += w;
          }
          // Σ_c w_c = −γ Σ_c dz_c is 0 in exact arithmetic for the squared metric: use the exact value.
          wsum[i] = metric == Metric::SqEuclidean ? acc_t(0) : ws;
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
          acc_t dy2 = 0;
          for (int64_t k = 0; k < D; ++k) {
            const acc_t diff = fr[k] - ay[k];
            dy2 += diff * diff;
            gr[k] = fr[k] * wsum[i] - gr[k] + pull * diff;
          }
          L[row] += pull * acc_t(0.5) * dy2;
        } else {
          // dF̂ = γ·dz·Â − pull·â_y; dF = (dF̂ − (dF̂·f̂)f̂)/‖f‖, or dF̂/ε below the norm floor
          const acc_t fn = std::sqrt(fnorm2(row));
          const acc_t fden = std::max(fn, acc_t(kCosEps));
          acc_t cos_y = 0, radial = 0;
          for (int64_t k = 0; k < D; ++k) {
            const acc_t ahat = ay[k] * anorm[lab];
            cos_y += fr[k] / fden * ahat;
            gr[k] -= pull * ahat;
            radial += gr[k] * fr[k] / fden;
          }
          L[row] += pull * (acc_t(1) - cos_y);
          for (int64_t k = 0; k < D; ++k) {
            gr[k] = fn > acc_t(kCosEps) ? (gr[k] - radial * fr[k] / fden) / fden : gr[k] / acc_t(kCosEps);
          }
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> anchor_loss_cpu(const at::Tensor& features, const at::Tensor& anchors,
                                                   const at::Tensor& labels, c10::string_view metric, double scale,
                                                   double pull, bool softmax) {
  check_anchor_args(features, anchors, labels, scale, pull, softmax);
  const Metric m = parse_metric(std::string_view(metric.data(), metric.size()));
  const int64_t B = features.size(0), C = anchors.size(0);
  const at::Tensor y = labels.contiguous();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK_VALUE(yp[i] >= 0 && yp[i] < C, "ppml.anchor_loss: labels must lie in [0, C) with C=", C, ", got ",
                      yp[i]);
  }
  const auto acc = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor F = features.to(acc).contiguous();
  const at::Tensor A = anchors.to(acc).contiguous();
  at::Tensor loss = at::empty({B}, F.options());
  at::Tensor grad = at::empty({B, features.size(1)}, F.options());
  if (B > 0) {
    if (acc == at::kDouble) {
      run<double>(F, A, yp, m, scale, pull, softmax, loss, grad);
    } else {
      run<float>(F, A, yp, m, static_cast<float>(scale), static_cast<float>(pull), softmax, loss, grad);
    }
  }
  return {loss, grad.to(features.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ppml, CPU, m) {
  m.impl("anchor_loss", &anchor_loss_cpu);
}

}  // namespace ppml::ops
