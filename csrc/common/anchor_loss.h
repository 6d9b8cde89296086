// The host side of ppml::anchor_loss that the CPU and CUDA kernels share: constants, metric parsing, argument checks,
// the accumulation dtype, the output tensors and the chunk sizing (anchor_prologue), written once.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/checks.h"  // describe, dtype_name

namespace ppml::ops {

// Same constants as ppml/reference/anchor_loss.py.
constexpr double kCosEps = 1e-12;
constexpr double kDist2Eps = 1e-12;
// Elements of the reused [rows, C] logits buffer: at most 64M (256 MiB of float32) however large B is, and never
// more than B×C. Large chunks keep the number of passes over the anchors low (two GEMMs per chunk each read all of A);
// at B = 512, C = 100,000 the whole batch is one chunk: one B×C buffer, a third of eager's peak (logits,
// log-softmax and its gradient). PPML_ANCHOR_CHUNK_ELEMENTS overrides the budget (tests use it to force chunking).
constexpr int64_t kAnchorChunkElements = int64_t{1} << 26;

enum class Metric : int { SqEuclidean = 0, Euclidean = 1, Cosine = 2 };

inline Metric parse_metric(std::string_view m) {
  if (m == "sqeuclidean") return Metric::SqEuclidean;
  if (m == "euclidean") return Metric::Euclidean;
  TORCH_CHECK_VALUE(m == "cosine", "ppml.anchor_loss: metric must be one of 'sqeuclidean', 'euclidean', 'cosine', got '",
                    std::string(m), "'");
  return Metric::Cosine;
}

// The same checks, with the same wording, as ppml/ops/anchor_loss.py::_check.
inline void check_anchor_args(const at::Tensor& f, const at::Tensor& a, const at::Tensor& labels, double scale,
                              double pull, bool softmax) {
  auto is_float = [](const at::Tensor& t) {
    const auto s = t.scalar_type();
    return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
  };
  TORCH_CHECK_VALUE(f.dim() == 2 && is_float(f), "ppml.anchor_loss: features must be a float [B, D] tensor, got ",
                    describe(f));
  const int64_t B = f.size(0), D = f.size(1);
  TORCH_CHECK_VALUE(a.dim() == 2 && is_float(a) && a.size(1) == D,
                    "ppml.anchor_loss: anchors must be a float [C, D] tensor with D=", D, ", got ", describe(a));
  TORCH_CHECK_VALUE(a.size(0) >= 1, "ppml.anchor_loss: anchors must hold at least one class, got ", describe(a));
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == B,
                    "ppml.anchor_loss: labels must be int64 [B] with B=", B, ", got ", describe(labels));
  TORCH_CHECK_VALUE(a.device() == f.device(), "ppml.anchor_loss: anchors must be on the features' device ",
                    f.device(), ", got ", describe(a));
  TORCH_CHECK_VALUE(labels.device() == f.device(), "ppml.anchor_loss: labels must be on the features' device ",
                    f.device(), ", got ", describe(labels));
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "ppml.anchor_loss: scale must be a finite number > 0, got ",
                    scale);
  TORCH_CHECK_VALUE(std::isfinite(pull) && pull >= 0, "ppml.anchor_loss: pull must be a finite number >= 0, got ",
                    pull);
  TORCH_CHECK_VALUE(softmax || pull > 0,
                    "ppml.anchor_loss: with softmax=False the loss is pull·ρ alone, so pull must be > 0, got ", pull);
}

// Rows per chunk: as many as the [rows, C] buffer budget allows, then evened out over the chunks the batch needs
// (B = 4096 at C = 32,000 is two chunks of 2048 rows, not 2097 + 1999: equal GEMMs, no ragged last tile).
inline int64_t anchor_chunk_rows(int64_t B, int64_t C, bool softmax) {
  if (!softmax || B <= 0) return std::max<int64_t>(B, 1);
  int64_t budget = kAnchorChunkElements;
  if (const char* env = std::getenv("PPML_ANCHOR_CHUNK_ELEMENTS")) {
    const long long v = std::atoll(env);
    if (v > 0) budget = v;
  }
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(B, budget / C));
  const int64_t chunks = (B + most - 1) / most;
  return (B + chunks - 1) / chunks;
}

// What every kernel of the op starts from: the checked arguments, the parsed metric, contiguous labels, the
// accumulation dtype (float64 for float64 features, float32 otherwise: the reference's rule), the [B] loss in that
// dtype and the chunk size. Label values are not read here: the CPU kernel checks them itself, the CUDA kernels on
// the device (no host round trip).
struct AnchorCall {
  Metric metric;
  int64_t B, D, C, chunk;
  at::ScalarType acc;
  at::Tensor labels, loss;
};

inline AnchorCall anchor_prologue(const at::Tensor& features, const at::Tensor& anchors, const at::Tensor& labels,
                                  c10::string_view metric, double scale, double pull, bool softmax) {
  check_anchor_args(features, anchors, labels, scale, pull, softmax);
  AnchorCall call;
  call.metric = parse_metric(std::string_view(metric.data(), metric.size()));
  call.B = features.size(0);
  call.D = features.size(1);
  call.C = anchors.size(0);
  call.chunk = anchor_chunk_rows(call.B, call.C, softmax);
  call.acc = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  call.labels = labels.contiguous();
  call.loss = at::empty({call.B}, features.options().dtype(call.acc));
  return call;
}

}  // namespace ppml::ops
