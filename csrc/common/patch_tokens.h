// Geometry, normalisation and argument checks of ppml::patch_tokens, shared by the CPU and CUDA kernels.
//
// Output element o of [B, N, C*p*p] (contiguous) is, from the innermost index out, x = o % p, y = o / p % p,
// c = o / (p*p) % C, token i = o / (C*p*p) % N, image b; it reads pixel (y, x) of channel c of source tile
// t = perm[b, i] (row-major tiles: ty = t / tiles_x, tx = t % tiles_x). Every backend normalises in one fixed order,
// each step one correctly rounded operation in the accumulate type (float, or double when the images or the tokens
// are float64): v = in; [v = v / 255 for uint8]; v = v - mean[c]; v = v / std[c]; one rounding to the token dtype.
// Python twin: ppml/reference/patch_tokens.py.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

#include "common/checks.h"  // dtype_name, describe
#include "common/plane_geometry.h"  // clamp_tile

#ifndef __CUDACC_RTC__
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/OptionalArrayRef.h>

#include <vector>
#endif

namespace ppml::ops {

// Channels a kernel normalises with per-channel values passed by value (a kernel argument, no device buffer).
constexpr int kTokensMaxChannels = 16;

template <typename Acc>
struct TokenStats {
  Acc mean[kTokensMaxChannels];
  Acc std[kTokensMaxChannels];
};

// One element's normalisation, in the fixed order every backend uses (see above).
template <typename Acc, bool FromBytes>
C10_HOST_DEVICE inline Acc normalise(Acc v, Acc mean, Acc std) {
  if constexpr (FromBytes) v = v / static_cast<Acc>(255);
  v = v - mean;
  return v / std;
}

#ifndef __CUDACC_RTC__

inline bool is_token_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline void check_token_stats(c10::OptionalArrayRef<double> values, int64_t C, const char* name) {
  if (!values.has_value()) return;
  const auto v = *values;
  bool ok = v.size() == 1 || static_cast<int64_t>(v.size()) == C;
  for (double d : v) ok = ok && std::isfinite(d) && (name[0] != 's' || d != 0.0);
  TORCH_CHECK_VALUE(ok, "ppml.patch_tokens: ", name, " must be None or ", C, " (or 1) ",
                    name[0] == 's' ? "non-zero finite" : "finite", " numbers, one per channel, got ", v);
}

// The same checks, with the same wording, as ppml/ops/patch_tokens.py::_check; they guard direct calls of
// torch.ops.ppml.patch_tokens. Returns N.
inline int64_t check_patch_tokens_args(const at::Tensor& images, const std::optional<at::Tensor>& perm, int64_t p,
                                       c10::OptionalArrayRef<double> mean, c10::OptionalArrayRef<double> std,
                                       at::ScalarType dtype) {
  TORCH_CHECK_VALUE(images.dim() == 4, "ppml.patch_tokens: images must be 4-D [B, C, H, W], got ", describe(images));
  const auto st = images.scalar_type();
  TORCH_CHECK_TYPE(st == at::kByte || is_token_dtype(st),
                   "ppml.patch_tokens: images must be uint8, float16, bfloat16, float32 or float64, got ",
                   describe(images));
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  TORCH_CHECK_VALUE(p > 0, "ppml.patch_tokens: patch_size must be a positive integer, got ", p);
  TORCH_CHECK_VALUE(H % p == 0 && W % p == 0, "ppml.patch_tokens: patch_size must divide H and W, got patch_size=", p,
                    " for H=", H, ", W=", W);
  const int64_t N = (H / p) * (W / p);
  if (perm.has_value()) {
    const at::Tensor& k = *perm;
    TORCH_CHECK_VALUE(k.scalar_type() == at::kLong && k.dim() == 2 && k.size(0) == B && k.size(1) == N,
                      "ppml.patch_tokens: perm must be int64 [B, N] with B=", B, " and N=(H/p)*(W/p)=", N, ", got ",
                      describe(k));
    TORCH_CHECK_VALUE(k.device() == images.device(), "ppml.patch_tokens: perm must be on the images' device ",
                      images.device(), ", got ", describe(k));
  }
  check_token_stats(mean, C, "mean");
  check_token_stats(std, C, "std");
  TORCH_CHECK_TYPE(is_token_dtype(dtype), "ppml.patch_tokens: dtype must be float16, bfloat16, float32 or float64, got ",
                   dtype_name(dtype));
  return N;
}

// `out=` of ppml::patch_tokens.out: contiguous [B, N, C*p*p] of `dtype` on the images' device, not sharing memory with
// them (Python twin: ppml/ops/patch_tokens.py::_check_out).
inline void check_tokens_out(const at::Tensor& out, const at::Tensor& images, int64_t N, int64_t p,
                             at::ScalarType dtype) {
  const std::vector<int64_t> sizes{images.size(0), N, images.size(1) * p * p};
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(sizes) && out.scalar_type() == dtype &&
                        out.device() == images.device() && out.is_contiguous(),
                    "ppml.patch_tokens: out must be contiguous ", dtype_name(dtype), " ", at::IntArrayRef(sizes), " on ",
                    images.device(), ", got ", describe(out), (out.is_contiguous() ? "" : " (not contiguous)"));
  TORCH_CHECK_VALUE(!out.numel() || !out.is_alias_of(images), "ppml.patch_tokens: out must not share memory with images");
}

// Channel c's mean (or std) in the accumulate type, each double rounded once, as torch.tensor(values, dtype=acc)
// does; an absent one is `absent` (0 or 1, which change no value: v - 0 and v / 1 are exact).
template <typename Acc>
inline Acc token_stat(c10::OptionalArrayRef<double> values, int64_t c, double absent) {
  if (!values.has_value()) return static_cast<Acc>(absent);
  return static_cast<Acc>((*values)[values->size() == 1 ? 0 : c]);
}

// Statistics passed to a CUDA kernel by value (no device buffer to fill, no copy to wait for), C <= 16.
template <typename Acc>
inline TokenStats<Acc> make_token_stats(c10::OptionalArrayRef<double> mean, c10::OptionalArrayRef<double> std,
                                        int64_t C) {
  TokenStats<Acc> s;
  for (int64_t c = 0; c < kTokensMaxChannels; ++c) {
    s.mean[c] = c < C ? token_stat<Acc>(mean, c, 0.0) : Acc(0);
    s.std[c] = c < C ? token_stat<Acc>(std, c, 1.0) : Acc(1);
  }
  return s;
}

#endif  // __CUDACC_RTC__

}  // namespace ppml::ops
